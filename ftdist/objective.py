"""The causal-LM objective: summed cross-entropy over a batch's target tokens, and evaluation
as the token-weighted mean loss over a set of rows, split across ranks."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ftdist.model.attention import document_mask
from ftdist.artifacts.classify import ClassifierHead, confusion, scores
from ftdist.config.schema import Config
from ftdist.data.rows import IGNORE, Rows, collate
from ftdist.errors import UserError
from ftdist.model.build import compute_dtype

# Logits per chunk of the chunked loss: 128 MiB in fp32 whatever the vocabulary (256 tokens at
# 128k entries, 1024 at 32k).
CHUNK_LOGITS = 2**25


def chunk_tokens(vocab_size: int) -> int:
    return max(16, CHUNK_LOGITS // vocab_size)


def autocast(cfg: Config, device: torch.device):
    """The forward pass in the compute dtype (bf16 / fp16), master weights staying float32."""
    dtype = compute_dtype(cfg, device)
    if dtype == torch.float32 or cfg.method == "qlora":  # bitsandbytes computes in its own dtype
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class ChunkedHead:
    """The LM head computing the summed cross-entropy itself, over chunks of target tokens.

    The gradients come out of the forward pass (FusedLinearCrossEntropy): at most one chunk of
    [tokens x vocab] logits is ever alive, and no logits are recomputed in the backward pass.
    The loss is computed inside the head's own forward so that ZeRO-3 has the head's weight
    gathered (DeepSpeed gathers a module's parameters for its forward). With no targets pending
    (generation, a plain forward) the head gives logits.
    """

    def __init__(self, head: nn.Linear):
        self.head = head
        self.chunk = chunk_tokens(head.out_features)
        self.targets: Optional[torch.Tensor] = None
        self.chunk_loss = chunk_loss  # train.compile replaces it with its compiled form
        self.logits_forward = head.forward
        head.forward = self.forward  # an instance attribute: the module, its names and hooks stay

    def expect(self, targets: torch.Tensor, doc: torch.Tensor) -> None:
        self.targets = targets

    def done(self) -> None:
        self.targets = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.targets is None:
            return self.logits_forward(hidden)
        return chunked_cross_entropy(hidden, self.head.weight, self.head.bias, self.targets, self.chunk,
                                     self.chunk_loss)


def chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
               grads: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One chunk's summed cross-entropy and, with `grads`, its gradient with respect to the
    logits (softmax less the one-hot targets), made in place of the logits."""
    logits = F.linear(hidden, weight, bias).float()
    target_logits = logits.gather(1, targets[:, None])
    # A stable log-sum-exp without a temporary of the logits' size: shifted and exponentiated in place.
    top = logits.amax(dim=-1, keepdim=True)
    exp = logits.sub_(top).exp_()
    sums = exp.sum(dim=-1, keepdim=True)
    loss = (top + sums.log() - target_logits).sum()
    if not grads:
        return loss, None
    d_logits = exp.div_(sums)
    d_logits.scatter_add_(1, targets[:, None], torch.full_like(sums, -1.0))
    return loss, d_logits


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T + bias, targets)), its gradients computed chunk by
    chunk in the forward pass and only scaled in the backward: the logits are made once, never
    kept, never recomputed. (One backward pass: the gradients are scaled in place.)"""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, loss_fn):
        wants = ctx.needs_input_grad
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        d_hidden = torch.zeros_like(hidden) if wants[0] else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants[1] else None
        d_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if bias is not None and wants[2] \
            else None
        weight_in_hidden_dtype = weight.to(hidden.dtype) if d_hidden is not None else None  # once, not per chunk
        for start in range(0, len(targets), chunk):
            part = slice(start, start + chunk)
            loss, d_logits = loss_fn(hidden[part], weight, bias, targets[part], any(wants[:3]))
            total += loss
            if d_logits is None:
                continue
            if d_bias is not None:
                d_bias += d_logits.sum(0)
            d_logits = d_logits.to(hidden.dtype)
            if d_hidden is not None:
                torch.mm(d_logits, weight_in_hidden_dtype, out=d_hidden[part])
            if d_weight is not None:
                d_weight.addmm_(d_logits.t().to(d_weight.dtype), hidden[part].to(d_weight.dtype))
            del d_logits  # before the next chunk's logits exist
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, d_total):
        d_hidden, d_weight, d_bias = ctx.saved_tensors
        d_hidden, d_weight, d_bias = (None if g is None else g.mul_(d_total) for g in (d_hidden, d_weight, d_bias))
        if d_weight is not None:
            d_weight = d_weight.to(ctx.dtypes[0])
        if d_bias is not None:
            d_bias = d_bias.to(ctx.dtypes[1])
        return d_hidden, d_weight, d_bias, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          targets: torch.Tensor, chunk: int, loss=chunk_loss) -> torch.Tensor:
    """Summed cross-entropy of F.linear(hidden, weight, bias) against targets, IGNORE skipped,
    computed on the target tokens only (a prompt's tokens get no logits at all)."""
    hidden, targets = hidden.flatten(0, -2), targets.flatten()
    keep = (targets != IGNORE).nonzero().squeeze(1)
    hidden, targets = hidden.index_select(0, keep), targets.index_select(0, keep)
    total = FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, loss)
    return total + hidden.sum() * 0.0  # on the graph even for a batch without targets


def forward_inputs(batch: dict, device: torch.device, attention: str) -> dict:
    """The model's inputs for a batch of packed rows. `attention`: the model's
    attn_implementation, which decides the form of the document mask."""
    return dict(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                attention_mask=document_mask(batch["doc"], attention, device), use_cache=False)


def loss_sum(forward, batch: dict, device: torch.device, head: Optional[ChunkedHead] = None,
             attention: str = "sdpa") -> torch.Tensor:
    """Summed cross-entropy over the batch's target tokens; with a chunked head, computed by it."""
    targets = batch["targets"].to(device)
    inputs = forward_inputs(batch, device, attention)
    if head is not None:
        head.expect(targets, batch["doc"])
        try:
            return forward(**inputs).logits  # the head's output is the loss
        finally:
            head.done()
    logits = forward(**inputs).logits
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def target_count(batch: dict) -> int:
    return int((batch["targets"] != IGNORE).sum())


class TokenObjective:
    """What the loop's step and evaluation ask of an objective, for the causal LM and the
    classifier: the count a batch's loss is normalised by (its target tokens), and a
    micro-batch's summed cross-entropy (no metrics of its own). ftdist.preference has the other."""

    metrics: tuple[str, ...] = ()

    def __init__(self, head, attention: str):
        self.head, self.attention = head, attention

    count = staticmethod(target_count)

    def loss(self, forward, batch: dict, device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
        return loss_sum(forward, batch, device, self.head, self.attention), np.zeros(0)


def objective_for(cfg: Config, bundle, reference=None):
    """The run's objective: sft's token loss (a classifier's through its head), or dpo's pairs
    against `reference` (ftdist.preference.preference_reference)."""
    if cfg.objective == "dpo":
        from ftdist.preference import PreferenceObjective

        return PreferenceObjective(cfg, bundle.head, reference, bundle.attention)
    return TokenObjective(bundle.head, bundle.attention)


@dataclass(frozen=True)
class Evaluation:
    """The token-weighted mean loss over a set of rows, and over each source's rows (None for
    a source with no rows there); `by_source` is empty where the rows have one source."""

    loss: float
    by_source: list[Optional[float]]
    scores: Optional[dict] = None  # a classifier's accuracy and macro-F1 over all the rows


def task_head(bundle, split: str):
    """The loss head an evaluation of `split` uses: retention text is scored as text (a
    classifier's or a preference run's LM head scores it as the base's), in chunks where
    train.chunked_loss is on."""
    if split == "retention" and hasattr(bundle.head, "for_text"):
        return bundle.head.for_text()
    return bundle.head


def split_objective(objective, bundle, split: str):
    """What an evaluation of `split` computes: the run's objective, or for retention text the
    LM loss on it."""
    if split == "retention":
        return TokenObjective(task_head(bundle, split), bundle.attention)
    return objective


@torch.no_grad()
def evaluate_rows(cfg: Config, ctx, engine, rows: Rows, pad_id: int, objective, n_sources: int = 1) -> Evaluation:
    """Each source's rows evaluated (each rank takes every world_size-th row of them), and
    all of them together; a classifier's predictions counted too, and an objective's metrics
    (preference pairs': rewards and their accuracy) averaged."""
    model = engine.model
    was_training = model.training
    model.eval()
    groups = [rows.of_source(s) for s in range(n_sources)] if rows.source is not None else [range(len(rows))]
    head, sums = objective.head, []
    counts = np.zeros((len(cfg.classification.labels),) * 2) if isinstance(head, ClassifierHead) else None
    with autocast(cfg, ctx.device):
        for group in groups:
            sums.append(ctx.all_reduce_sum(loss_over(cfg, ctx, engine, rows, list(group), pad_id, objective, counts)))
    model.train(was_training)
    together = np.sum(sums, axis=0)
    if not together[1]:  # a loss over nothing reads 0: never a result (every rank has the same sums)
        raise UserError("the evaluation covers zero tokens (no eval row keeps a token the loss is on within "
                        f"data.max_length {cfg.data.max_length}): raise data.max_length or evaluate on other rows")
    by_source = [s[0] / s[1] if s[1] else None for s in sums] if len(groups) > 1 else []
    found = scores(ctx.all_reduce_sum(counts)) if counts is not None else \
        {m: v / max(together[1], 1) for m, v in zip(objective.metrics, together[2:])} or None
    return Evaluation(together[0] / max(together[1], 1), by_source, found)


def loss_over(cfg: Config, ctx, engine, rows: Rows, group: list[int], pad_id: int, objective,
              counts: Optional[np.ndarray] = None) -> np.ndarray:
    """This rank's [summed loss, count, objective's metric sums...] over its share of the rows
    `group`; a classifier's [true, predicted] counts added into `counts`."""
    mine = group[ctx.rank :: ctx.world_size]
    size = cfg.train.micro_batch_size
    # Every rank runs the same number of forward passes: under ZeRO-3 each one is collective.
    n_batches = math.ceil(math.ceil(len(group) / ctx.world_size) / size)
    sums = np.zeros(2 + len(objective.metrics))
    for i in range(n_batches):
        index = mine[i * size : (i + 1) * size]
        batch = collate(rows, index or [group[0]], pad_id)
        loss, metrics = objective.loss(engine.forward, batch, ctx.device)
        if index:  # a rank with no rows left runs one row and ignores it
            sums += (float(loss), objective.count(batch), *metrics)
            if counts is not None:
                counts += confusion(objective.head.logits, objective.head.labels, len(counts))
    return sums
