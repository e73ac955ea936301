"""A classification run's final model, and `ftdist classify` (what trains it:
ftdist.objectives.classification).

`final/` of a full run is a <Arch>ForSequenceClassification directory (the backbone and
`score`), which AutoModelForSequenceClassification loads; of an adapter run, the adapters
and the head, which PEFT puts on that class built from the base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from ftdist.objectives.classification import HEAD

# ---------------------------------------------------------------- final/


def sequence_classification_config(model_config, labels: list[str], pad_token_id: Optional[int]):
    """The base's config as <Arch>ForSequenceClassification's, with the run's labels."""
    config = type(model_config).from_dict(model_config.to_dict())
    arch = (model_config.architectures or [type(model_config).__name__.removesuffix("Config") + "ForCausalLM"])[0]
    config.architectures = [arch.replace("ForCausalLM", "ForSequenceClassification")]
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}
    config.pad_token_id = pad_token_id
    config.use_cache = True
    return config


def full_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A trained causal LM's state with its task head: the keys a *ForSequenceClassification
    model has (the backbone and the head; not the LM head, which the task did not use)."""
    return {k: v for k, v in state.items() if not k.startswith("lm_head.")}


def save_full_classifier(folder: Path, model, labels: list[str], pad_token_id: Optional[int],
                         state: Optional[dict[str, torch.Tensor]] = None) -> None:
    """final/ of a full run: a *ForSequenceClassification directory (config and weights)."""
    from safetensors.torch import save_file

    from ftdist.engine import unique_tensors

    weights = full_state(unique_tensors(state if state is not None else model.state_dict()))
    folder.mkdir(parents=True, exist_ok=True)
    sequence_classification_config(model.config, labels, pad_token_id).save_pretrained(folder)
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def mark_adapter_for_classification(folder: Path) -> None:
    """An adapter run's final/: PEFT's task type made SEQ_CLS, so that PEFT puts the adapters and
    the head (saved as `score`) on the base built as *ForSequenceClassification."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config["task_type"] = "SEQ_CLS"
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def describe(final: Path) -> dict:
    """final/ftdist.json of a classification run; a UserError for anything else."""
    from ftdist.errors import UserError

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

    from ftdist.model.source import TRUST_FLAG, refuse_remote_code

    info = describe(final)
    trust = trust_remote_code
    refuse_remote_code(str(final), trust, "the classifier", TRUST_FLAG)
    if (final / "adapter_config.json").is_file():
        refuse_remote_code(info.get("base_model"), trust, "the classifier's base model", TRUST_FLAG)
    tokenizer = AutoTokenizer.from_pretrained(final, trust_remote_code=trust)
    if (final / "adapter_config.json").is_file():
        from peft import PeftModel

        from ftdist.config.schema import QloraConfig
        from ftdist.model.build import quantized_load_kwargs

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
