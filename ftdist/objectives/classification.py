"""task: classification. A new head on the pretrained model's final hidden states, trained from
scratch in float32, whatever the method: with `method: full, freeze_layers: all` it is a linear
probe on frozen features (feature extraction); with N frozen blocks or adapters, the top of
the model learns with it.

The rows keep the causal LM's shape (ftdist.data): a text's tokens, and a target only on its
last token, the label's index. So packing, Ray Data, the caches and the engines are the LM's.
The head stands in for the LM head's forward (as tokens.ChunkedHead does): the loss is
computed inside a module's forward, where ZeRO-3 has gathered the weights. The LM head itself
stays as it was: retention text is still scored by it, for forgetting.

final/ and `ftdist classify` (inference): ftdist.artifacts.classify.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ftdist.objectives.base import ObjectiveBase
from ftdist.objectives.chunks import chunk_tokens

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from ftdist.config.schema import Config

HEAD = "score"  # the name transformers' *ForSequenceClassification classes give the head
UNKNOWN_LABELS = 2  # the head's size where the labels are not read yet (ftdist plan's estimate)


def add_head(model: "nn.Module", n_labels: int, seed: int) -> "nn.Linear":
    """A new float32 linear layer from the final hidden states to the labels, as `model.score`."""
    import torch
    from torch import nn

    hidden = model.get_output_embeddings().in_features
    head = nn.Linear(hidden, n_labels, bias=False, dtype=torch.float32,
                     device=model.get_output_embeddings().weight.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nn.init.normal_(head.weight, std=getattr(model.config, "initializer_range", 0.02))
    model.add_module(HEAD, head)
    return head


def pool(hidden: "torch.Tensor", targets: "torch.Tensor", doc: "torch.Tensor",
         how: str) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(one vector per labelled example, its label): the hidden state of the example's last
    token (where its label is), or the mean over its tokens."""
    import torch

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

    def __init__(self, lm_head: "nn.Module", score: "nn.Module", pooling: str, chunked: bool = True):
        self.lm_head, self.score, self.pooling, self.chunked = lm_head, score, pooling, chunked
        self.targets: Optional["torch.Tensor"] = None
        self.doc: Optional["torch.Tensor"] = None
        self.text = False  # the pending targets are text tokens, not labels
        self.logits: Optional["torch.Tensor"] = None  # of the last forward's examples, detached
        self.labels: Optional["torch.Tensor"] = None
        self.logits_forward = lm_head.forward
        lm_head.forward = self.forward  # an instance attribute: the module, its names and hooks stay

    def expect(self, targets: "torch.Tensor", doc: "torch.Tensor") -> None:
        self.targets, self.doc = targets, doc.to(targets.device)

    def done(self) -> None:
        self.targets = self.doc = None
        self.text = False

    def for_text(self):
        """What scores text through this head's LM head: the chunked LM loss, or None (the loss
        from whole logits) where train.chunked_loss is off."""
        from ftdist.objectives.tokens import TextLoss

        return TextLoss(self) if self.chunked else None

    def forward(self, hidden: "torch.Tensor") -> "torch.Tensor":
        import torch
        import torch.nn.functional as F

        if self.targets is None:
            return self.logits_forward(hidden)
        if self.text:
            from ftdist.objectives.tokens import chunked_cross_entropy

            head = self.lm_head
            return chunked_cross_entropy(hidden, head.weight, head.bias, self.targets, chunk_tokens(head.out_features))
        pooled, labels = pool(hidden, self.targets, self.doc, self.pooling)
        with torch.autocast(hidden.device.type, enabled=False):  # the new head learns in float32
            logits = self.score(pooled.float())
        self.logits, self.labels = logits.detach(), labels
        return F.cross_entropy(logits, labels.long(), reduction="sum")


# ---------------------------------------------------------------- metrics


def confusion(logits: "torch.Tensor", labels: "torch.Tensor", n_labels: int) -> "np.ndarray":
    """[true, predicted] counts."""
    import numpy as np

    predicted = logits.argmax(-1).cpu().numpy()
    counts = np.zeros((n_labels, n_labels), np.float64)
    np.add.at(counts, (labels.cpu().numpy().astype(int), predicted), 1)
    return counts


def scores(counts: "np.ndarray") -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean of each label's F1; a label never true nor
    predicted counts as 0)."""
    import numpy as np

    total = counts.sum()
    tp = np.diag(counts)
    precision = np.divide(tp, counts.sum(0), out=np.zeros_like(tp), where=counts.sum(0) > 0)
    recall = np.divide(tp, counts.sum(1), out=np.zeros_like(tp), where=counts.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    return {"accuracy": float(tp.sum() / total) if total else 0.0, "macro_f1": float(f1.mean())}


# ---------------------------------------------------------------- the objective


class Classification(ObjectiveBase):
    """A classifier's cross-entropy over its labels (one target per text: the count is the
    texts), through a head of its own; evaluations count [true, predicted] labels for accuracy
    and macro-F1."""

    name = "classification"
    section = "classification"
    rows = "labels"
    formats = ("classification",)
    metrics = {"eval_loss": "min", "eval_accuracy": "max", "eval_macro_f1": "max"}
    told = ("accuracy", "macro_f1")
    transfer = ("eval_loss", "eval_accuracy")
    own_modules = (HEAD,)

    def __init__(self, cfg: "Config", args=None):
        super().__init__(cfg, args)
        labels = cfg.classification.labels
        self.n_labels = len(labels) if labels else UNKNOWN_LABELS
        self.evaluation_size = self.n_labels**2

    def prepare_model(self, model: "nn.Module") -> None:
        add_head(model, self.n_labels, self.cfg.train.seed)

    def make_head(self, model: "nn.Module") -> ClassifierHead:
        unwrapped = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT: its trained copy
        self.attention = model.config._attn_implementation
        self.head = ClassifierHead(model.get_output_embeddings(), getattr(unwrapped, HEAD),
                                   self.cfg.classification.pooling, chunked=self.cfg.train.chunked_loss)
        return self.head

    def evaluation_sums(self, batch: dict) -> "np.ndarray":
        return confusion(self.head.logits, self.head.labels, self.n_labels).ravel()

    def scores(self, loss: float, count: float, sums: "np.ndarray") -> dict[str, float]:
        return {f"eval_{k}": v for k, v in scores(sums.reshape(self.n_labels, self.n_labels)).items()}

    def describe(self, scores: dict) -> str:
        return f", accuracy {scores['eval_accuracy']:.3f}, macro-F1 {scores['eval_macro_f1']:.3f}"

    def logits_bytes(self, tokens: int, vocab: int, dtype_bytes: int) -> float:
        return 0.0  # a classifier's logits: a few per example, not the vocabulary's

    def write_final(self, folder, model: "nn.Module", tokenizer, model_state: Optional[dict]) -> dict:
        """A full run's as a *ForSequenceClassification directory; an adapter run's adapters and
        head marked for PEFT's sequence classification (ftdist.artifacts.classify)."""
        cfg = self.cfg
        if cfg.method == "full":
            save_full_classifier(folder, model, cfg.classification.labels, tokenizer.pad_token_id, model_state)
        else:
            super().write_final(folder, model, tokenizer, model_state)
            mark_adapter_for_classification(folder)
        return {"classification": cfg.classification.model_dump()}


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
