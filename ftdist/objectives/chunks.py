"""The chunked loss's sizes: how many target tokens a chunk of logits holds, and the bytes it
takes. Arithmetic, torch-free: the memory estimate asks it before anything heavy loads."""

from __future__ import annotations

# Logits per chunk of a chunked loss: 128 MiB in fp32 whatever the vocabulary (256 tokens at
# 128k entries, 1024 at 32k). Here, torch-free: the memory estimate reads it too.
CHUNK_LOGITS = 2**25


def chunk_tokens(vocab_size: int) -> int:
    return max(16, CHUNK_LOGITS // vocab_size)


def chunk_logit_bytes(tokens: int, vocab: int, dtype_bytes: int) -> float:
    """One chunk's logits in fp32, and their copy in a 16-bit compute dtype."""
    return min(tokens, chunk_tokens(vocab)) * vocab * (4 + (dtype_bytes if dtype_bytes < 4 else 0))
