"""Attention over packed rows: each example sees only itself, by the backend's own mask.

A packed row holds several examples; `doc` ids per token (-1 for padding) say which. The
dense mask ([batch, 1, seq, seq] booleans) works with every backend but keeps SDPA off its
fastest kernels; flex attention takes a block mask instead, computed from the same ids, and
skips the blocks that are masked out entirely. A batch of single unpadded examples needs no
mask at all: plain causal attention, the fastest path of every backend.
"""

from __future__ import annotations

from typing import Optional

import torch

from ftdist.errors import UserError

# model.attention -> transformers' attn_implementation
IMPLEMENTATIONS = {"sdpa": "sdpa", "flex": "flex_attention", "eager": "eager"}


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except ImportError:
        return False
    return True


def supports_flex(model_config) -> bool:
    from transformers import AutoModelForCausalLM

    model_class = AutoModelForCausalLM._model_mapping.get(type(model_config), None)
    return bool(model_class is not None and getattr(model_class, "_supports_flex_attn", False))


def implementation(choice: str, model_config, device: torch.device) -> str:
    """The attn_implementation a training run loads its model with."""
    if choice == "auto":
        flex = device.type == "cuda" and flex_available() and supports_flex(model_config)
        return IMPLEMENTATIONS["flex" if flex else "sdpa"]
    if choice == "flex":
        if not flex_available():
            raise UserError(f"model.attention: flex needs torch.nn.attention.flex_attention, which torch "
                            f"{torch.__version__} lacks; use model.attention: sdpa")
        if not supports_flex(model_config):
            raise UserError(f"model.attention: {model_config.model_type} models do not support flex attention "
                            "in this transformers; use model.attention: sdpa")
        if device.type == "cpu":
            raise UserError("model.attention: flex attention has no backward pass on CPU; use model.attention: "
                            "auto (sdpa on CPU, flex on a GPU) or sdpa")
    return IMPLEMENTATIONS[choice]


def document_mask(doc: torch.Tensor, attn_implementation: str, device: Optional[torch.device] = None):
    """The mask, on `device`, that keeps the examples of each row (doc ids, -1 padding) apart,
    causal within each; None where every row is one example without padding (plain causal
    attention). The ids come from the host: the check reads them there, never syncing a GPU."""
    if bool((doc == 0).all()):
        return None
    doc = doc.to(device) if device is not None else doc
    if attn_implementation == "flex_attention":
        return block_mask(doc)
    length = doc.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=doc.device).tril()
    allowed = ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]
    if attn_implementation == "eager":  # eager attention adds its mask to the scores
        return torch.zeros(allowed.shape, device=doc.device).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return allowed


def block_mask(doc: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    def same_example_causal(b, h, q, kv):
        return (doc[b, q] == doc[b, kv]) & (q >= kv)

    batch, length = doc.shape
    return create_block_mask(same_example_causal, batch, None, length, length, device=doc.device)
