"""What every engine is: the Engine protocol, its Layout, the share of master weights it shows
regularizers, its memory terms, and the helpers engines share.

An engine owns how weights, gradients and optimizer states are laid out and saved. Per
optimizer step the loop calls `step(micro_batches, loss, before_update)`: the engine runs
forward and backward for each micro-batch (`loss(forward, batch)` is that micro-batch's loss,
already normalised for the whole global batch: gradients are averaged over ranks), calls
`before_update()` (the anchors' pull: ftdist.training.regularize), then clips and updates, and returns
the gradient norm. Members on the class (no engine built yet) serve the driver's plan and
memory estimate, checkpoint checks and export; members of an instance serve the loop.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager, Optional, Protocol, runtime_checkable

import torch

from ftdist.errors import UserError

# A micro-batch's loss: loss(forward, batch) -> scalar tensor to backpropagate.
MicroLoss = Callable[[Callable, dict], torch.Tensor]


def nothing() -> None:
    """No work before an update (a run without anchors)."""


@dataclass(frozen=True)
class Layout:
    """How an engine lays out training state: what a checkpoint must match to load directly."""

    engine: str  # the registry's name
    world_size: int
    zero_stage: Optional[int]  # DeepSpeed's; None for engines without stages

    def record(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of_checkpoint(cls, saved: dict) -> "Layout":
        """The layout a checkpoint's state.json records (older ones: local mode's, without a name)."""
        return cls(saved.get("engine", "plain"), saved.get("world_size", 1), saved.get("zero_stage"))


@dataclass(frozen=True)
class MasterShare:
    """This rank's share of one trained weight's master copy, as a flat tensor."""

    name: str
    read: Callable[[], torch.Tensor]  # the share now (looked up each call: a load may relink it)
    write: Callable[[torch.Tensor], None]
    cut: Callable[[torch.Tensor], torch.Tensor]  # the same share of a whole-weight tensor (a Fisher)
    counted: bool  # False where every rank holds the whole weight: rank 0's copy alone is summed


def whole_shares(params: list[tuple[str, torch.nn.Parameter]], rank: int) -> list[MasterShare]:
    """Weights whole on every rank (their own master copy): each rank's share is the weight."""
    shares = []
    for name, p in params:
        def read(p=p):
            return p.data.view(-1)

        def write(value, p=p):
            p.data.view(-1).copy_(value)

        shares.append(MasterShare(name, read, write, lambda whole: whole.flatten(), rank == 0))
    return shares


@dataclass(frozen=True)
class Sharding:
    """Which training states an engine divides over its world (a device keeps 1/N of each) and
    which it keeps in host memory instead: the terms of the per-device memory estimate."""

    optimizer: bool = False  # optimizer states, and the regularizers' anchors beside them
    gradients: bool = False
    weights: bool = False  # and dpo's frozen reference, partitioned like the policy
    optimizer_on_host: bool = False
    weights_on_host: bool = False


# fits(sharding) -> whether the run's estimate under that sharding fits the device.
Fits = Callable[[Sharding], bool]


@runtime_checkable
class Engine(Protocol):
    """One rank's engine. Class members first (used before any engine is built)."""

    name: ClassVar[str]
    WEIGHT_FILES: ClassVar[tuple[str, ...]]  # what its checkpoints hold the weights in (messages)
    needs_process_group: ClassVar[bool]  # steps through torch.distributed even in one process

    # -- building (the loop)
    @classmethod
    def build(cls, cfg, model, optimizer, scheduler, world_size: int, resume: Optional[dict]) -> "Engine":
        """This rank's engine; `resume`: the state.json of the checkpoint the run continues from."""

    @classmethod
    def reference(cls, cfg, model, world_size: int):
        """dpo's frozen reference model as this engine runs it (the model itself where weights are whole)."""

    # -- planning and memory (the driver, `ftdist plan`)
    @classmethod
    def describe(cls, cfg) -> str:
        """The engine's part of the plan line."""

    @classmethod
    def sharding(cls, cfg, world_size: int) -> Sharding:
        """How the run's `distributed` settings divide training state over `world_size` devices."""

    @classmethod
    def memory_tips(cls, cfg, world_size: int, estimate, fits: Fits) -> list[str]:
        """Settings of this engine that would make the run fit (`estimate`: its MemoryEstimate as configured)."""

    @classmethod
    def scale_out_tip(cls, cfg, world_size: int) -> Optional[str]:
        """The last resort: how more devices would help, if they would."""

    # -- checkpoint files (checkpoint checks, export)
    @classmethod
    def file_rank(cls, name: str) -> Optional[int]:
        """The rank whose share a file of this engine's holds (None: not a per-rank file)."""

    @classmethod
    def pickled_classes(cls) -> list[Any]:
        """Classes its torch files hold beyond tensors and containers (safeload's allow-list)."""

    @classmethod
    def holds_weights(cls, checkpoint: Path) -> bool:
        """Whether a checkpoint directory holds this engine's weight files."""

    @classmethod
    def read_weights(cls, checkpoint: Path, adapters_only: bool) -> dict[str, torch.Tensor]:
        """The checkpoint's trained weights consolidated, float32, by the model's parameter names."""

    @classmethod
    def adapter_folder(cls, checkpoint: Path) -> Optional[Path]:
        """The PEFT adapter directory it saved in the checkpoint, if it saves one."""

    # -- an engine (the loop)
    model: torch.nn.Module  # the unwrapped (PEFT) model
    forward: Callable  # what computes the loss: the model, or the engine's wrapper of it
    layout: Layout

    @property
    def lr(self) -> float: ...

    def step(self, micro_batches: list[dict], loss: MicroLoss, before_update: Callable[[], None] = nothing) -> float:
        """One optimizer step over the micro-batches; the gradient norm before clipping."""

    def save(self, path: Path, is_main: bool) -> Optional[Callable[[], None]]:
        """Write (or stage) this rank's files of a checkpoint; a function that writes the rest later, or None."""

    def load(self, path: Path, saved: dict) -> None:
        """Restore from a checkpoint written at any world size (its layout: `saved`)."""

    def master_shares(self, params: list[tuple[str, torch.nn.Parameter]], rank: int) -> list[MasterShare]:
        """This rank's share of each given weight's master copy (regularizers' anchors)."""

    def model_state(self) -> Optional[dict[str, torch.Tensor]]:
        """The final model's state on rank 0 where the model's own is not whole (None: it is)."""

    def generating(self) -> ContextManager[torch.nn.Module]:
        """The model to sample from (objective grpo), its weights whole while the context lasts:
        the model itself, or under ZeRO-3 its parameters gathered (each rank then samples
        without collectives, however long its completions)."""


EngineClass = type[Engine]  # an engine class of the registry (its class members are called on it)


def refuse_other_engine(path: Path, saved: dict, name: str) -> None:
    """A checkpoint loads only into the engine that wrote it (any world size)."""
    written_by = Layout.of_checkpoint(saved).engine
    if written_by != name:
        raise UserError(f"{path} was written by the {written_by} engine, this run's is {name} (distributed.engine: "
                        f"auto is plain in local mode, deepspeed on Ray workers); resume it with distributed.engine: "
                        f"{written_by} (in either mode, at any number of workers), or start over with --restart")


# ---------------------------------------------------------------- the model's parameters


def is_adapter_model(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


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
