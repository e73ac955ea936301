"""A classification run's final model, and `ftdist classify` (what trains it:
ftdist.objectives.classification).

`final/` of a full run is a <Arch>ForSequenceClassification directory (the backbone and
`score`), which AutoModelForSequenceClassification loads; of an adapter run, the adapters
and the head, which PEFT puts on that class built from the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ftdist.config.schema import QloraConfig
from ftdist.errors import UserError
from ftdist.model.build import quantized_load_kwargs
from ftdist.model.source import TRUST_FLAG, refuse_remote_code
from ftdist.objectives.classification import HEAD

# ---------------------------------------------------------------- final/


def describe(final: Path) -> dict:
    """final/ftdist.json of a classification run; a UserError for anything else."""
    meta = final / "ftdist.json"
    info = json.loads(meta.read_text()) if meta.is_file() else None
    if info is None or info.get("task") != "classification":
        what = "a causal LM (use ftdist generate)" if info else "not a run's final/ directory (no ftdist.json)"
        raise UserError(f"{final}: not a classifier: {what}; give the final/ of a run with task: classification")
    return info


def load_classifier(final: Path, trust_remote_code: bool = False):
    """(model, tokenizer, pooling) of a classification run's final/: the full model, or the
    base as *ForSequenceClassification with the run's adapters and head. A model or tokenizer
    that asks to run code of its own is refused unless `trust_remote_code` (--trust-remote-code)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    info = describe(final)
    trust = trust_remote_code
    refuse_remote_code(str(final), trust, "the classifier", TRUST_FLAG)
    if (final / "adapter_config.json").is_file():
        refuse_remote_code(info.get("base_model"), trust, "the classifier's base model", TRUST_FLAG)
    tokenizer = AutoTokenizer.from_pretrained(final, trust_remote_code=trust)
    if (final / "adapter_config.json").is_file():
        from peft import PeftModel

        labels = info["classification"]["labels"]
        # The adapters learned against the 4-bit base (qlora): classify with that same base.
        loading = quantized_load_kwargs(QloraConfig(**info["qlora"]), torch.float32, torch.device("cpu")) \
            if info["method"] == "qlora" else {"dtype": torch.float32}
        base = AutoModelForSequenceClassification.from_pretrained(
            info["base_model"], num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, pad_token_id=tokenizer.pad_token_id,
            trust_remote_code=trust, **loading)
        model = PeftModel.from_pretrained(base, final)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32, trust_remote_code=trust)
    model.eval()
    return model, tokenizer, info["classification"]["pooling"]


@torch.no_grad()
def predict(model, tokenizer, texts: list[str], pooling: str) -> list[dict[str, float]]:
    """Each text's label probabilities, pooled as the run trained (one text at a time: no padding)."""
    backbone = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = getattr(backbone, HEAD)
    out = []
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        hidden = backbone.model(input_ids=ids).last_hidden_state[0]
        pooled = hidden[-1] if pooling == "last" else hidden.mean(0)
        probs = head(pooled.float()).softmax(-1)
        out.append({backbone.config.id2label[i]: float(p) for i, p in enumerate(probs)})
    return out
