"""What an objective is: everything the data path, the model, the loop, evaluation, Tune, the
summary, the report, the CLI and the memory estimate ask of what a run optimises.

The class answers what a config needs before anything heavy is imported (its config
section, the rows it trains on, its metrics and which way each is better); an instance,
made from the validated config, builds its head and computes the loss. `ObjectiveBase` gives
the defaults of a token-level objective, so that one of your own names only what differs
(docs/objectives.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, Mapping, Optional, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch
    from pydantic import BaseModel
    from torch import nn

    from ftdist.config.schema import Config

Direction = Literal["min", "max"]
# What the data path builds for an objective: packed text with its target tokens, preference
# pairs (chosen and rejected as documents 2j, 2j+1 of one row), or labelled texts (a target
# only on each text's last token: its label's index).
RowShape = Literal["text", "pairs", "labels"]
ROW_SHAPES: tuple[str, ...] = ("text", "pairs", "labels")
TEXT_FORMATS = ("text", "prompt_completion", "chat", "alpaca", "sharegpt")  # data.format of text rows


class Objective(Protocol):
    """The protocol. Class attributes (read by config validation, torch-free):

      name          how runs and messages name it
      section       the config section it reads (dpo, classification), None: none
      rows          what the data path builds for it (RowShape)
      formats       the data formats it trains on (data.format)
      metrics       every figure an evaluation reports, as metrics.jsonl and summary.json name it,
                    and which way is better; the first is the metric Tune optimises by default
      step_metrics  per-micro-batch sums (averaged over the count) logged at every step, and as
                    eval_<name> at every evaluation (so also in `metrics`)
      told          the metrics the terminal tells: the CLI's last lines (eval_<name>), each
                    step's line where a step has it
      transfer      the metrics whose getting worse from before training to the end is negative
                    transfer (the summary's negative_transfer)
      own_modules   modules it adds to the model that train whole (a classifier's head)
      Args          a pydantic model of its `objective_args:`, or None: it takes none
    """

    name: ClassVar[str]
    section: ClassVar[Optional[str]]
    rows: ClassVar[RowShape]
    formats: ClassVar[tuple[str, ...]]
    metrics: ClassVar[Mapping[str, Direction]]
    step_metrics: ClassVar[tuple[str, ...]]
    told: ClassVar[tuple[str, ...]]
    transfer: ClassVar[tuple[str, ...]]
    own_modules: ClassVar[tuple[str, ...]]
    Args: ClassVar[Optional[type["BaseModel"]]]

    def __init__(self, cfg: "Config", args: Optional["BaseModel"] = None) -> None: ...

    # ---- the model: what it adds, and the head handed to it
    def prepare_model(self, model: "nn.Module") -> None:
        """Modules of its own on the model, before freezing and adapters (a classifier's head)."""

    def make_head(self, model: "nn.Module") -> Any:
        """The loss head that replaces the LM head's forward (None: the loss from the logits).
        `model`: as it trains (adapters on)."""

    # ---- the run
    def before_engine(self, model: "nn.Module", dtype: "torch.dtype") -> None:
        """What must be taken from the model before the engine wraps it (DPO's frozen copy)."""

    def start(self, ctx, bundle, engine, data) -> None:
        """What needs the engine, before a checkpoint is restored (DPO's reference)."""

    def count(self, batch: dict) -> int:
        """What a batch's loss is normalised by (target tokens; pairs)."""

    def loss(self, forward, batch: dict, device: "torch.device") -> tuple["torch.Tensor", "np.ndarray"]:
        """A micro-batch's summed loss (to backpropagate) and its step_metrics' sums."""

    evaluation_size: int  # how many more sums an evaluation keeps per batch (evaluation_sums)

    def evaluation_sums(self, batch: dict) -> "np.ndarray":
        """After `loss` in an evaluation: sums of its own (a classifier's confusion counts)."""

    def scores(self, loss: float, count: float, sums: "np.ndarray") -> dict[str, float]:
        """An evaluation's figures other than eval_loss, by their names in `metrics`: from its
        mean loss, the count and [step_metrics' sums, evaluation sums] over every rank."""

    def describe(self, scores: dict[str, float]) -> str:
        """An evaluation's figures for the terminal, after "step N: eval loss X"."""

    # ---- the memory estimate (ftdist.sizing.memory): what it adds
    def logits_bytes(self, tokens: int, vocab: int, dtype_bytes: int) -> float:
        """What the loss holds of the logits for a micro-batch of `tokens`."""

    def reference_bytes(self, total_params: int, weight_bytes: int) -> float:
        """A model of its own held beside the one that trains (DPO's frozen reference)."""

    # ---- final/
    def write_final(self, folder, model: "nn.Module", tokenizer, model_state: Optional[dict]) -> dict:
        """The trained model into final/ (`model_state`: its full state, where the engine
        gathered it); returns what final/ftdist.json adds (a classifier's labels)."""


# What a class must have to be an objective (checked when a config names one by import path).
REQUIRED = ("name", "section", "rows", "formats", "metrics", "step_metrics", "told", "transfer", "own_modules",
            "Args", "prepare_model", "make_head", "before_engine", "start", "count", "loss", "evaluation_size",
            "evaluation_sums", "scores", "describe", "logits_bytes", "reference_bytes", "write_final")


def protocol_problems(cls: type) -> list[str]:
    """What keeps `cls` from being an objective, in words; empty where nothing does."""
    if not isinstance(cls, type):
        return [f"it is a {type(cls).__name__}, not a class"]
    missing = [m for m in REQUIRED if not hasattr(cls, m)]
    if missing:
        return [f"it lacks {', '.join(missing)} (subclass ftdist.objectives.ObjectiveBase for the defaults)"]
    problems = []
    metrics = cls.metrics
    if not isinstance(metrics, Mapping) or "eval_loss" not in metrics:
        problems.append("its metrics must be a mapping of metric name to 'min' or 'max' holding eval_loss")
    else:
        bad = [f"{k}: {v!r}" for k, v in metrics.items() if v not in ("min", "max")]
        if bad:
            problems.append(f"each metric is 'min' or 'max' (lower or higher is better), not {', '.join(bad)}")
        unlisted = [m for m in (*(f"eval_{s}" for s in cls.step_metrics), *(f"eval_{t}" for t in cls.told),
                                *cls.transfer) if m not in metrics]
        if unlisted:
            problems.append(f"{', '.join(unlisted)} (of its step_metrics, told or transfer) are not in its metrics")
    if cls.rows not in ROW_SHAPES:
        problems.append(f"its rows must be one of {', '.join(ROW_SHAPES)}, not {cls.rows!r}")
    return problems


class ObjectiveBase:
    """The defaults: a loss over the target tokens of packed text, through the LM head (in
    chunks where train.chunked_loss is on), reporting eval_loss and eval_ppl. Override `loss`
    (and what else differs) for an objective of your own."""

    name: ClassVar[str] = "custom"
    section: ClassVar[Optional[str]] = None
    rows: ClassVar[RowShape] = "text"
    formats: ClassVar[tuple[str, ...]] = TEXT_FORMATS
    metrics: ClassVar[Mapping[str, Direction]] = {"eval_loss": "min", "eval_ppl": "min"}
    step_metrics: ClassVar[tuple[str, ...]] = ()
    told: ClassVar[tuple[str, ...]] = ("ppl",)
    transfer: ClassVar[tuple[str, ...]] = ("eval_loss",)
    own_modules: ClassVar[tuple[str, ...]] = ()
    Args: ClassVar[Optional[type["BaseModel"]]] = None
    evaluation_size: int = 0

    def __init__(self, cfg: "Config", args: Optional["BaseModel"] = None):
        self.cfg, self.args = cfg, args
        self.head: Any = None
        self.attention = "sdpa"

    def prepare_model(self, model: "nn.Module") -> None:
        return None

    def make_head(self, model: "nn.Module") -> Any:
        """The chunked LM loss where train.chunked_loss is on (its head computes the summed
        cross-entropy); None: the loss from whole logits."""
        self.attention = model.config._attn_implementation
        if self.cfg.train.chunked_loss:
            from ftdist.model.build import plain_linear_head
            from ftdist.objectives.tokens import ChunkedHead

            self.head = ChunkedHead(plain_linear_head(model, "train.chunked_loss", "set train.chunked_loss: false"))
        return self.head

    def before_engine(self, model: "nn.Module", dtype: "torch.dtype") -> None:
        return None

    def start(self, ctx, bundle, engine, data) -> None:
        return None

    def count(self, batch: dict) -> int:
        from ftdist.objectives.tokens import target_count

        return target_count(batch)

    def loss(self, forward, batch: dict, device: "torch.device") -> tuple["torch.Tensor", "np.ndarray"]:
        import numpy as np

        from ftdist.objectives.tokens import loss_sum

        return loss_sum(forward, batch, device, self.head, self.attention), np.zeros(0)

    def evaluation_sums(self, batch: dict) -> "np.ndarray":
        import numpy as np

        return np.zeros(0)

    def scores(self, loss: float, count: float, sums: "np.ndarray") -> dict[str, float]:
        """eval_ppl from the loss where it is a metric; each step metric's mean over the count."""
        found = {f"eval_{m}": float(v) / max(count, 1) for m, v in zip(self.step_metrics, sums)}
        if "eval_ppl" in self.metrics:
            from ftdist.training.metrics import perplexity

            found["eval_ppl"] = perplexity(loss)
        return found

    def describe(self, scores: dict[str, float]) -> str:
        """Each told metric: ", perplexity 12.34" for eval_ppl, else ", <name> 0.1234"."""
        words = {"ppl": "perplexity"}
        return "".join(f", {words.get(t, t.replace('_', ' '))} {scores[f'eval_{t}']:{'.2f' if t == 'ppl' else '.4f'}}"
                       for t in self.told if f"eval_{t}" in scores)

    def logits_bytes(self, tokens: int, vocab: int, dtype_bytes: int) -> float:
        """train.chunked_loss: one chunk's logits in fp32 (and their 16-bit copy); else every
        logit with its gradient, in fp32."""
        if self.cfg.train.chunked_loss:
            return chunk_logit_bytes(tokens, vocab, dtype_bytes)
        return 2 * tokens * vocab * 4

    def reference_bytes(self, total_params: int, weight_bytes: int) -> float:
        return 0.0

    def write_final(self, folder, model: "nn.Module", tokenizer, model_state: Optional[dict]) -> dict:
        """The model (or its adapters) as transformers (PEFT) saves it."""
        model.save_pretrained(folder, **({} if model_state is None else {"state_dict": model_state}))
        return {}


# Logits per chunk of a chunked loss: 128 MiB in fp32 whatever the vocabulary (256 tokens at
# 128k entries, 1024 at 32k). Here, torch-free: the memory estimate reads it too.
CHUNK_LOGITS = 2**25


def chunk_tokens(vocab_size: int) -> int:
    return max(16, CHUNK_LOGITS // vocab_size)


def chunk_logit_bytes(tokens: int, vocab: int, dtype_bytes: int) -> float:
    """One chunk's logits in fp32, and their copy in a 16-bit compute dtype."""
    return min(tokens, chunk_tokens(vocab)) * vocab * (4 + (dtype_bytes if dtype_bytes < 4 else 0))
