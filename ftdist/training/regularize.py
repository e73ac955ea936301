"""Forgetting countered by anchoring trained weights (regularization.l2sp, regularization.ewc).

Each trained weight θ is pulled to its anchor θ*, its value before training: the pretrained
weight (full), or the adapter's initial value, where the update B·A is zero (LoRA's B starts
at zero). A classifier's new head is not anchored: it holds nothing to keep. The penalty is

    ½ Σ c (θ − θ*)²,   c = l2sp + ewc.weight · F

with F the diagonal Fisher of the retention loss at θ*: the mean squared gradient over
ewc.samples rows of data.retention, one row at a time (the empirical Fisher), estimated
before training (and again, identically, on resume: it depends on θ* and the rows only).

It acts as a proximal step decoupled from the gradient, as AdamW's weight decay is: after the
backward pass and before the optimizer's update, θ ← θ* + (θ − θ*) / (1 + lr·c), the exact
minimizer of lr·penalty + ½‖θ − θ_old‖². No weight overshoots its anchor however large c, and
Adam's per-weight normalization does not undo the pull (as it would the penalty's gradient).

A rank keeps the anchor and Fisher of the master weights it owns only: the engine says which
share of each weight that is (Engine.master_shares: the whole weight where every rank holds
it, a fragment or partition where the engine divides them). Only the Fisher is first computed
whole, on the host, before the engine starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ftdist.config.schema import Config
from ftdist.data.rows import Rows, collate, epoch_order
from ftdist.objectives.classification import HEAD
from ftdist.objectives.tokens import autocast, loss_sum, target_count


def describe(cfg: Config, replay_rows: Optional[int], anchors: Optional["Anchors"]) -> Optional[str]:
    """The run's regularization in one line (None when it has none)."""
    r, parts = cfg.regularization, []
    if r.replay is not None:
        parts.append(f"replay {r.replay.fraction:.0%} of each batch's rows from {replay_rows} rows of general text")
    if r.l2sp:
        parts.append(f"l2sp {r.l2sp:g}")
    if r.ewc is not None:
        parts.append(f"ewc {r.ewc.weight:g} (Fisher on {r.ewc.samples} retention rows)")
    if anchors is not None:
        parts.append(f"anchors {anchors.nbytes() / 2**20:.1f} MiB on this rank")
    return "regularization: " + ", ".join(parts) if parts else None


def anchored_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The trained weights with an anchor: every trainable one but a new classifier head's."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad and HEAD not in name.split(".")]


def fisher_diagonal(cfg: Config, model: torch.nn.Module, rows: Rows, pad_id: int, head, attention: str,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """The empirical Fisher's diagonal at the current weights (on the host, float32): each
    anchored weight's squared gradient of one retention row's mean token loss, averaged over
    ewc.samples rows (drawn by train.seed, the same on every rank)."""
    params = anchored_parameters(model)
    sums = {name: torch.zeros(p.shape, dtype=torch.float32) for name, p in params}
    chosen = epoch_order(len(rows), cfg.train.seed, 0)[: cfg.regularization.ewc.samples].tolist()
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model itself
    for index in chosen:
        batch = collate(rows, [index], pad_id)
        with autocast(cfg, device):
            loss = loss_sum(model, batch, device, head, attention) / max(target_count(batch), 1)
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        for (name, _), grad in zip(params, grads):
            if grad is not None:
                sums[name] += grad.detach().float().cpu().square()
    model.train(was_training)
    return {name: total / len(chosen) for name, total in sums.items()}


@dataclass
class Share:
    """This rank's share of one weight's fp32 master copy (flat), its anchor and Fisher."""

    name: str
    read: Callable[[], torch.Tensor]
    write: Callable[[torch.Tensor], None]
    anchor: torch.Tensor
    fisher: Optional[torch.Tensor]
    counted: bool  # False where every rank holds the whole weight: rank 0's copy alone is summed


class Anchors:
    """The anchored weights of this rank, and the pull to their anchors (see the module doc)."""

    def __init__(self, cfg: Config, engine, rank: int, fisher: Optional[dict[str, torch.Tensor]],
                 reduce: Callable):
        r = cfg.regularization
        self.l2sp, self.ewc = r.l2sp, (r.ewc.weight if r.ewc else 0.0)
        self.reduce = reduce
        self.shares = []
        for share in engine.master_shares(anchored_parameters(engine.model), rank):
            master = share.read()
            fisher_share = share.cut(fisher[share.name]).to(master.device) if fisher is not None else None
            self.shares.append(Share(share.name, share.read, share.write, master.detach().clone(), fisher_share,
                                     share.counted))

    def nbytes(self) -> int:
        return sum(s.anchor.nbytes + (s.fisher.nbytes if s.fisher is not None else 0) for s in self.shares)

    def strength(self, share: Share):
        return self.l2sp + self.ewc * share.fisher if share.fisher is not None else self.l2sp

    @torch.no_grad()
    def pull(self, lr: float) -> dict[str, float]:
        """One proximal step toward the anchors; returns the penalty and the distance to the
        anchors (summed over all ranks' shares) before it."""
        penalty = distance = 0.0
        for share in self.shares:
            master = share.read()
            delta = master.float() - share.anchor
            c = self.strength(share)
            if share.counted:
                penalty += 0.5 * float((c * delta.square()).sum())
                distance += float(delta.square().sum())
            share.write((share.anchor + delta / (1.0 + lr * c)).to(master.dtype))
        penalty, distance = self.reduce(np.array([penalty, distance]))
        return {"penalty": float(penalty), "anchor_distance": float(np.sqrt(distance))}
