"""The causal-LM objective: summed cross-entropy over a batch's target tokens, and evaluation
as the token-weighted mean loss over a set of rows, split across ranks."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from ftdist.config import Config
from ftdist.data import IGNORE, Rows, collate
from ftdist.model import compute_dtype


def autocast(cfg: Config, device: torch.device):
    """The forward pass in the compute dtype (bf16 / fp16), master weights staying float32."""
    dtype = compute_dtype(cfg, device)
    if dtype == torch.float32 or cfg.method == "qlora":  # bitsandbytes computes in its own dtype
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def loss_sum(forward, batch: dict, device: torch.device) -> torch.Tensor:
    """Summed cross-entropy over the batch's target tokens."""
    targets = batch["targets"].to(device)
    logits = forward(
        input_ids=batch["input_ids"].to(device),
        position_ids=batch["position_ids"].to(device),
        attention_mask=batch["attention_mask"].to(device),
    ).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def target_count(batch: dict) -> int:
    return int((batch["targets"] != IGNORE).sum())


@torch.no_grad()
def evaluate(cfg: Config, ctx, engine, rows: Rows, pad_id: int) -> float:
    """Token-weighted mean loss over all rows; each rank takes every world_size-th row."""
    model = engine.model
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    mine = list(range(ctx.rank, len(rows), ctx.world_size))
    size = cfg.train.micro_batch_size
    # Every rank runs the same number of forward passes: under ZeRO-3 each one is collective.
    n_batches = math.ceil(math.ceil(len(rows) / ctx.world_size) / size)
    with autocast(cfg, ctx.device):
        for i in range(n_batches):
            index = mine[i * size : (i + 1) * size]
            batch = collate(rows, index or [0], pad_id)
            loss = loss_sum(engine.forward, batch, ctx.device)
            if index:  # a rank with no rows left runs row 0 and ignores it
                total, count = total + float(loss), count + target_count(batch)
    model.train(was_training)
    total, count = ctx.all_reduce_sum(total), ctx.all_reduce_sum(count)
    return total / max(count, 1)
