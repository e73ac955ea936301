"""Evaluation: the count-weighted mean loss over a set of rows (eval, retention), split across
ranks, and the objective's figures over them (ftdist.objectives: its scores from its sums)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from ftdist.config.schema import Config
from ftdist.data.rows import Rows, collate
from ftdist.errors import UserError
from ftdist.objectives.tokens import TokenLoss, autocast, text_head


@dataclass(frozen=True)
class Evaluation:
    """The mean loss over a set of rows, and over each source's rows (None for a source with
    no rows there; `by_source` is empty where the rows have one source), and the objective's
    figures over all of them (its scores: metrics.jsonl's names, eval_loss aside)."""

    loss: float
    by_source: list[Optional[float]]
    scores: dict = field(default_factory=dict)


def text_loss(bundle) -> TokenLoss:
    """What an evaluation of retention text computes: the LM loss on it, whatever the run's
    objective (a classifier's or a preference run's LM head scores it as the base's), in
    chunks where train.chunked_loss is on."""
    return TokenLoss(text_head(bundle.head), bundle.attention)


@torch.no_grad()
def evaluate_rows(cfg: Config, ctx, engine, rows: Rows, pad_id: int, objective, n_sources: int = 1) -> Evaluation:
    """Each source's rows evaluated (each rank takes every world_size-th row of them), and all
    of them together, with the objective's scores of them all."""
    model = engine.model
    was_training = model.training
    model.eval()
    groups = [rows.of_source(s) for s in range(n_sources)] if rows.source is not None else [range(len(rows))]
    sums = []
    with autocast(cfg, ctx.device):
        for group in groups:
            sums.append(ctx.all_reduce_sum(loss_over(cfg, ctx, engine, rows, list(group), pad_id, objective)))
    model.train(was_training)
    together = np.sum(sums, axis=0)
    if not together[1]:  # a loss over nothing reads 0: never a result (every rank has the same sums)
        raise UserError("the evaluation covers zero tokens (no eval row keeps a token the loss is on within "
                        f"data.max_length {cfg.data.max_length}): raise data.max_length or evaluate on other rows")
    by_source = [s[0] / s[1] if s[1] else None for s in sums] if len(groups) > 1 else []
    loss = together[0] / together[1]
    scores = objective.scores(loss, together[1], together[2:]) if hasattr(objective, "scores") else {}
    return Evaluation(loss, by_source, scores)


def loss_over(cfg: Config, ctx, engine, rows: Rows, group: list[int], pad_id: int, objective) -> np.ndarray:
    """This rank's [summed loss, count, the objective's step-metric sums..., its evaluation
    sums...] over its share of the rows `group`."""
    mine = group[ctx.rank :: ctx.world_size]
    size = cfg.train.micro_batch_size
    # Every rank runs the same number of forward passes: under ZeRO-3 each one is collective.
    n_batches = math.ceil(math.ceil(len(group) / ctx.world_size) / size)
    sums = np.zeros(2 + len(objective.step_metrics) + objective.evaluation_size)
    for i in range(n_batches):
        index = mine[i * size : (i + 1) * size]
        batch = collate(rows, index or [group[0]], pad_id)
        loss, metrics = objective.loss(engine.forward, batch, ctx.device)
        if index:  # a rank with no rows left runs one row and ignores it
            sums += (float(loss), objective.count(batch), *metrics, *objective.evaluation_sums(batch))
    return sums
