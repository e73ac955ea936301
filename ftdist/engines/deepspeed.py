"""The DeepSpeed engine: ZeRO stages 0-3 around the same model, optimizer and scheduler, on
Ray workers (torch.distributed set up by Ray Train). Everything that knows DeepSpeed lives here:
its config (from `distributed.zero_stage`, `offload_*` and the raw `distributed.deepspeed` keys),
its checkpoint files (deepspeed/, each rank its partition: zero_pp_rank_<r>_*), resuming at
another world size or stage through its universal checkpoint, the per-rank view of the fp32
master weights regularizers anchor (fragments at ZeRO-1/2, partitions at ZeRO-3), the export
reader (zero_to_fp32), and how ZeRO divides memory.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Optional

import torch

from ftdist.config.plan import accumulation_steps
from ftdist.engines.base import (
    Layout,
    MasterShare,
    MicroLoss,
    Sharding,
    frozen_names,
    is_adapter_model,
    nothing,
    refuse_other_engine,
    whole_shares,
)
from ftdist.errors import UserError
from ftdist.io.safeload import LOAD_ERRORS, safe_load, weights_only_loads
from ftdist.io.safeload import reason as load_reason

DEEPSPEED_DIR = "deepspeed"  # the checkpoint's folder of DeepSpeed's files, and the tag saved under
_RANK_FILE = re.compile(r"^zero_pp_rank_(\d+)_")
# Each ZeRO family lays states and files out its own way: a checkpoint loads within its family.
FAMILY = {0: "stage 0", 1: "stages 1-2", 2: "stages 1-2", 3: "stage 3"}


class DeepSpeedEngine:
    """A DeepSpeed ZeRO engine around the model, optimizer and scheduler.

    DeepSpeed owns gradient averaging across ranks, accumulation boundaries, clipping and
    (ZeRO 1-3) partitioning of optimizer states, gradients and parameters.
    """

    name: ClassVar[str] = "deepspeed"
    WEIGHT_FILES: ClassVar[tuple[str, ...]] = (f"{DEEPSPEED_DIR}/",)
    needs_process_group: ClassVar[bool] = True  # in local mode too: a world of one process

    def __init__(self, model, optimizer, scheduler, ds_config: dict[str, Any], world_size: int):
        import deepspeed

        skip_inference_comm_op()
        self.model = model  # the unwrapped (PEFT) model, for saving
        self.layout = Layout(self.name, world_size, ds_config.get("zero_optimization", {}).get("stage", 0))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.forward = self.engine

    # ------------------------------------------------------------ building

    @classmethod
    def build(cls, cfg, model, optimizer, scheduler, world_size: int,
              resume: Optional[dict] = None) -> "DeepSpeedEngine":
        """A ZeRO engine for this rank. `resume`: the state.json of the checkpoint this run
        continues from, if any; another layout than this run's loads through DeepSpeed's
        universal checkpoint."""
        ds_config = deepspeed_config(cfg, world_size)
        stage = ds_config["zero_optimization"]["stage"]
        if resume is not None and needs_universal(Layout.of_checkpoint(resume), Layout(cls.name, world_size, stage),
                                                  resume.get("step")):
            if stage == 3 and len(optimizer.param_groups) > 1:
                raise UserError(
                    f"the checkpoint at step {resume.get('step')} was saved by {resume.get('world_size')} workers; "
                    "resuming a ZeRO-3 run with train.weight_decay > 0 at another number of workers is not "
                    "supported (DeepSpeed's universal checkpoint mis-restores ZeRO-3 states of several parameter "
                    f"groups): resume with distributed.workers: {resume.get('world_size')}")
            ds_config = merge(ds_config, {"checkpoint": {"load_universal": True}})
        return cls(model, optimizer, scheduler, ds_config, world_size)

    @classmethod
    def reference(cls, cfg, model, world_size: int):
        """dpo's frozen reference model under ZeRO-3: partitioned across the ranks as the policy is
        (never whole on one device), through an engine without optimizer. Stages 0-2 hold whole
        weights on every rank, the policy's too: the reference is the model itself there."""
        if cfg.distributed.zero_stage != 3:
            return model
        import deepspeed

        skip_inference_comm_op()
        training = deepspeed_config(cfg, world_size)
        config = {key: training[key] for key in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                                 "gradient_accumulation_steps", "steps_per_print")}
        config["zero_optimization"] = {"stage": 3, **({"offload_param": {"device": "cpu"}}
                                                      if cfg.distributed.offload_params == "cpu" else {})}
        engine = deepspeed.initialize(model=model, config=config)[0]
        engine.eval()
        return engine

    # ------------------------------------------------------------ planning and memory

    @classmethod
    def describe(cls, cfg) -> str:
        d = cfg.distributed
        offload = [f"{what} offloaded to CPU" for what, value in
                   (("optimizer", d.offload_optimizer), ("parameters", d.offload_params)) if value == "cpu"]
        return f"DeepSpeed ZeRO-{d.zero_stage}{', ' + ', '.join(offload) if offload else ''}"

    @classmethod
    def sharding(cls, cfg, world_size: int, stage: Optional[int] = None) -> Sharding:
        """ZeRO-1 divides optimizer states (on the fp32 master weights' partitions), ZeRO-2 also
        gradients, ZeRO-3 also weights; offloading moves those states to host memory."""
        d = cfg.distributed
        stage = d.zero_stage if stage is None else stage
        return Sharding(optimizer=stage >= 1, gradients=stage >= 2, weights=stage >= 3,
                        optimizer_on_host=stage >= 1 and d.offload_optimizer == "cpu",
                        weights_on_host=stage == 3 and d.offload_params == "cpu")

    @classmethod
    def memory_tips(cls, cfg, world_size: int, estimate, fits: Callable[[Sharding], bool]) -> list[str]:
        tips = []
        d = cfg.distributed
        for stage in range(d.zero_stage + 1, 4):
            if cfg.method == "qlora" and stage == 3:
                break
            if world_size > 1 and fits(cls.sharding(cfg, world_size, stage)):
                tips.append(f"raise distributed.zero_stage to {stage}")
                break
        if d.zero_stage >= 1 and d.offload_optimizer == "none" and estimate.optimizer > estimate.device_total / 10:
            tips.append("set distributed.offload_optimizer: cpu")
        return tips

    @classmethod
    def scale_out_tip(cls, cfg, world_size: int) -> Optional[str]:
        if world_size > 1 and cfg.distributed.zero_stage >= 3:
            return None
        return "use more distributed.workers with distributed.zero_stage 3" if cfg.method != "qlora" \
            else "use a smaller model"

    # ------------------------------------------------------------ checkpoint files

    @classmethod
    def file_rank(cls, name: str) -> Optional[int]:
        match = _RANK_FILE.match(name)
        return int(match.group(1)) if match else None

    @classmethod
    def pickled_classes(cls) -> list[Any]:
        """DeepSpeed's loss scalers, ZeRO stage enum and fragment addresses (its optimizer states)."""
        try:
            from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
            from deepspeed.runtime.zero.config import ZeroStageEnum
            from deepspeed.utils.tensor_fragment import fragment_address
        except ImportError:  # no DeepSpeed here: its files cannot be written here either
            return []
        return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    @classmethod
    def holds_weights(cls, checkpoint: Path) -> bool:
        return tag_dir(checkpoint) is not None

    @classmethod
    def read_weights(cls, checkpoint: Path, adapters_only: bool) -> dict[str, torch.Tensor]:
        """One consolidated float32 state dict from a checkpoint's DeepSpeed files, named as the
        training model's parameters."""
        tag = tag_dir(checkpoint)
        try:
            if any(tag.glob("*_optim_states.pt")):
                # ZeRO 1-3: the float32 master weights live partitioned in each rank's optimizer
                # states; DeepSpeed's own helper joins them (and, for ZeRO-3, the parameters).
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                        weights_only_loads():
                    return get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name,
                                                                    exclude_frozen_parameters=adapters_only)
            # ZeRO-0 partitions nothing: rank 0's model states file holds the whole module.
            states = safe_load(tag / "mp_rank_00_model_states.pt")
            return {name: t.float() if t.is_floating_point() else t for name, t in states["module"].items()}
        except LOAD_ERRORS as e:
            raise UserError(f"{checkpoint}: cannot read its DeepSpeed files as weights only ({load_reason(e)}); "
                            "export another checkpoint") from None

    @classmethod
    def adapter_folder(cls, checkpoint: Path) -> Optional[Path]:
        return None  # adapters live among the ZeRO states, by the model's parameter names

    # ------------------------------------------------------------ the engine

    def step(self, micro_batches: list[dict], loss: MicroLoss, before_update: Callable[[], None] = nothing) -> float:
        for i, batch in enumerate(micro_batches):
            # The boundary told, not counted: a step may carry more micro-batches than the plan's
            # accumulation (replay's rows come as micro-batches of their own).
            last = i == len(micro_batches) - 1
            self.engine.set_gradient_accumulation_boundary(last)
            # The loss is already normalised for the whole global batch: no 1/accumulation scaling.
            self.engine.backward(loss(self.forward, batch), scale_wrt_gas=False)
            if last:
                before_update()
                unclipped = self.whole_gradients_norm()
            # DeepSpeed steps once per micro-batch and updates only at the accumulation boundary.
            self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else unclipped

    def whole_gradients_norm(self) -> float:
        """The gradients' norm before clipping where they lie whole, averaged, on every rank
        (ZeRO-0 in float32, where DeepSpeed clips without telling the norm); nan elsewhere."""
        if self.layout.zero_stage != 0:
            return float("nan")
        grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))) if grads else 0.0

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, path: Path, is_main: bool) -> None:
        # Collective: every rank writes its own partition of the states, here and now.
        # Frozen weights (a 4-bit or frozen base, frozen blocks) are the base's: not saved again.
        self.engine.save_checkpoint(str(path), tag=DEEPSPEED_DIR, save_latest=False,
                                    exclude_frozen_parameters=bool(frozen_names(self.model)))

    def load(self, path: Path, saved: dict) -> None:
        refuse_other_engine(path, saved, self.name)
        folder = path
        try:
            # DeepSpeed's own torch.load calls (weights_only=False) read weights only, with the
            # allow-list of its classes (safeload): a planted pickle fails instead of running.
            with weights_only_loads():
                if self.engine.load_universal_checkpoint():  # another world size or stage: convert first
                    folder = Path(tempfile.mkdtemp(prefix="ftdist-universal-"))
                    to_universal(path / DEEPSPEED_DIR, folder / DEEPSPEED_DIR)
                loaded, _ = self.engine.load_checkpoint(str(folder), tag=DEEPSPEED_DIR, load_module_strict=False,
                                                        load_optimizer_states=True, load_lr_scheduler_states=True)
        finally:
            if folder != path:
                shutil.rmtree(folder, ignore_errors=True)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {path}")

    def master_shares(self, params: list[tuple[str, torch.nn.Parameter]], rank: int) -> list[MasterShare]:
        """The fp32 master copy ZeRO keeps of each weight: this rank's partition (ZeRO-3, padded
        at the end of the last one), its fragment if it owns one (ZeRO-1/2: DeepSpeed's fragment
        mapping), or the weight itself, whole on every rank (ZeRO-0)."""
        shares = []
        for name, p in params:
            if hasattr(p, "ds_id"):  # ZeRO-3
                from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

                size = p.ds_tensor.ds_numel

                def cut(whole, start=rank * size, size=size):
                    flat = whole.flatten()
                    flat = torch.nn.functional.pad(flat, (0, max(0, start + size - flat.numel())))
                    return flat[start : start + size]

                shares.append(MasterShare(name, lambda p=p: safe_get_local_fp32_param(p),
                                          lambda value, p=p: safe_set_local_fp32_param(p, value), cut, True))
            elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2
                if p._hp_mapping is None:  # no fragment of it on this rank
                    continue

                def read(p=p):  # looked up each time: loading a checkpoint may relink the fragments
                    return p._hp_mapping.get_hp_fragment()

                def write(value, p=p):
                    p._hp_mapping.get_hp_fragment().copy_(value)

                address = p._hp_mapping.lp_fragment_address

                def cut(whole, start=address.start, numel=address.numel):
                    return whole.flatten()[start : start + numel]

                shares.append(MasterShare(name, read, write, cut, True))
            else:  # ZeRO-0: the weight itself, whole on every rank
                shares.extend(whole_shares([(name, p)], rank))
        return shares

    @contextlib.contextmanager
    def generating(self) -> Iterator[torch.nn.Module]:
        if self.layout.zero_stage != 3:
            yield self.model
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
            yield self.model

    def model_state(self) -> Optional[dict[str, torch.Tensor]]:
        """Under ZeRO-3 the parameters are partitioned: gather each (collectively) and keep
        a full CPU copy on rank 0. Adapter models gather only their trainable adapters."""
        if self.layout.zero_stage != 3:
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


def skip_inference_comm_op() -> None:
    """DeepSpeed's comm backend, starting on CPU, JIT-compiles its shared-memory all-reduce op
    (about 45 s of C++ on two cores, on every node with an empty ~/.cache/torch_extensions, as
    a fresh pod has). Only DeepSpeed-Inference's tensor-parallel all-reduce uses it; training
    reduces through torch.distributed. Marked unavailable, it is never built. DeepSpeed keeps
    this table of ops for the process, so the mark holds for every later initialize."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def needs_universal(saved: Layout, current: Layout, step: Optional[int] = None) -> bool:
    """ZeRO partitions depend on the world size and stage: loading another layout needs
    DeepSpeed's universal checkpoint. Stage 0 keeps whole states on rank 0 and loads anywhere."""
    if saved.engine != DeepSpeedEngine.name:
        return False
    saved_stage = current.zero_stage if saved.zero_stage is None else saved.zero_stage
    if saved_stage == 0 and current.zero_stage == 0:
        return False
    if FAMILY[saved_stage] != FAMILY[current.zero_stage]:
        raise UserError(f"the checkpoint at step {step} was saved with distributed.zero_stage "
                        f"{saved_stage}; resume it with ZeRO {FAMILY[saved_stage]} (any number of workers), "
                        "or start over with --restart")
    return saved.world_size != current.world_size or saved_stage != current.zero_stage


def to_universal(checkpoint: Path, out: Path) -> None:
    """DeepSpeed's own conversion (ds_to_universal) of a ZeRO checkpoint into per-parameter files.
    One worker each: the conversion runs in this process, so its loads stay under the caller's
    weights_only_loads() (worker processes would read the files unrestricted)."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(checkpoint), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # it narrates every step
        ds_to_universal.main(args)


def tag_dir(checkpoint: Path) -> Optional[Path]:
    """The folder of DeepSpeed's *_model_states.pt files: deepspeed/ (the tag the engine saves
    under), or deepspeed/deepspeed/ when the engine's save folder is itself deepspeed/."""
    for tag in (checkpoint / DEEPSPEED_DIR / DEEPSPEED_DIR, checkpoint / DEEPSPEED_DIR):
        if any(tag.glob("*model_states.pt")):
            return tag
    return None


def deepspeed_config(cfg, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config a run's `distributed` section and batch plan mean."""
    d, t = cfg.distributed, cfg.train
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
    if d.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu"}
    config = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation_steps(t, world_size),
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
