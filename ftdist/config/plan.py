"""The batch plan: how a global batch splits into ranks and micro-batches, and how many steps
a run takes. One home for that arithmetic: the loop, the DeepSpeed config and the driver's
printed plan all read it from here."""

from __future__ import annotations

from dataclasses import dataclass

from ftdist.config.schema import Config, TrainConfig
from ftdist.errors import UserError


def accumulation_steps(train: TrainConfig, world_size: int) -> int:
    """Micro-batches each rank accumulates per optimizer step."""
    if not train.splits_at(world_size):
        raise UserError(
            f"train.batch_size {train.batch_size} is not a multiple of train.micro_batch_size "
            f"{train.micro_batch_size} x {world_size} workers"
        )
    return train.batch_size // (train.micro_batch_size * world_size)


@dataclass(frozen=True)
class Plan:
    rows: int
    batches_per_epoch: int
    total_steps: int
    world_size: int
    accumulation_steps: int  # micro-batches per rank per step
    steps_per_batch: int = 1  # optimizer steps on each batch (grpo.num_iterations)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch index within it) of optimizer step `step` (1-based)."""
        return divmod((step - 1) // self.steps_per_batch, self.batches_per_epoch)

    def describe(self, cfg: Config) -> str:
        return (
            f"{self.rows} training rows of up to {cfg.row_length} tokens; batch {cfg.train.batch_size} "
            f"= {self.world_size} x {self.accumulation_steps} micro-batches of {cfg.train.micro_batch_size}; "
            f"{self.total_steps} steps"
        )


def make_plan(cfg: Config, n_rows: int, world_size: int) -> Plan:
    t = cfg.train
    accumulation = accumulation_steps(t, world_size)
    per_epoch = n_rows // t.batch_size
    if per_epoch == 0:
        raise UserError(
            f"data.train gives {n_rows} rows of data.max_length tokens, fewer than train.batch_size "
            f"{t.batch_size}: add data or lower train.batch_size"
        )
    total = t.max_steps or per_epoch * t.epochs * cfg.steps_per_batch
    return Plan(n_rows, per_epoch, total, world_size, accumulation, cfg.steps_per_batch)
