"""objective: dpo. Preference tuning on the one loop: a loss head and its metrics, as the
classifier is (ftdist.artifacts.classify).

A pair's rows (ftdist.data): its chosen and rejected sequences are documents 2j and 2j+1 of
one packed row, so a pair is always in one micro-batch, and the batch plan, Ray Data, the
caches and the engines are the causal LM's. The loss needs each sequence's summed log-prob of
its response tokens, under the policy and under the reference:

  policy     PairHead, in place of the LM head's forward (where ZeRO-3 has gathered its
             weight): each target token's log-prob, chunk by chunk, the logits recomputed in
             the backward pass rather than kept
  reference  auto: the same model with its adapters switched off (lora, qlora); a frozen copy
             of the starting model (full; under ZeRO-3 partitioned like the policy). Or, with
             dpo.precompute_reference, its log-probs computed once before training and kept
             beside the rows (no second model while training)

  sigmoid (DPO)  loss = -log sigmoid(beta * ((pc - rc) - (pr - rr)))
  ipo            loss = ((pc - rc) - (pr - rr) - 1 / (2 beta))^2, on mean (not summed) log-probs
                 (per response token, as TRL's IPO)
  rewards        beta * (policy - reference) of chosen and of rejected, summed log-probs; accuracy:
                 the share of pairs whose chosen reward is above the rejected one's; margin: their gap
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ftdist.config.schema import Config
from ftdist.data.rows import IGNORE, Rows, collate
from ftdist.objective import ChunkedHead, autocast, forward_inputs

# Per pair, summed over a micro-batch: what the log records and evaluations report, as means over pairs.
METRICS = ("rewards_chosen", "rewards_rejected", "reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected")


# ---------------------------------------------------------------- the policy's log-probs


class LinearLogProbs(torch.autograd.Function):
    """log_softmax(hidden @ weight.T + bias)[targets] per token, over chunks of tokens: at most
    one chunk of logits alive, in the forward and in the backward (which recomputes them)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int):
        out = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, len(targets), chunk):
                part = slice(start, start + chunk)
                logits = chunk_logits(hidden[part], weight, bias)
                out[part] = logits.gather(1, targets[part, None]).squeeze(1) - logits.logsumexp(-1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, d_out):
        hidden, weight, bias, targets = ctx.saved_tensors
        wants = ctx.needs_input_grad
        d_hidden = torch.empty_like(hidden) if wants[0] else None
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if wants[1] else None
        d_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
            if bias is not None and wants[2] else None
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, len(targets), ctx.chunk):
                part = slice(start, start + ctx.chunk)
                # d logp / d logits = onehot(target) - softmax, scaled by each token's incoming gradient
                d_logits = chunk_logits(hidden[part], weight, bias).softmax(-1).mul_(-d_out[part, None])
                d_logits.scatter_add_(1, targets[part, None], d_out[part, None].float())
                if d_bias is not None:
                    d_bias += d_logits.sum(0)
                if d_hidden is not None:
                    d_hidden[part] = (d_logits.to(hidden.dtype) @ weight.to(hidden.dtype))
                if d_weight is not None:
                    d_weight.addmm_(d_logits.t(), hidden[part].float())
        return (d_hidden, None if d_weight is None else d_weight.to(weight.dtype),
                None if d_bias is None else d_bias.to(bias.dtype), None, None)


def chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """One chunk's logits in float32, the matmul in the hidden states' dtype (the compute dtype)."""
    return F.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)).float()


class PairHead(ChunkedHead):
    """The LM head's forward, replaced: with targets pending, each target token's log-prob (in
    the flattened order of the targets); with text targets pending (retention text), the summed
    cross-entropy as ChunkedHead computes it; with none, the logits."""

    def __init__(self, head: nn.Linear):
        super().__init__(head)
        self.text = False

    def for_text(self):
        from ftdist.artifacts.classify import TextLoss

        return TextLoss(self)

    def done(self) -> None:
        super().done()
        self.text = False

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.targets is None or self.text:
            return super().forward(hidden)
        targets = self.targets.flatten()
        keep = (targets != IGNORE).nonzero().squeeze(1)
        hidden = hidden.flatten(0, -2).index_select(0, keep)
        return LinearLogProbs.apply(hidden, self.head.weight, self.head.bias, targets.index_select(0, keep),
                                    self.chunk)


def token_logps(forward, batch: dict, device: torch.device, head: PairHead, attention: str) -> torch.Tensor:
    """The model's log-prob of each target token of the batch (flattened order)."""
    head.expect(batch["targets"].to(device), batch["doc"])
    try:
        return forward(**forward_inputs(batch, device, attention)).logits
    finally:
        head.done()


# ---------------------------------------------------------------- pairs


def pair_sums(batch: dict, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair of the batch, [chosen, rejected] sums of per-target-token `values` (flattened
    order), and their target counts: both [pairs, 2], pairs in row order."""
    targets, doc = batch["targets"].flatten(), batch["doc"]
    keep = (targets != IGNORE).nonzero().squeeze(1).to(values.device)
    docs = doc.flatten().to(values.device).index_select(0, keep)
    rows = keep // doc.shape[1]
    key = rows * (int(doc.max()) + 2) + docs // 2  # one key per (row, pair in the row)
    _, pair = torch.unique(key, return_inverse=True)
    n = int(pair.max()) + 1 if len(pair) else 0
    side = docs % 2  # a pair's chosen is its even document
    sums = torch.zeros(n, 2, dtype=values.dtype, device=values.device).index_put((pair, side), values,
                                                                                 accumulate=True)
    counts = torch.zeros(n, 2, dtype=torch.float32, device=values.device).index_put(
        (pair, side), torch.ones_like(values, dtype=torch.float32), accumulate=True)
    return sums, counts


def pair_count(batch: dict) -> int:
    """The preference pairs in a batch (each row's documents, two to a pair)."""
    return int(sum((int(d.max()) + 1) // 2 for d in batch["doc"] if int(d.max()) >= 0))


def dpo_losses(policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, beta: float,
               kind: str) -> tuple[torch.Tensor, dict]:
    """Per pair, the loss and the metrics (detached). `policy`, `reference`: [pairs, 2] summed
    log-probs of chosen and rejected; `counts`: their response tokens (ipo compares means)."""
    chosen, rejected = policy[:, 0] - reference[:, 0], policy[:, 1] - reference[:, 1]
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen - rejected))
    else:
        losses = (chosen / counts[:, 0] - rejected / counts[:, 1] - 1 / (2 * beta)) ** 2
    rewards_chosen, rewards_rejected = beta * chosen.detach(), beta * rejected.detach()
    return losses, {"rewards_chosen": rewards_chosen, "rewards_rejected": rewards_rejected,
                    "reward_accuracy": (rewards_chosen > rewards_rejected).float(),
                    "reward_margin": rewards_chosen - rewards_rejected,
                    "logps_chosen": policy[:, 0].detach(), "logps_rejected": policy[:, 1].detach()}


# ---------------------------------------------------------------- the reference


class AdaptersOff:
    """The reference of an adapter run: the policy itself with its adapters switched off."""

    def __init__(self, peft_model, forward, head: PairHead, attention: str):
        self.peft_model, self.forward, self.head, self.attention = peft_model, forward, head, attention

    @torch.no_grad()
    def logps(self, batch: dict, device: torch.device) -> torch.Tensor:
        with self.peft_model.disable_adapter():
            return token_logps(self.forward, batch, device, self.head, self.attention)


class ModelReference:
    """The reference as a model's forward without gradients: a full run's frozen copy of the
    starting model (with its own PairHead), or, precomputing, the policy as it starts."""

    def __init__(self, forward, head: PairHead, attention: str):
        self.forward, self.head, self.attention = forward, head, attention

    @torch.no_grad()
    def logps(self, batch: dict, device: torch.device) -> torch.Tensor:
        return token_logps(self.forward, batch, device, self.head, self.attention)


class Precomputed:
    """dpo.precompute_reference: the reference's log-probs computed before training, per token
    (the rows' "ref" column, which collate stacks as batch["ref"])."""

    @staticmethod
    def logps(batch: dict, device: torch.device) -> torch.Tensor:
        keep = (batch["targets"].flatten() != IGNORE).nonzero().squeeze(1)
        return batch["ref"].flatten().index_select(0, keep).to(device)


def frozen_reference(cfg: Config, model: nn.Module, dtype: torch.dtype) -> Optional[tuple[nn.Module, PairHead]]:
    """A full dpo run's reference: the starting model, copied and frozen (in the compute dtype
    `dtype`: it never trains), and its own loss head. None where there is none to hold: not
    dpo, adapters (switched off, they are the reference), or log-probs precomputed."""
    if cfg.objective != "dpo" or cfg.method != "full" or cfg.dpo.precompute_reference:
        return None
    import copy

    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    reference.eval()
    if dtype != torch.float32:
        reference.to(dtype)
    return reference, PairHead(reference.get_output_embeddings())


def as_it_starts(cfg: Config, bundle, engine):
    """The policy before its first step, which is the reference: its adapters (zero at the
    start) switched off, or a full model's own forward."""
    if cfg.method == "full":
        return ModelReference(engine.forward, bundle.head, bundle.attention)
    return AdaptersOff(engine.model, engine.forward, bundle.head, bundle.attention)


@torch.no_grad()
def precompute(cfg: Config, ctx, reference, rows: Optional[Rows], pad_id: int, collective_batches: int) -> None:
    """The reference's log-prob of every target token of `rows`, as their "ref" column.
    `collective_batches`: the forward passes every rank runs (under ZeRO-3 each is
    collective); a rank with fewer batches runs its first again, and ignores it."""
    if rows is None:
        return
    size = cfg.train.micro_batch_size
    ref = np.zeros(len(rows.flat["targets"]), np.float32)
    with autocast(cfg, ctx.device):
        for i in range(collective_batches):
            index = list(range(i * size, min((i + 1) * size, len(rows))))
            batch = collate(rows, index or [0], pad_id)
            values = reference.logps(batch, ctx.device).float().cpu().numpy()
            if not index:
                continue
            # Back to each row's flat tokens: the targets' places, row by row, in collate's order.
            places = np.concatenate([rows.offsets[i] + np.flatnonzero(rows.row("targets", i) != IGNORE)
                                     for i in index])
            ref[places] = values
    rows.flat["ref"] = ref


def batches_of(rows: Optional[Rows], size: int) -> int:
    return math.ceil(len(rows) / size) if rows is not None else 0


# ---------------------------------------------------------------- the objective


class PreferenceObjective:
    """What the loop's step and evaluation ask of an objective, for preference pairs: the count
    a batch's loss is normalised by (its pairs), and a micro-batch's summed loss with its
    metric sums."""

    metrics = METRICS

    def __init__(self, cfg: Config, head: PairHead, reference, attention: str):
        self.beta, self.kind = cfg.dpo.beta, cfg.dpo.loss
        self.head, self.reference, self.attention = head, reference, attention

    count = staticmethod(pair_count)

    def loss(self, forward, batch: dict, device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
        """The summed loss of the batch's pairs (to backpropagate), and the metric sums
        (METRICS' order)."""
        policy = token_logps(forward, batch, device, self.head, self.attention)
        reference = self.reference.logps(batch, device)
        policy_sums, counts = pair_sums(batch, policy)
        reference_sums, _ = pair_sums(batch, reference.to(policy.dtype))
        losses, metrics = dpo_losses(policy_sums, reference_sums, counts, self.beta, self.kind)
        return losses.sum() + policy.sum() * 0.0, np.array([float(metrics[m].sum()) for m in METRICS])


def describe(scores: dict) -> str:
    """An evaluation's preference figures, for the terminal."""
    return (f", reward accuracy {scores['reward_accuracy']:.3f}, margin {scores['reward_margin']:+.4f} "
            f"(chosen {scores['rewards_chosen']:+.4f}, rejected {scores['rewards_rejected']:+.4f})")


def preference_reference(cfg: Config, ctx, bundle, engine, data, frozen: Optional[tuple[nn.Module, PairHead]]):
    """The reference the objective compares with (dpo.reference auto): adapters off for an
    adapter run, else the frozen copy `frozen` (made before the engine took the model), as this
    rank runs it (ctx.make_reference: partitioned under ZeRO-3). With precompute_reference, its
    log-probs of every pair of this rank's rows computed now, by the model as it starts (which
    is the reference), before a checkpoint is restored into it."""
    if frozen is not None:
        model, head = frozen
        return ModelReference(ctx.make_reference(cfg, model), head, bundle.attention)
    if not cfg.dpo.precompute_reference:
        return as_it_starts(cfg, bundle, engine)
    reference, size = as_it_starts(cfg, bundle, engine), cfg.train.micro_batch_size
    engine.model.eval()
    for rows in (data.train, data.eval):  # every rank runs as many batches as the rank with most
        ranks = np.zeros(ctx.world_size)
        ranks[ctx.rank] = batches_of(rows, size)
        precompute(cfg, ctx, reference, rows, bundle.tokenizer.pad_token_id, int(ctx.all_reduce_sum(ranks).max()))
    engine.model.train()
    return Precomputed()

