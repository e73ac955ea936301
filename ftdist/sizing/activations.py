"""What a forward pass keeps for the backward, counted on an empty (meta) model.

The model is run once on the meta device (shapes only, nothing allocated) under a
saved-tensors hook that records each distinct storage autograd keeps, parameters excluded:
exactly what this architecture, its freezing and its adapters (LoRA dropout included) save,
block by block. Attention is the one op whose saved tensors depend on the kernel a device
picks rather than on the model: the fused kernels that sdpa and flex attention use on CPU and
GPU keep query, key, value, output and the softmax's log-sum-exp, never the [seq x seq]
scores (the meta device would take sdpa's math path, which keeps them), so the trace stands in
such a kernel for them; for eager attention, which keeps the [seq x seq] probabilities, a
stand-in that keeps what it keeps (eager itself cannot run on meta tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ftdist.model.build import decoder_blocks

TRACE_ATTENTION = {"fused": "ftdist_fused_trace", "eager": "ftdist_eager_trace"}


@dataclass(frozen=True)
class SavedBytes:
    """Bytes autograd keeps from one forward pass, floating-point tensors in the compute dtype."""

    blocks: tuple[float, ...]  # per decoder block
    outside: float  # embeddings and the final norm
    block_input: float  # one block's input hidden states (what a checkpointed block keeps)


class KeptByAttention(torch.autograd.Function):
    """An attention's output, keeping for the backward what that kernel keeps."""

    @staticmethod
    def forward(ctx, query, key, value, eager: bool):
        out = torch.empty_like(query)
        if eager:  # scores and probabilities [batch, heads, seq, seq]; the grouped heads repeated
            heads = query.shape[1]
            key, value = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (key, value))
            probs = query.new_empty(*query.shape[:-1], key.shape[2])
            ctx.save_for_backward(query, key, value, probs)
        else:  # fused: the log-sum-exp of each query's scores, the shared heads as they are
            ctx.save_for_backward(query, key, value, out, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the trace never runs a backward pass
        raise NotImplementedError


def attention_trace(eager: bool):
    def attend(module, query, key, value, attention_mask, **kwargs):
        """transformers' attention interface: [batch, heads, seq, dim] in, [batch, seq, heads, dim] out."""
        return KeptByAttention.apply(query, key, value, eager).transpose(1, 2), None

    return attend


def register_trace_attention() -> None:
    from transformers import AttentionInterface

    for kind, name in TRACE_ATTENTION.items():
        AttentionInterface.register(name, attention_trace(kind == "eager"))


def saved_bytes(shell: nn.Module, batch: int, seq: int, attention: str = "sdpa",
                input_grads: bool = False, compute_bytes: int = 4) -> SavedBytes:
    """Trace `shell` (a meta model as the run trains it) on a [batch x seq] micro batch of one
    example per row; floating-point tensors count `compute_bytes` an element, others (masks,
    indices) their own size. `input_grads`: the input embeddings' output requires grad (as
    gradient checkpointing makes it under adapters). A model with real weights is traced as it is, with
    its own attention, on its own device (what the meta trace is checked against)."""
    base = shell.get_base_model() if hasattr(shell, "get_base_model") else shell
    config = base.config
    kept = config._attn_implementation
    device = next(shell.parameters()).device
    if device.type == "meta":
        register_trace_attention()
        config._attn_implementation = TRACE_ATTENTION["eager" if attention == "eager" else "fused"]
    parameters = {p.untyped_storage()._cdata for p in shell.parameters()}
    seen: set[int] = set()
    parts: dict[object, float] = {}
    where: list[object] = ["outside"]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in parameters and storage._cdata not in seen:
            seen.add(storage._cdata)
            size = storage.nbytes() * (compute_bytes / t.element_size() if t.is_floating_point() else 1)
            parts[where[0]] = parts.get(where[0], 0.0) + size
        return t

    _, blocks = decoder_blocks(shell)
    hooks = [block.register_forward_pre_hook(lambda _m, _a, i=i: where.__setitem__(0, i))
             for i, block in enumerate(blocks)]
    hooks.append(blocks[-1].register_forward_hook(lambda *_: where.__setitem__(0, "outside")))
    embeddings = base.get_input_embeddings()
    if input_grads:
        hooks.append(embeddings.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True)))
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    positions = torch.arange(seq, device=device).expand(batch, seq)
    was_training = shell.training
    shell.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            inner = getattr(base, base.base_model_prefix, base)
            inner(input_ids=ids, position_ids=positions, use_cache=False)
    finally:
        config._attn_implementation = kept
        shell.train(was_training)
        for hook in hooks:
            hook.remove()
    return SavedBytes(tuple(parts.get(i, 0.0) for i in range(len(blocks))), parts.get("outside", 0.0),
                      float(batch * seq * config.hidden_size * compute_bytes))
