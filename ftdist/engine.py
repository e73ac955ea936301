"""One small interface over a plain optimizer (local mode) and a DeepSpeed ZeRO engine (Ray workers).

Per optimizer step the loop calls `step(micro_batches, loss, before_update)`: the engine runs
forward and backward for each micro-batch (`loss(forward, batch)` is that micro-batch's loss,
already normalised for the whole global batch), calls `before_update()` (the anchors' pull:
ftdist.training.regularize), then clips and updates, and returns the gradient norm. An engine also
owns its layout (kind, world size, ZeRO stage: written into every checkpoint, compared on
resume), its checkpoint files (`save`, `load`, and the readers export uses), and
`model_state()` for the final model. Which engine a rank runs is its context's choice
(context.py).
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file

from ftdist.config.schema import Config
from ftdist.errors import UserError
from ftdist.training.plan import accumulation_steps
from ftdist.io.safeload import LOAD_ERRORS, deepspeed_loads, safe_load
from ftdist.io.safeload import reason as load_reason

# A micro-batch's loss: loss(forward, batch) -> scalar tensor to backpropagate.
MicroLoss = Callable[[Callable, dict], torch.Tensor]


def nothing() -> None:
    """No work before an update (a run without anchors)."""


# Checkpoint files. Local mode: model.safetensors (full) or adapter/ (a PEFT adapter directory),
# optimizer.pt, scheduler.pt. Ray workers: deepspeed/, DeepSpeed's own files, each rank its partition.
PLAIN_WEIGHTS = "model.safetensors"
PLAIN_ADAPTER_DIR = "adapter"
DEEPSPEED_DIR = "deepspeed"
_DEEPSPEED_RANK_FILE = re.compile(r"^zero_pp_rank_(\d+)_")


@dataclass(frozen=True)
class Layout:
    """How an engine lays out training state: what a checkpoint must match to load directly."""

    engine: str  # plain | deepspeed
    world_size: int
    zero_stage: Optional[int]  # None for the plain engine

    def record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of_checkpoint(cls, saved: dict) -> "Layout":
        """The layout a checkpoint's state.json records."""
        return cls(saved.get("engine", "plain"), saved.get("world_size", 1), saved.get("zero_stage"))


def is_adapter_model(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def refuse_other_engine(path: Path, saved: dict, kind: str) -> None:
    """Checkpoints of local mode and of Ray workers are not interchangeable."""
    written_by = Layout.of_checkpoint(saved).engine
    if written_by == kind:
        return
    if written_by == "deepspeed":
        raise UserError(f"{path} was written by Ray workers (DeepSpeed); resume it without --local and with "
                        "distributed.workers > 0, or start over with --restart")
    raise UserError(f"{path} was written by local mode; resume it with --local (or distributed.workers: 0), "
                    "or start over with --restart")


class PlainEngine:
    """AdamW + scheduler on one process: what local mode runs."""

    kind = "plain"

    def __init__(self, model, optimizer, scheduler, grad_clip: Optional[float]):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_clip = grad_clip or float("inf")
        self.forward = model
        self.layout = Layout(self.kind, 1, None)

    def step(self, micro_batches: list[dict], loss: MicroLoss, before_update: Callable[[], None] = nothing) -> float:
        for batch in micro_batches:
            loss(self.forward, batch).backward()
        before_update()
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, path: Path, is_main: bool) -> Optional[Callable[[], None]]:
        """Copy the states in memory (milliseconds) and return the function that writes them,
        which the checkpoint's background job runs while training goes on."""
        if not is_main:
            return None
        adapter = is_adapter_model(self.model)
        if adapter:
            from peft import get_peft_model_state_dict

            weights = get_peft_model_state_dict(self.model)
        else:  # the trained weights: frozen ones are the base's, loaded again on resume
            trained = trainable_names(self.model)
            weights = {k: v for k, v in unique_tensors(self.model.state_dict()).items() if k in trained}
        weights = {k: v.detach().clone() for k, v in weights.items()}
        optimizer, scheduler = copy.deepcopy(self.optimizer.state_dict()), copy.deepcopy(self.scheduler.state_dict())

        def write() -> None:
            if adapter:  # the adapters' state as PEFT saves it (PEFT's save_pretrained wants the whole
                # model's state: given only the adapters', it fails on a modules_to_save head)
                folder = path / PLAIN_ADAPTER_DIR
                folder.mkdir(parents=True, exist_ok=True)
                self.model.peft_config["default"].save_pretrained(str(folder))
                save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
            else:
                save_file(weights, str(path / PLAIN_WEIGHTS), metadata={"format": "pt"})
            torch.save(optimizer, path / "optimizer.pt")
            torch.save(scheduler, path / "scheduler.pt")
        return write

    def load(self, path: Path, saved: dict) -> None:
        refuse_other_engine(path, saved, self.kind)
        if is_adapter_model(self.model):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, load_file(str(path / PLAIN_ADAPTER_DIR / "adapter_model.safetensors")))
        else:
            missing, unexpected = self.model.load_state_dict(load_file(str(path / PLAIN_WEIGHTS)), strict=False)
            missing = set(missing) - tied_names(self.model) - frozen_names(self.model)
            if unexpected or missing:
                raise UserError(f"{path}/{PLAIN_WEIGHTS} does not fit this model (missing "
                                f"{sorted(missing)[:3]}, unexpected {unexpected[:3]}); rerun with --restart")
        self.optimizer.load_state_dict(safe_load(path / "optimizer.pt"))
        self.scheduler.load_state_dict(safe_load(path / "scheduler.pt"))

    def model_state(self) -> Optional[dict[str, torch.Tensor]]:
        """None: the model's own state dict is complete."""
        return None


class DeepSpeedEngine:
    """A DeepSpeed ZeRO engine around the same model, optimizer and scheduler.

    DeepSpeed owns gradient averaging across ranks, accumulation boundaries, clipping and
    (ZeRO 1-3) partitioning of optimizer states, gradients and parameters.
    """

    kind = "deepspeed"

    def __init__(self, model, optimizer, scheduler, ds_config: dict[str, Any], world_size: int):
        import deepspeed

        skip_inference_comm_op()
        self.model = model  # the unwrapped (PEFT) model, for saving
        self.layout = Layout(self.kind, world_size, ds_config.get("zero_optimization", {}).get("stage", 0))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.forward = self.engine

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
        refuse_other_engine(path, saved, self.kind)
        folder = path
        try:
            # DeepSpeed's own torch.load calls (weights_only=False) read weights only, with the
            # allow-list of its classes (safeload): a planted pickle fails instead of running.
            with deepspeed_loads():
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


def deepspeed_engine(cfg: Config, model, optimizer, scheduler, world_size: int,
                     resume: Optional[dict] = None) -> DeepSpeedEngine:
    """A ZeRO engine for this rank. `resume`: the state.json of the checkpoint this run
    continues from, if any; another layout than this run's loads through DeepSpeed's
    universal checkpoint."""
    ds_config = deepspeed_config(cfg, world_size)
    stage = ds_config["zero_optimization"]["stage"]
    if resume is not None and needs_universal(Layout.of_checkpoint(resume), Layout("deepspeed", world_size, stage),
                                              resume.get("step")):
        if stage == 3 and len(optimizer.param_groups) > 1:
            raise UserError(
                f"the checkpoint at step {resume.get('step')} was saved by {resume.get('world_size')} workers; "
                "resuming a ZeRO-3 run with train.weight_decay > 0 at another number of workers is not supported "
                "(DeepSpeed's universal checkpoint mis-restores ZeRO-3 states of several parameter groups): "
                f"resume with distributed.workers: {resume.get('world_size')}")
        ds_config = merge(ds_config, {"checkpoint": {"load_universal": True}})
    return DeepSpeedEngine(model, optimizer, scheduler, ds_config, world_size)


def deepspeed_reference(cfg: Config, model, world_size: int):
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


def needs_universal(saved: Layout, current: Layout, step: Optional[int] = None) -> bool:
    """ZeRO partitions depend on the world size and stage: loading another layout needs
    DeepSpeed's universal checkpoint. Stage 0 keeps whole states on rank 0 and loads anywhere."""
    if saved.engine != "deepspeed":
        return False
    saved_stage = current.zero_stage if saved.zero_stage is None else saved.zero_stage
    if saved_stage == 0 and current.zero_stage == 0:
        return False
    family = {0: "stage 0", 1: "stages 1-2", 2: "stages 1-2", 3: "stage 3"}
    if family[saved_stage] != family[current.zero_stage]:  # each family lays states and files out its own way
        raise UserError(f"the checkpoint at step {step} was saved with distributed.zero_stage "
                        f"{saved_stage}; resume it with ZeRO {family[saved_stage]} (any number of workers), "
                        "or start over with --restart")
    return saved.world_size != current.world_size or saved_stage != current.zero_stage


def to_universal(checkpoint: Path, out: Path) -> None:
    """DeepSpeed's own conversion (ds_to_universal) of a ZeRO checkpoint into per-parameter files.
    One worker each: the conversion runs in this process, so its loads stay under the caller's
    deepspeed_loads() (worker processes would read the files unrestricted)."""
    import argparse

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(checkpoint), output_folder=str(out), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # it narrates every step
        ds_to_universal.main(args)


def deepspeed_file_rank(name: str) -> Optional[int]:
    """The rank whose partition a DeepSpeed checkpoint file holds (None: a file of every rank)."""
    match = _DEEPSPEED_RANK_FILE.match(name)
    return int(match.group(1)) if match else None


def deepspeed_weights(checkpoint: Path, adapters_only: bool) -> dict[str, torch.Tensor]:
    """One consolidated float32 state dict from a checkpoint's DeepSpeed files, named as the
    training model's parameters (for export)."""
    tag = deepspeed_tag_dir(checkpoint)
    try:
        if any(tag.glob("*_optim_states.pt")):
            # ZeRO 1-3: the float32 master weights live partitioned in each rank's optimizer
            # states; DeepSpeed's own helper joins them (and, for ZeRO-3, the parameters).
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                    deepspeed_loads():
                return get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name,
                                                                exclude_frozen_parameters=adapters_only)
        # ZeRO-0 partitions nothing: rank 0's model states file holds the whole module.
        states = safe_load(tag / "mp_rank_00_model_states.pt")
        return {name: t.float() if t.is_floating_point() else t for name, t in states["module"].items()}
    except LOAD_ERRORS as e:
        raise UserError(f"{checkpoint}: cannot read its DeepSpeed files as weights only ({load_reason(e)}); "
                        "export another checkpoint") from None


def deepspeed_tag_dir(checkpoint: Path) -> Path:
    """The folder of DeepSpeed's *_model_states.pt files: deepspeed/ (the tag the engine saves
    under), or deepspeed/deepspeed/ when the engine's save folder is itself deepspeed/."""
    for tag in (checkpoint / DEEPSPEED_DIR / DEEPSPEED_DIR, checkpoint / DEEPSPEED_DIR):
        if any(tag.glob("*model_states.pt")):
            return tag
    raise UserError(f"{checkpoint}: no weights in this checkpoint (no {PLAIN_WEIGHTS}, {PLAIN_ADAPTER_DIR}/ or "
                    f"{DEEPSPEED_DIR}/); export another checkpoint")


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


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def frozen_names(model: torch.nn.Module) -> set[str]:
    """The parameters training leaves as the base has them (every name, tied ones too)."""
    return {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def tied_names(model: torch.nn.Module) -> set[str]:
    state = model.state_dict()
    return set(state) - set(unique_tensors(state))


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
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
