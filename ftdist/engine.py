"""One small interface over a plain optimizer (local mode) and a DeepSpeed engine (Ray workers).

The loop calls, per step: `forward` for each micro-batch, `backward(loss)` with the loss
already normalised by the global target-token count, then `step()`; `save`/`load` for
checkpoints and `model_state()` for the final model. Which engine runs is decided at the
edge (launch) and handed in as a DeepSpeed config, or None for the plain one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_model, save_model

from ftdist.config import Config


def is_adapter_model(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


class PlainEngine:
    """AdamW + scheduler on one process: what local mode runs."""

    def __init__(self, model, optimizer, scheduler, grad_clip: Optional[float]):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_clip = grad_clip or float("inf")
        self.forward = model

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, path: Path, is_main: bool) -> None:
        if not is_main:
            return
        if is_adapter_model(self.model):
            self.model.save_pretrained(path / "adapter")
        else:
            save_model(self.model, str(path / "model.safetensors"))
        torch.save(self.optimizer.state_dict(), path / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), path / "scheduler.pt")

    def load(self, path: Path) -> None:
        if is_adapter_model(self.model):
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            set_peft_model_state_dict(self.model, load_file(str(path / "adapter" / "adapter_model.safetensors")))
        else:
            load_model(self.model, str(path / "model.safetensors"))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))

    def model_state(self) -> Optional[dict[str, torch.Tensor]]:
        """None: the model's own state dict is complete."""
        return None


class DeepSpeedEngine:
    """A DeepSpeed ZeRO engine around the same model, optimizer and scheduler.

    DeepSpeed owns gradient averaging across ranks, accumulation boundaries, clipping and
    (ZeRO 1-3) partitioning of optimizer states, gradients and parameters.
    """

    TAG = "deepspeed"

    def __init__(self, model, optimizer, scheduler, ds_config: dict[str, Any]):
        import deepspeed

        self.model = model  # the unwrapped (PEFT) model, for saving
        self.stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.forward = self.engine

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already normalised for the whole global batch: no 1/accumulation scaling.
        self.engine.backward(loss, scale_wrt_gas=False)
        # DeepSpeed counts micro-batches in step(); it updates at the accumulation boundary.
        self.engine.step()

    def step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, path: Path, is_main: bool) -> None:
        # Collective: every rank writes its own partition of the states.
        self.engine.save_checkpoint(str(path), tag=self.TAG, save_latest=False,
                                    exclude_frozen_parameters=is_adapter_model(self.model))

    def load(self, path: Path) -> None:
        loaded, _ = self.engine.load_checkpoint(str(path), tag=self.TAG, load_module_strict=False,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {path}")

    def model_state(self) -> Optional[dict[str, torch.Tensor]]:
        """Under ZeRO-3 the parameters are partitioned: gather each (collectively) and keep
        a full CPU copy on rank 0. Adapter models gather only their trainable adapters."""
        if self.stage != 3:
            return None
        import deepspeed
        import torch.distributed as dist

        adapters_only = is_adapter_model(self.model)
        state = {}
        for name, param in self.model.named_parameters():
            if adapters_only and not param.requires_grad:
                continue
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if dist.get_rank() == 0:
                    state[name] = param.detach().cpu().clone()
        if adapters_only:
            return state
        persistent = set(self.model.state_dict())  # keys only: rotary tables etc. are not saved
        for name, buffer in self.model.named_buffers():
            if name in persistent:
                state[name] = buffer.detach().cpu().clone()
        return state


def build_engine(cfg: Config, model, optimizer, scheduler, ds_config: Optional[dict]):
    if ds_config is None:
        return PlainEngine(model, optimizer, scheduler, cfg.train.grad_clip)
    return DeepSpeedEngine(model, optimizer, scheduler, ds_config)


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config a run's `distributed` section and batch sizes mean."""
    d, t = cfg.distributed, cfg.train
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
    if d.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.batch_size // (t.micro_batch_size * world_size),
        "gradient_clipping": t.grad_clip or 0.0,
        "zero_optimization": zero,
        # Our torch AdamW is the client optimizer: DeepSpeed's fused Adam ops need a compiler.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return merge(config, d.deepspeed)


def merge(base: dict, extra: dict) -> dict:
    """`distributed.deepspeed` keys win, merged into nested sections."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
