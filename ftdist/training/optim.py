"""The optimizer and learning-rate schedule of a run (the same in every mode: DeepSpeed takes
them as its client optimizer and scheduler)."""

from __future__ import annotations

import torch

from ftdist.config.schema import Config
from ftdist.errors import UserError

SCHEDULES = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}


def build_optimizer(cfg: Config, model: torch.nn.Module, total_steps: int):
    """AdamW over the trainable parameters, and its schedule over `total_steps`."""
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: every parameter is frozen (check method and freeze_layers)")
    # Weight decay on matrices only, not on norms and biases. Without weight decay one group:
    # DeepSpeed's universal checkpoint re-partitions ZeRO-3 states of several groups wrongly.
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.train.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ] if cfg.train.weight_decay else [{"params": params, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.train.lr)
    extra = {"min_lr_rate": cfg.train.min_lr_ratio} if cfg.train.schedule == "cosine" else None
    scheduler = get_scheduler(
        SCHEDULES[cfg.train.schedule], optimizer, num_warmup_steps=min(cfg.train.warmup_steps, total_steps),
        num_training_steps=total_steps, scheduler_specific_kwargs=extra,
    )
    return optimizer, scheduler
