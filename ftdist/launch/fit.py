"""`ftdist plan`: will a config fit the GPUs it is meant for? The plan and the per-device
memory estimate, from the model's config.json alone: no cluster, no weights, no GPU here."""

from __future__ import annotations

from dataclasses import dataclass

from ftdist.config.schema import Config
from ftdist.engines.registry import resolve
from ftdist.launch.preflight import estimate_fit
from ftdist.launch.ray_train import describe_plan
from ftdist.model.build import compute_dtype
from ftdist.objectives.registry import resolve as objective_of
from ftdist.sizing.memory import GPU_USABLE, GiB

# What an 80 GB GPU (H100, A100 80GB) reports as its total memory.
DEFAULT_GPU_GIB = 79.1


@dataclass(frozen=True)
class Sizing:
    lines: list[str]
    fits: bool


def size_up(cfg: Config, gpu_gib: float = DEFAULT_GPU_GIB) -> Sizing:
    """The plan line, the estimate by part, and fits / does not fit (with advice) on GPUs of
    `gpu_gib` GiB each. model.dtype auto is bfloat16 there (every GPU ftdist targets has it)."""
    import torch

    d = cfg.distributed
    dtype = compute_dtype(cfg, torch.device("cuda"), bf16_supported=True)
    workers = d.min_workers or 1  # an elastic range at its fewest: ZeRO's partitions are largest there
    available = gpu_gib * GiB
    est, limit, tips = estimate_fit(cfg, dtype, workers, resolve(d.engine, local=not d.min_workers), available)
    plan = describe_plan(cfg, "cuda") if d.min_workers else "plan: local mode, one process on one GPU"
    switches = [name for name, on in (("gradient checkpointing" + (f" every {cfg.train.checkpoint_every} blocks"
                                       if cfg.train.checkpoint_every > 1 else ""), cfg.train.checkpoint_every),
                                      ("chunked loss", cfg.train.chunked_loss)) if on]
    lines = [plan,
             f"model: {est.total_params / 1e9:.2f}B parameters, {est.trainable_params:,} trainable ({cfg.method}); "
             f"{str(dtype).removeprefix('torch.')}, micro batch {cfg.train.micro_batch_size}{sampled(cfg)} x "
             f"{cfg.row_length} tokens; {', '.join(switches) or 'no memory switches'}",
             f"memory (estimate): {est.describe()}, of {gpu_gib:g} GiB"]
    lines.append(f"does not fit: about {est.device_total / GiB:.1f} GiB per GPU, of the {limit / GiB:.1f} GiB "
                 f"usable there ({GPU_USABLE:.0%} of {gpu_gib:g}); " + "; or ".join(tips) if tips else "fits")
    return Sizing(lines, not tips)


def sampled(cfg: Config) -> str:
    """" prompts x G completions" where the objective trains on G sequences per row (grpo)."""
    per_row = objective_of(cfg).sequences_per_row
    return f" prompts x {per_row} completions" if per_row > 1 else ""
