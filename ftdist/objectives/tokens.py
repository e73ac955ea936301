"""The token-loss machinery every objective on the LM head shares: the forward pass in the
compute dtype, the LM head made to compute the summed cross-entropy (or each target token's
log-prob) chunk by chunk inside its own forward, and the loss of text through it.

The loss is computed inside the head's forward so that ZeRO-3 has the head's weight gathered
(DeepSpeed gathers a module's parameters for its forward); at most one chunk of
[tokens x vocab] logits is ever alive.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ftdist.config.schema import Config
from ftdist.data.rows import IGNORE
from ftdist.model.attention import document_mask
from ftdist.model.build import compute_dtype
from ftdist.objectives.chunks import chunk_tokens


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


class LogProbHead(ChunkedHead):
    """The LM head's forward, replaced: with targets pending, each target token's log-prob (in
    the flattened order of the targets); with text targets pending (retention text), the summed
    cross-entropy as ChunkedHead computes it; with none, the logits."""

    def __init__(self, head: nn.Linear, temperature: float = 1.0):
        super().__init__(head)
        self.text = False
        # Log-probs of the distribution sampled from (objective grpo's temperature), as the ratio needs.
        self.temperature = temperature

    def for_text(self) -> "TextLoss":
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
        bias = self.head.bias
        if self.temperature != 1.0:  # the logits divided by it
            hidden, bias = hidden / self.temperature, None if bias is None else bias / self.temperature
        return LinearLogProbs.apply(hidden, self.head.weight, bias, targets.index_select(0, keep), self.chunk)


def token_logps(forward, batch: dict, device: torch.device, head: LogProbHead, attention: str) -> torch.Tensor:
    """The model's log-prob of each target token of the batch (flattened order)."""
    head.expect(batch["targets"].to(device), batch["doc"])
    try:
        return forward(**forward_inputs(batch, device, attention)).logits
    finally:
        head.done()


class TextLoss:
    """A head whose targets are usually something else (labels, per-token log-probs) made to
    score text, as a loss head is asked to (its expect/done): retention text."""

    def __init__(self, head):
        self.head = head

    def expect(self, targets: torch.Tensor, doc: torch.Tensor) -> None:
        self.head.expect(targets, doc)
        self.head.text = True

    def done(self) -> None:
        self.head.done()


def text_head(head):
    """The head that scores text (retention): an objective's head as text, or the head itself
    (the chunked LM loss, or None: the loss from whole logits)."""
    return head.for_text() if hasattr(head, "for_text") else head


class TokenLoss:
    """Text scored by its summed cross-entropy over target tokens: what evaluation asks of an
    objective (ftdist.training.evaluate), for retention text and the sft objective alike."""

    step_metrics: tuple[str, ...] = ()
    evaluation_size = 0

    def __init__(self, head, attention: str):
        self.head, self.attention = head, attention

    @staticmethod
    def count(batch: dict) -> int:
        return target_count(batch)

    def loss(self, forward, batch: dict, device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
        return loss_sum(forward, batch, device, self.head, self.attention), np.zeros(0)

    def evaluation_sums(self, batch: dict) -> np.ndarray:
        return np.zeros(0)


def perplexity(loss: Optional[float]) -> Optional[float]:
    if loss is None:
        return None
    return math.exp(min(loss, 50.0))
