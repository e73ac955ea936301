"""One small interface over a plain optimizer (local mode) and a DeepSpeed engine (Ray workers).

The loop calls, per step: `forward` for each micro-batch, `backward(loss)` with the loss
already normalised by the global target-token count, then `step()`; `save`/`load` for
checkpoints and `model_state()` for the final model. Which engine runs is decided at the
edge (launch) and handed in as a DeepSpeed config, or None for the plain one.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from ftdist.config import Config
from ftdist.errors import UserError


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

    kind = "plain"

    def save(self, path: Path, is_main: bool) -> Optional[Callable[[], None]]:
        """Copy the states in memory (milliseconds) and return the function that writes them,
        which the checkpoint's background job runs while training goes on."""
        if not is_main:
            return None
        adapter = is_adapter_model(self.model)
        if adapter:
            from peft import get_peft_model_state_dict

            weights = get_peft_model_state_dict(self.model)
        else:
            weights = unique_tensors(self.model.state_dict())
        weights = {k: v.detach().clone() for k, v in weights.items()}
        optimizer, scheduler = copy.deepcopy(self.optimizer.state_dict()), copy.deepcopy(self.scheduler.state_dict())

        def write() -> None:
            if adapter:
                self.model.save_pretrained(path / "adapter", state_dict=weights)
            else:
                save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
            torch.save(optimizer, path / "optimizer.pt")
            torch.save(scheduler, path / "scheduler.pt")
        return write

    def load(self, path: Path, saved: dict) -> None:
        if saved.get("engine", self.kind) != self.kind:
            raise UserError(f"{path} was written by Ray workers (DeepSpeed); resume it without --local and with "
                            "distributed.workers > 0, or start over with --restart")
        if is_adapter_model(self.model):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, load_file(str(path / "adapter" / "adapter_model.safetensors")))
        else:
            missing, unexpected = self.model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
            tied = tied_names(self.model)
            if unexpected or set(missing) - tied:
                raise UserError(f"{path}/model.safetensors does not fit this model (missing "
                                f"{sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]}); rerun with --restart")
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

    kind = "deepspeed"

    def save(self, path: Path, is_main: bool) -> None:
        # Collective: every rank writes its own partition of the states, here and now.
        self.engine.save_checkpoint(str(path), tag=self.TAG, save_latest=False,
                                    exclude_frozen_parameters=is_adapter_model(self.model))

    def load(self, path: Path, saved: dict) -> None:
        if saved.get("engine", self.kind) != self.kind:
            raise UserError(f"{path} was written by local mode; resume it with --local (or distributed.workers: 0), "
                            "or start over with --restart")
        folder = path
        if self.engine.load_universal_checkpoint():  # another world size or stage: convert first
            folder = Path(tempfile.mkdtemp(prefix="ftdist-universal-"))
            to_universal(path / self.TAG, folder / self.TAG)
        try:
            loaded, _ = self.engine.load_checkpoint(str(folder), tag=self.TAG, load_module_strict=False,
                                                    load_optimizer_states=True, load_lr_scheduler_states=True)
        finally:
            if folder != path:
                shutil.rmtree(folder, ignore_errors=True)
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


def build_engine(cfg: Config, model, optimizer, scheduler, ds_config: Optional[dict], resume: Optional[dict] = None):
    """`resume`: the state.json of the checkpoint this run continues from, if any."""
    if ds_config is None:
        return PlainEngine(model, optimizer, scheduler, cfg.train.grad_clip)
    if resume is not None and needs_universal(resume, ds_config):
        stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        if stage == 3 and len(optimizer.param_groups) > 1:
            raise UserError(
                f"the checkpoint at step {resume.get('step')} was saved by {resume.get('world_size')} workers; "
                "resuming a ZeRO-3 run with train.weight_decay > 0 at another number of workers is not supported "
                "(DeepSpeed's universal checkpoint mis-restores ZeRO-3 states of several parameter groups): "
                f"resume with distributed.workers: {resume.get('world_size')}")
        ds_config = merge(ds_config, {"checkpoint": {"load_universal": True}})
    return DeepSpeedEngine(model, optimizer, scheduler, ds_config)


def needs_universal(saved: dict, ds_config: dict) -> bool:
    """ZeRO partitions depend on the world size and stage: loading another layout needs
    DeepSpeed's universal checkpoint. Stage 0 keeps whole states on rank 0 and loads anywhere."""
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    world = ds_config["train_batch_size"] // (ds_config["train_micro_batch_size_per_gpu"]
                                              * ds_config["gradient_accumulation_steps"])
    saved_stage, saved_world = saved.get("zero_stage", stage), saved.get("world_size", world)
    if saved.get("engine") != "deepspeed" or (saved_stage == 0 and stage == 0):
        return False
    family = {0: "stage 0", 1: "stages 1-2", 2: "stages 1-2", 3: "stage 3"}
    if family[saved_stage] != family[stage]:  # each family lays states and model files out its own way
        raise UserError(f"the checkpoint at step {saved.get('step')} was saved with distributed.zero_stage "
                        f"{saved_stage}; resume it with ZeRO {family[saved_stage]} (any number of workers), "
                        "or start over with --restart")
    return saved_world != world or saved_stage != stage


def to_universal(checkpoint: Path, out: Path) -> None:
    """DeepSpeed's own conversion (ds_to_universal) of a ZeRO checkpoint into per-parameter files."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(checkpoint), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # it narrates every step
        ds_to_universal.main(args)


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict without second names of shared tensors (tied embeddings), first name kept."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor
    return out


def tied_names(model: torch.nn.Module) -> set[str]:
    state = model.state_dict()
    return set(state) - set(unique_tensors(state))


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
