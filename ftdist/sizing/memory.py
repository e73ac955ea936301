"""How much memory a run needs per device, before any weight is loaded.

Counts come from an empty (meta) copy of the model with the run's freezing applied;
bytes follow how the run's engine divides training state over N workers (its Sharding,
ftdist/engines: e.g. DeepSpeed's ZeRO-1 divides optimizer states by N, ZeRO-2 also gradients,
ZeRO-3 also weights; the plain engine holds all of them whole on every device), and which
states it keeps in host memory instead (offloaded).
  regularization.l2sp / ewc: an fp32 anchor (and with EWC a Fisher value) per trained weight,
  divided and offloaded as the optimizer states are (a rank keeps its own share)

Activations are what autograd saves, traced on the same empty model (ftdist.sizing.activations),
floating-point tensors in the compute dtype (a checkpointed block keeps only its input), plus
the logits in fp32: all of them and their gradient, or one chunk (train.chunked_loss).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from ftdist.config.schema import Config
from ftdist.engines.registry import engine_class
from ftdist.model.build import add_adapters, freeze_full
from ftdist.objectives.registry import resolve
from ftdist.sizing.activations import saved_bytes

if TYPE_CHECKING:
    from ftdist.engines.base import Sharding

GiB = 2**30
ADAM_STATE_BYTES = 8  # two fp32 moments per trainable parameter
FROZEN_BYTES_4BIT = 0.5 + 0.06  # NF4 plus (double-quantised) block constants
# On a GPU the caching allocator holds more than the tensors it hands out (split and cached
# blocks), and the CUDA context and communication buffers lie outside it: a run is planned to
# use at most this share of a device's memory.
GPU_USABLE = 0.9


def usable(available: float, device_type: str) -> float:
    """Of `available` bytes on a device, how many a run is planned to fill."""
    return available * GPU_USABLE if device_type == "cuda" else available


@dataclass
class MemoryEstimate:
    total_params: int
    trainable_params: int
    weights: float  # bytes per device
    gradients: float
    optimizer: float
    activations: float
    host: float  # bytes per worker offloaded to CPU memory
    anchors: float = 0.0  # L2-SP / EWC state
    reference: float = 0.0  # a model the objective holds beside (dpo's frozen reference of a full run)

    @property
    def device_total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.anchors + self.reference + self.activations

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GiB:.2f}" for name, value in (
            ("weights", self.weights), ("gradients", self.gradients), ("optimizer", self.optimizer),
            *((("anchors", self.anchors),) if self.anchors else ()),
            *((("reference", self.reference),) if self.reference else ()), ("activations", self.activations)))
        host = f" (+{self.host / GiB:.2f} GiB offloaded to host memory)" if self.host else ""
        return f"{parts} = {self.device_total / GiB:.2f} GiB per device{host}"


def run_shell(cfg: Config, model_config) -> nn.Module:
    """An empty (meta) copy of the model as the run trains it: freezing applied, adapters added."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        shell = AutoModelForCausalLM.from_config(model_config, trust_remote_code=cfg.model.trust_remote_code)
    shell.tie_weights()  # from_config on the meta device leaves tied embeddings as two tensors
    objective = resolve(cfg)
    objective.prepare_model(shell)  # its own modules (labels unknown before the data is read: a few)
    if cfg.method == "full":
        freeze_full(shell, cfg, objective.own_modules)
        return shell
    return add_adapters(shell, cfg, objective.own_modules)[0]


def activation_bytes(cfg: Config, model_config, shell: nn.Module, dtype_bytes: int, device_type: str) -> float:
    """What the forward pass keeps for the backward: per block what the trace of the empty
    model saves (ftdist.sizing.activations), or only its input when it is checkpointed, plus one
    checkpointed block recomputed at a time; and what the objective's loss holds of the logits
    (ftdist.objectives: with train.chunked_loss one chunk in fp32, else all of them with their
    gradient; a classifier's, none to speak of). An objective that samples (grpo) trains on
    sequences_per_row sequences per row, and holds its sampling's KV cache and logits at
    another moment: the larger of the two counts."""
    objective = resolve(cfg)
    s, b = cfg.row_length, cfg.train.micro_batch_size * objective.sequences_per_row
    every = cfg.train.checkpoint_every
    traced = saved_bytes(shell, b, s, "eager" if cfg.model.attention == "eager" else "sdpa", input_grads=bool(every),
                         compute_bytes=dtype_bytes)
    per_block = list(traced.blocks)
    if device_type == "cpu" and cfg.model.attention != "eager" and (cfg.data.packing or b > 1):
        # sdpa's CPU kernel keeps its own float copy of the document mask, in every block.
        per_block = [x + b * s * s * 4 for x in per_block]
    checkpointed = set(range(0, len(per_block), every)) if every else set()
    kept = sum(traced.block_input if i in checkpointed else x for i, x in enumerate(per_block))
    recomputed = max((per_block[i] for i in checkpointed), default=0.0)
    blocks = kept + recomputed + traced.outside
    return max(blocks + objective.logits_bytes(s * b, model_config.vocab_size, dtype_bytes),
               objective.generation_bytes(model_config, dtype_bytes))


def state_bytes(cfg: Config, total: int, trainable: int, workers: int, sharding: "Sharding",
                dtype: torch.dtype) -> dict[str, float]:
    """Weights, gradients and optimizer states per device, and what is offloaded to the host,
    as the engine's `sharding` divides them over `workers`."""
    n = max(workers, 1)
    weight_bytes = torch.finfo(dtype).bits // 8 if cfg.method != "qlora" else FROZEN_BYTES_4BIT
    # Trainable weights are held in fp32 (our master copy); a frozen base in the load dtype.
    weights = (total - trainable) * weight_bytes + trainable * 4
    gradients = trainable * 4
    optimizer = trainable * ADAM_STATE_BYTES
    r = cfg.regularization
    anchors = trainable * 4 * ((1 if r.anchored else 0) + (1 if r.ewc is not None else 0))
    # A model the objective holds beside the one that trains (dpo's frozen reference of a full run).

    reference = resolve(cfg).reference_bytes(total, torch.finfo(dtype).bits // 8)
    if sharding.optimizer:  # on the master weights' partitions
        optimizer /= n
        anchors /= n
    if sharding.gradients:
        gradients /= n
    if sharding.weights:  # the reference is partitioned like the policy
        weights /= n
        reference /= n
    host = 0.0
    if sharding.optimizer_on_host:
        host, optimizer, anchors = host + optimizer + anchors, 0.0, 0.0
    if sharding.weights_on_host:
        host, weights, reference = host + weights + reference, 0.0, 0.0
    return {"weights": weights, "gradients": gradients, "optimizer": optimizer, "anchors": anchors,
            "reference": reference, "host": host}


def estimate(cfg: Config, model_config, workers: int = 1, engine: str = "plain",
             dtype: torch.dtype = torch.float32, device_type: str = "cuda") -> MemoryEstimate:
    """Per device, on `workers` devices of the named engine (ftdist.engines)."""
    sharding = engine_class(engine).sharding(cfg, workers)
    shell = run_shell(cfg, model_config)
    total = sum(p.numel() for p in shell.parameters())
    trainable = sum(p.numel() for p in shell.parameters() if p.requires_grad)
    act_dtype = 2 if dtype in (torch.bfloat16, torch.float16) else 4
    return MemoryEstimate(total, trainable, activations=activation_bytes(cfg, model_config, shell, act_dtype, device_type),
                          **state_bytes(cfg, total, trainable, workers, sharding, dtype))


def advice(cfg: Config, model_config, est: MemoryEstimate, workers: int, dtype: torch.dtype,
           limit: float, engine: str = "plain") -> list[str]:
    """What would make the run fit in `limit` bytes (`est`: its estimate as configured), tried
    in the order a user would reach for them (the engine's own settings among them)."""
    kind = engine_class(engine)

    def fits(sharding: "Sharding") -> bool:
        return replace(est, **state_bytes(cfg, est.total_params, est.trainable_params, workers, sharding,
                                          dtype)).device_total <= limit

    tips = []
    if cfg.train.checkpoint_every != 1 and est.activations > est.device_total / 2:
        tips.append("set train.gradient_checkpointing: true (activations are most of it)")
    if not cfg.train.chunked_loss:
        tips.append("set train.chunked_loss: true (the logits are never held whole)")
    if est.reference:
        tips.append("set dpo.precompute_reference: true (the reference's log-probs computed before training, "
                    "no frozen copy held)")
    tips.extend(kind.memory_tips(cfg, workers, est, fits))
    if cfg.train.micro_batch_size > 1:
        tips.append("lower train.micro_batch_size (the global batch stays the same)")
    if cfg.method != "qlora":
        tips.append("use method: qlora (a 4-bit frozen base with LoRA adapters)")
    scale_out = kind.scale_out_tip(cfg, workers)
    if scale_out:
        tips.append(scale_out)
    return tips or ["use devices with more memory"]


class PeakMemory:
    """The most memory this process has used for training on its device, since it was made
    (before the model is built). GPU: the allocator's peak (torch.cuda.max_memory_allocated),
    which is what the estimate counts. CPU: the process's peak resident set (getrusage's
    ru_maxrss, the kernel's high-water mark) less its resident set when the meter was made
    (the interpreter and the libraries already imported). glibc's malloc keeps some freed
    memory resident for reuse, so on CPU this is at most that much above the tensors' own
    peak (bench/memory_switches.py measures with MALLOC_MMAP_THRESHOLD_ fixed, which hands every
    large freed block back at once)."""

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
