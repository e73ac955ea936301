"""How much memory a run needs per device, before any weight is loaded.

Counts come from an empty (meta) copy of the model with the run's freezing applied;
bytes follow how ZeRO partitions training state over N workers:

  stage 0: every device holds weights, gradients and optimizer states
  stage 1: optimizer states / N        stage 2: + gradients / N        stage 3: + weights / N
  offload_optimizer / offload_params: those states live in host memory instead

Activations use the per-layer estimate of Korthikanti et al. (2022), s*b*h*(34 + 5*a*s/h)
bytes at 16 bits, scaled to the compute dtype (a checkpointed block keeps only its input),
plus the logits and their gradient (whole, or one chunk with train.chunked_loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ftdist.config import Config

GiB = 2**30
ADAM_STATE_BYTES = 8  # two fp32 moments per trainable parameter
FROZEN_BYTES_4BIT = 0.5 + 0.06  # NF4 plus (double-quantised) block constants


@dataclass
class MemoryEstimate:
    total_params: int
    trainable_params: int
    weights: float  # bytes per device
    gradients: float
    optimizer: float
    activations: float
    host: float  # bytes per worker offloaded to CPU memory

    @property
    def device_total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GiB:.2f}" for name, value in (
            ("weights", self.weights), ("gradients", self.gradients), ("optimizer", self.optimizer),
            ("activations", self.activations)))
        host = f" (+{self.host / GiB:.2f} GiB offloaded to host memory)" if self.host else ""
        return f"{parts} = {self.device_total / GiB:.2f} GiB per device{host}"


def count_trainable(cfg: Config, shell: nn.Module) -> int:
    """Trainable parameters of the run, from the meta model (nothing is allocated)."""
    from ftdist.model import decoder_blocks, freeze_full, linear_names, n_frozen_blocks

    if cfg.method == "full":
        freeze_full(shell, cfg)
        return sum(p.numel() for p in shell.parameters() if p.requires_grad)
    _, blocks = decoder_blocks(shell)
    names = set(linear_names(blocks)) if cfg.lora.target_modules == "all-linear" else set(cfg.lora.target_modules)
    first = n_frozen_blocks(cfg, len(blocks))
    return sum(cfg.lora.rank * (m.in_features + m.out_features)
               for block in blocks[first:] for name, m in block.named_modules()
               if isinstance(m, nn.Linear) and name.split(".")[-1] in names)


def activation_bytes(cfg: Config, model_config, dtype_bytes: int) -> float:
    """What the forward pass keeps for the backward: per block, all its activations, or only its
    input when it is checkpointed (plus one block recomputed at a time); and the logits with
    their gradient in fp32, whole or one chunk of tokens (train.chunked_loss)."""
    from ftdist.objective import chunk_tokens

    s, b = cfg.data.max_length, cfg.train.micro_batch_size
    h, layers, heads = model_config.hidden_size, model_config.num_hidden_layers, model_config.num_attention_heads
    per_layer = s * b * h * (34 + 5 * heads * s / h) * dtype_bytes / 2
    every = cfg.train.checkpoint_every
    checkpointed = len(range(0, layers, every)) if every else 0
    blocks = (layers - checkpointed) * per_layer + checkpointed * s * b * h * 4 + (per_layer if checkpointed else 0)
    tokens = min(s * b, chunk_tokens(model_config.vocab_size)) if cfg.train.chunked_loss else s * b
    return blocks + 2 * tokens * model_config.vocab_size * 4


def estimate(cfg: Config, model_config, workers: int = 1, zero_stage: int = 0,
             dtype: torch.dtype = torch.float32) -> MemoryEstimate:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        shell = AutoModelForCausalLM.from_config(model_config)
    shell.tie_weights()  # from_config on the meta device leaves tied embeddings as two tensors
    total = sum(p.numel() for p in shell.parameters())
    trainable = count_trainable(cfg, shell)
    n = max(workers, 1)
    d = cfg.distributed
    weight_bytes = torch.finfo(dtype).bits // 8 if cfg.method != "qlora" else FROZEN_BYTES_4BIT
    # Trainable weights are held in fp32 (our master copy); a frozen base in the load dtype.
    weights = (total - trainable) * weight_bytes + trainable * 4
    gradients = trainable * 4
    optimizer = trainable * ADAM_STATE_BYTES
    if zero_stage >= 1:
        optimizer /= n
    if zero_stage >= 2:
        gradients /= n
    if zero_stage >= 3:
        weights /= n
    host = 0.0
    if zero_stage >= 1 and d.offload_optimizer == "cpu":
        host, optimizer = host + optimizer, 0.0
    if zero_stage == 3 and d.offload_params == "cpu":
        host, weights = host + weights, 0.0
    act_dtype = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    return MemoryEstimate(total, trainable, weights, gradients, optimizer,
                          activation_bytes(cfg, model_config, act_dtype), host)


def advice(cfg: Config, model_config, est: MemoryEstimate, workers: int, dtype: torch.dtype,
           available: float) -> list[str]:
    """What would make the run fit (`est`: its estimate as configured), tried in the order a
    user would reach for them."""
    tips = []
    if cfg.train.checkpoint_every != 1 and est.activations > est.device_total / 2:
        tips.append("set train.gradient_checkpointing: true (activations are most of it)")
    if not cfg.train.chunked_loss:
        tips.append("set train.chunked_loss: true (the logits are never held whole)")
    for stage in range(cfg.distributed.zero_stage + 1, 4):
        if cfg.method == "qlora" and stage == 3:
            break
        if workers > 1 and estimate(cfg, model_config, workers, stage, dtype).device_total <= available:
            tips.append(f"raise distributed.zero_stage to {stage}")
            break
    if cfg.distributed.zero_stage >= 1 and cfg.distributed.offload_optimizer == "none" and \
            est.optimizer > est.device_total / 10:
        tips.append("set distributed.offload_optimizer: cpu")
    if cfg.train.micro_batch_size > 1:
        tips.append("lower train.micro_batch_size (the global batch stays the same)")
    if cfg.method != "qlora":
        tips.append("use method: qlora (a 4-bit frozen base with LoRA adapters)")
    if workers <= 1 or cfg.distributed.zero_stage < 3:
        tips.append("use more distributed.workers with distributed.zero_stage 3" if cfg.method != "qlora"
                    else "use a smaller model")
    return tips


class PeakMemory:
    """The most memory this process has used for training on its device, since it was made
    (before the model is built). GPU: the allocator's peak (torch.cuda.max_memory_allocated),
    which is what the estimate counts. CPU: the process's peak resident set (getrusage's
    ru_maxrss, the kernel's high-water mark) less its resident set when the meter was made
    (the interpreter and the libraries already imported)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.before = 0.0
        else:
            import psutil

            self.before = float(psutil.Process().memory_info().rss)

    def bytes(self) -> float:
        if self.device.type == "cuda":
            return float(torch.cuda.max_memory_allocated(self.device))
        import resource

        return max(0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.before)

    def gib(self) -> float:
        return round(self.bytes() / GiB, 3)
