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
# pairs (chosen and rejected as documents 2j, 2j+1 of one row), labelled texts (a target
# only on each text's last token: its label's index), or prompts (one a row, no targets, its
# other columns beside it) to sample completions from.
RowShape = Literal["text", "pairs", "labels", "prompts"]


ROW_SHAPES: tuple[str, ...] = ("text", "pairs", "labels", "prompts")


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

    def rollout(self, batches: list[dict], step: int) -> list[dict]:
        """The micro-batches step `step` trains on, made from this rank's micro-batches of its
        rows (GRPO: completions sampled for the prompts, scored; others: the batches as they are)."""

    def step_figures(self) -> dict[str, float]:
        """After a step's update: figures of the step the objective keeps itself, reduced over
        every rank (GRPO's rewards, KL, clip fraction); logged with the step's record."""

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

    sequences_per_row: int  # sequences a row becomes in a training micro-batch (GRPO: its group)

    def generation_bytes(self, model_config, dtype_bytes: int) -> float:
        """What sampling holds at its peak, for a micro-batch (the KV cache and one step's
        logits); 0 for an objective that does not sample."""

    # ---- final/
    def write_final(self, folder, model: "nn.Module", tokenizer, model_state: Optional[dict]) -> dict:
        """The trained model into final/ (`model_state`: its full state, where the engine
        gathered it); returns what final/ftdist.json adds (a classifier's labels)."""


# What a class must have to be an objective (checked when a config names one by import path).
REQUIRED = ("name", "section", "rows", "formats", "metrics", "step_metrics", "told", "transfer", "own_modules",
            "Args", "prepare_model", "make_head", "before_engine", "start", "rollout", "step_figures", "count", "loss",
            "evaluation_size", "evaluation_sums", "scores", "describe", "logits_bytes", "reference_bytes",
            "sequences_per_row", "generation_bytes", "write_final")


def protocol_problems(cls: type) -> list[str]:
    """What keeps `cls` from being an objective, in words; empty where nothing does."""
    if not isinstance(cls, type):
        return [f"it is a {type(cls).__name__}, not a class"]
    missing = [m for m in REQUIRED if not hasattr(cls, m)]
    if missing:
        return [f"it lacks {', '.join(missing)} (subclass ftdist.objectives.base.ObjectiveBase for the defaults)"]
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
