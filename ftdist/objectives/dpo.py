"""objective: dpo. Preference tuning on the one loop: a loss head and its metrics, as the
classifier is (ftdist.objectives.classification).

A pair's rows (ftdist.data): its chosen and rejected sequences are documents 2j and 2j+1 of
one packed row, so a pair is always in one micro-batch, and the batch plan, Ray Data, the
caches and the engines are the causal LM's. The loss needs each sequence's summed log-prob of
its response tokens, under the policy and under the reference:

  policy     LogProbHead (ftdist.objectives.tokens), in place of the LM head's forward (where ZeRO-3 has gathered its
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
from typing import TYPE_CHECKING, Optional

from ftdist.objectives.base import ObjectiveBase
from ftdist.objectives.chunks import chunk_logit_bytes

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from ftdist.config.schema import Config
    from ftdist.data.rows import Rows
    from ftdist.objectives.tokens import LogProbHead

# Per pair, summed over a micro-batch: what the log records and evaluations report, as means
# over pairs; and which way each is better.
METRICS = {"rewards_chosen": "max", "rewards_rejected": "min", "reward_accuracy": "max", "reward_margin": "max",
           "logps_chosen": "max", "logps_rejected": "min"}


# ---------------------------------------------------------------- pairs


def pair_sums(batch: dict, values: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Per pair of the batch, [chosen, rejected] sums of per-target-token `values` (flattened
    order), and their target counts: both [pairs, 2], pairs in row order."""
    import torch

    from ftdist.data.rows import IGNORE

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


def dpo_losses(policy: "torch.Tensor", reference: "torch.Tensor", counts: "torch.Tensor", beta: float,
               kind: str) -> tuple["torch.Tensor", dict]:
    """Per pair, the loss and the metrics (detached). `policy`, `reference`: [pairs, 2] summed
    log-probs of chosen and rejected; `counts`: their response tokens (ipo compares means)."""
    import torch.nn.functional as F

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

    def __init__(self, peft_model, forward, head: "LogProbHead", attention: str):
        self.peft_model, self.forward, self.head, self.attention = peft_model, forward, head, attention

    def logps(self, batch: dict, device: "torch.device") -> "torch.Tensor":
        import torch

        from ftdist.objectives.tokens import token_logps

        with torch.no_grad(), self.peft_model.disable_adapter():
            return token_logps(self.forward, batch, device, self.head, self.attention)


class ModelReference:
    """The reference as a model's forward without gradients: a full run's frozen copy of the
    starting model (with its own LogProbHead), or, precomputing, the policy as it starts."""

    def __init__(self, forward, head: "LogProbHead", attention: str):
        self.forward, self.head, self.attention = forward, head, attention

    def logps(self, batch: dict, device: "torch.device") -> "torch.Tensor":
        import torch

        from ftdist.objectives.tokens import token_logps

        with torch.no_grad():
            return token_logps(self.forward, batch, device, self.head, self.attention)


class Precomputed:
    """dpo.precompute_reference: the reference's log-probs computed before training, per token
    (the rows' "ref" column, which collate stacks as batch["ref"])."""

    @staticmethod
    def logps(batch: dict, device: "torch.device") -> "torch.Tensor":
        from ftdist.data.rows import IGNORE

        keep = (batch["targets"].flatten() != IGNORE).nonzero().squeeze(1)
        return batch["ref"].flatten().index_select(0, keep).to(device)


def holds_copy(cfg: "Config") -> bool:
    """Whether the reference is a frozen copy of the model: a full run's, unless its log-probs
    are precomputed (adapters switched off are an adapter run's reference)."""
    return cfg.method == "full" and not cfg.dpo.precompute_reference


def frozen_reference(model: "nn.Module", dtype: "torch.dtype") -> tuple["nn.Module", "LogProbHead"]:
    """A full run's reference: the starting model, copied and frozen (in the compute dtype
    `dtype`: it never trains), and its own loss head."""
    import copy

    import torch

    from ftdist.objectives.tokens import LogProbHead

    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    reference.eval()
    if dtype != torch.float32:
        reference.to(dtype)
    return reference, LogProbHead(reference.get_output_embeddings())


def as_it_starts(cfg: "Config", head: "LogProbHead", attention: str, engine):
    """The policy before its first step, which is the reference: its adapters (zero at the
    start) switched off, or a full model's own forward."""
    if cfg.method == "full":
        return ModelReference(engine.forward, head, attention)
    return AdaptersOff(engine.model, engine.forward, head, attention)


def precompute(cfg: "Config", ctx, reference, rows: Optional["Rows"], pad_id: int, collective_batches: int) -> None:
    """The reference's log-prob of every target token of `rows`, as their "ref" column.
    `collective_batches`: the forward passes every rank runs (under ZeRO-3 each is
    collective); a rank with fewer batches runs its first again, and ignores it."""
    import numpy as np
    import torch

    from ftdist.data.rows import IGNORE, collate
    from ftdist.objectives.tokens import autocast

    if rows is None:
        return
    size = cfg.train.micro_batch_size
    ref = np.zeros(len(rows.flat["targets"]), np.float32)
    with torch.no_grad(), autocast(cfg, ctx.device):
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


def batches_of(rows: Optional["Rows"], size: int) -> int:
    return math.ceil(len(rows) / size) if rows is not None else 0


# ---------------------------------------------------------------- the objective


class Dpo(ObjectiveBase):
    """Preference pairs: the count a batch's loss is normalised by (its pairs), a micro-batch's
    summed loss with its metric sums, against a reference (dpo.reference)."""

    name = "dpo"
    section = "dpo"
    rows = "pairs"
    formats = ("preference",)
    metrics = {"eval_loss": "min", **{f"eval_{m}": better for m, better in METRICS.items()}}
    step_metrics = tuple(METRICS)
    told = ("reward_accuracy", "reward_margin")
    transfer = ("eval_loss",)

    def __init__(self, cfg: "Config", args=None):
        super().__init__(cfg, args)
        self.beta, self.kind = cfg.dpo.beta, cfg.dpo.loss
        self.reference = None
        self.frozen: Optional[tuple] = None  # a full run's frozen copy, until start() hands it over

    def make_head(self, model: "nn.Module") -> "LogProbHead":
        """Each response token's log-prob, in chunks (whatever train.chunked_loss says)."""
        from ftdist.model.build import plain_linear_head
        from ftdist.objectives.tokens import LogProbHead

        self.attention = model.config._attn_implementation
        self.head = LogProbHead(plain_linear_head(model, "objective dpo", "objective dpo computes log-probs through "
                                                                        "it in chunks: use a model whose head is"))
        return self.head

    def before_engine(self, model: "nn.Module", dtype: "torch.dtype") -> None:
        """A full run's reference: the starting model, copied before the engine takes it."""
        if holds_copy(self.cfg):
            self.frozen = frozen_reference(model, dtype)

    def start(self, ctx, bundle, engine, data) -> None:
        """The reference the loss compares with (dpo.reference auto), built before a checkpoint
        is restored: the frozen copy as this rank runs it (ctx.make_reference: partitioned under
        ZeRO-3), or adapters off for an adapter run. With precompute_reference, its log-probs of
        every pair of this rank's rows computed now, by the model as it starts (which is the
        reference)."""
        import numpy as np

        cfg = self.cfg
        if self.frozen is not None:
            model, head = self.frozen
            self.frozen = None
            self.reference = ModelReference(ctx.make_reference(cfg, model), head, self.attention)
            return
        reference = as_it_starts(cfg, self.head, self.attention, engine)
        if not cfg.dpo.precompute_reference:
            self.reference = reference
            return
        size = cfg.train.micro_batch_size
        engine.model.eval()
        for rows in (data.train, data.eval):  # every rank runs as many batches as the rank with most
            ranks = np.zeros(ctx.world_size)
            ranks[ctx.rank] = batches_of(rows, size)
            precompute(cfg, ctx, reference, rows, bundle.tokenizer.pad_token_id, int(ctx.all_reduce_sum(ranks).max()))
        engine.model.train()
        self.reference = Precomputed()

    def count(self, batch: dict) -> int:
        return pair_count(batch)

    def loss(self, forward, batch: dict, device: "torch.device") -> tuple["torch.Tensor", "np.ndarray"]:
        """The summed loss of the batch's pairs (to backpropagate), and the metric sums
        (step_metrics' order)."""
        import numpy as np

        from ftdist.objectives.tokens import token_logps

        policy = token_logps(forward, batch, device, self.head, self.attention)
        reference = self.reference.logps(batch, device)
        policy_sums, counts = pair_sums(batch, policy)
        reference_sums, _ = pair_sums(batch, reference.to(policy.dtype))
        losses, metrics = dpo_losses(policy_sums, reference_sums, counts, self.beta, self.kind)
        return losses.sum() + policy.sum() * 0.0, np.array([float(metrics[m].sum()) for m in self.step_metrics])

    def describe(self, scores: dict) -> str:
        return (f", reward accuracy {scores['eval_reward_accuracy']:.3f}, margin {scores['eval_reward_margin']:+.4f} "
                f"(chosen {scores['eval_rewards_chosen']:+.4f}, rejected {scores['eval_rewards_rejected']:+.4f})")

    def logits_bytes(self, tokens: int, vocab: int, dtype_bytes: int) -> float:
        """One chunk's logits in fp32 and their softmax, always in chunks."""
        return chunk_logit_bytes(tokens, vocab, dtype_bytes)

    def reference_bytes(self, total_params: int, weight_bytes: int) -> float:
        """A full run's frozen copy in the compute dtype (adapter runs switch their adapters off
        instead; precomputed log-probs live in host memory beside the rows)."""
        return total_params * weight_bytes if holds_copy(self.cfg) else 0.0
