"""The defaults of a token-level objective (`ObjectiveBase`): an objective of your own names
only what differs from them (docs/objectives.md). What an objective is: ftdist.objectives.protocol."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Optional

from ftdist.objectives.chunks import chunk_logit_bytes
from ftdist.objectives.protocol import TEXT_FORMATS, Direction, RowShape

if TYPE_CHECKING:
    import numpy as np
    import torch
    from pydantic import BaseModel
    from torch import nn

    from ftdist.config.schema import Config


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
    sequences_per_row: int = 1

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

    def rollout(self, batches: list[dict], step: int) -> list[dict]:
        return batches

    def step_figures(self) -> dict[str, float]:
        return {}

    @classmethod
    def problem(cls, cfg: "Config") -> Optional[str]:
        """What in the config does not fit this objective beyond its rows and formats (its own
        section's rules across sections), or None."""
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
            from ftdist.objectives.tokens import perplexity

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

    def generation_bytes(self, model_config, dtype_bytes: int) -> float:
        return 0.0

    def write_final(self, folder, model: "nn.Module", tokenizer, model_state: Optional[dict]) -> dict:
        """The model (or its adapters) as transformers (PEFT) saves it."""
        model.save_pretrained(folder, **({} if model_state is None else {"state_dict": model_state}))
        return {}


