"""task: classification. A new head on the pretrained model's final hidden states, trained from
scratch in float32, whatever the method: with `method: full, freeze_layers: all` it is a linear
probe on frozen features (feature extraction); with N frozen blocks or adapters, the top of
the model learns with it.

The rows keep the causal LM's shape (ftdist.data): a text's tokens, and a target only on its
last token, the label's index. So packing, Ray Data, the caches and the engines are the LM's.
The head stands in for the LM head's forward (as objective.ChunkedHead does): the loss is
computed inside a module's forward, where ZeRO-3 has gathered the weights. The LM head itself
stays as it was: retention text is still scored by it, for forgetting.

`final/` of a full run is a <Arch>ForSequenceClassification directory (the backbone and
`score`), which AutoModelForSequenceClassification loads; of an adapter run, the adapters
and the head, which PEFT puts on that class built from the base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HEAD = "score"  # the name transformers' *ForSequenceClassification classes give the head


def add_head(model: nn.Module, n_labels: int, seed: int) -> nn.Linear:
    """A new float32 linear layer from the final hidden states to the labels, as `model.score`."""
    hidden = model.get_output_embeddings().in_features
    head = nn.Linear(hidden, n_labels, bias=False, dtype=torch.float32,
                     device=model.get_output_embeddings().weight.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nn.init.normal_(head.weight, std=getattr(model.config, "initializer_range", 0.02))
    model.add_module(HEAD, head)
    return head


def pool(hidden: torch.Tensor, targets: torch.Tensor, doc: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(one vector per labelled example, its label): the hidden state of the example's last
    token (where its label is), or the mean over its tokens."""
    at = (targets != -100).nonzero()  # [n, 2]: (row, position) of each example's last token
    labels = targets[at[:, 0], at[:, 1]]
    if how == "last":
        return hidden[at[:, 0], at[:, 1]], labels
    rows = at[:, 0]
    same = (doc[rows] == doc[rows, at[:, 1]][:, None]).to(hidden.dtype)  # [n, T]: the example's tokens
    summed = torch.bmm(same[:, None, :], hidden[rows]).squeeze(1)
    return summed / same.sum(1, keepdim=True), labels


class ClassifierHead:
    """The LM head's forward, replaced: with labels pending it pools, applies the task head in
    float32 and returns the summed cross-entropy (kept: the example's logits, for accuracy);
    with text targets pending (retention text, scored by the LM head the task leaves alone),
    the LM loss in chunks as ChunkedHead computes it (`chunked`: train.chunked_loss); with
    none pending, the LM head's logits as before."""

    def __init__(self, lm_head: nn.Module, score: nn.Module, pooling: str, chunked: bool = True):
        self.lm_head, self.score, self.pooling, self.chunked = lm_head, score, pooling, chunked
        self.targets: Optional[torch.Tensor] = None
        self.doc: Optional[torch.Tensor] = None
        self.text = False  # the pending targets are text tokens, not labels
        self.logits: Optional[torch.Tensor] = None  # of the last forward's examples, detached
        self.labels: Optional[torch.Tensor] = None
        self.logits_forward = lm_head.forward
        lm_head.forward = self.forward  # an instance attribute: the module, its names and hooks stay

    def expect(self, targets: torch.Tensor, doc: torch.Tensor) -> None:
        self.targets, self.doc = targets, doc.to(targets.device)

    def done(self) -> None:
        self.targets = self.doc = None
        self.text = False

    def for_text(self) -> Optional["TextLoss"]:
        """What scores text through this head's LM head: the chunked LM loss, or None (the loss
        from whole logits) where train.chunked_loss is off."""
        return TextLoss(self) if self.chunked else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.targets is None:
            return self.logits_forward(hidden)
        if self.text:
            from ftdist.objective import chunk_tokens, chunked_cross_entropy

            head = self.lm_head
            return chunked_cross_entropy(hidden, head.weight, head.bias, self.targets, chunk_tokens(head.out_features))
        pooled, labels = pool(hidden, self.targets, self.doc, self.pooling)
        with torch.autocast(hidden.device.type, enabled=False):  # the new head learns in float32
            logits = self.score(pooled.float())
        self.logits, self.labels = logits.detach(), labels
        return F.cross_entropy(logits, labels.long(), reduction="sum")


class TextLoss:
    """A classifier's head made to score text (its expect/done, as a loss head's)."""

    def __init__(self, head: ClassifierHead):
        self.head = head

    def expect(self, targets: torch.Tensor, doc: torch.Tensor) -> None:
        self.head.expect(targets, doc)
        self.head.text = True

    def done(self) -> None:
        self.head.done()


# ---------------------------------------------------------------- metrics


def confusion(logits: torch.Tensor, labels: torch.Tensor, n_labels: int) -> np.ndarray:
    """[true, predicted] counts."""
    predicted = logits.argmax(-1).cpu().numpy()
    counts = np.zeros((n_labels, n_labels), np.float64)
    np.add.at(counts, (labels.cpu().numpy().astype(int), predicted), 1)
    return counts


def scores(counts: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean of each label's F1; a label never true nor
    predicted counts as 0)."""
    total = counts.sum()
    tp = np.diag(counts)
    precision = np.divide(tp, counts.sum(0), out=np.zeros_like(tp), where=counts.sum(0) > 0)
    recall = np.divide(tp, counts.sum(1), out=np.zeros_like(tp), where=counts.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    return {"accuracy": float(tp.sum() / total) if total else 0.0, "macro_f1": float(f1.mean())}


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

    from ftdist.engines.base import unique_tensors

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

    from ftdist.model import TRUST_FLAG, refuse_remote_code

    info = describe(final)
    trust = trust_remote_code
    refuse_remote_code(str(final), trust, "the classifier", TRUST_FLAG)
    if (final / "adapter_config.json").is_file():
        refuse_remote_code(info.get("base_model"), trust, "the classifier's base model", TRUST_FLAG)
    tokenizer = AutoTokenizer.from_pretrained(final, trust_remote_code=trust)
    if (final / "adapter_config.json").is_file():
        from peft import PeftModel

        from ftdist.config import QloraConfig
        from ftdist.model import quantized_load_kwargs

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
