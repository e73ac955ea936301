"""Load a trained model (full model or adapter directory) and generate text."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ftdist.config.schema import QloraConfig
from ftdist.errors import UserError
from ftdist.io.layout import FINAL_META
from ftdist.model.build import load_causal_lm
from ftdist.model.source import TRUST_FLAG, refuse_remote_code


def load_trained(path: str | Path, device: torch.device, trust_remote_code: bool = False):
    """A model directory (config.json) or a PEFT adapter directory (adapter_config.json). A
    model or tokenizer that asks to run code of its own is refused unless `trust_remote_code`
    (--trust-remote-code: the directory's own ftdist.json is not asked, a copied run could say anything)."""
    from transformers import AutoTokenizer

    path = Path(path)
    trust = trust_remote_code
    refuse_remote_code(str(path), trust, "the model", TRUST_FLAG)
    meta_file = path / FINAL_META
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if meta.get("task") == "classification":
        raise UserError(f"{path}: a classifier (task: classification) labels texts, it does not generate; use "
                        f"ftdist classify {path} --text ...")
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        # The adapters learned against the 4-bit base: generate with that same base.
        qlora = QloraConfig(**meta["qlora"]) if meta.get("method") == "qlora" else None
        model = PeftModel.from_pretrained(
            load_causal_lm(base, device, qlora, what=f"{path}: the base model of this adapter",
                           trust_remote_code=trust, allow=TRUST_FLAG), path)
    elif (path / "config.json").is_file():
        model = load_causal_lm(str(path), device, what=str(path), trust_remote_code=trust, allow=TRUST_FLAG)
    else:
        raise UserError(f"{path}: neither a model (config.json) nor an adapter (adapter_config.json) directory")
    if not any(p.device.type == device.type for p in model.parameters()):
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    return model.eval(), tokenizer


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
             seed: int = 0, device: torch.device = torch.device("cpu")) -> str:
    """The completion only (the prompt is not repeated). temperature 0 = greedy."""
    torch.manual_seed(seed)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
        do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
        top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
