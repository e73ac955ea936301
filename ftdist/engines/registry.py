"""Engines: how a run's weights, gradients and optimizer states are laid out, stepped and saved.

An engine is chosen by `distributed.engine` (auto: plain in local mode, deepspeed on Ray
workers). The registry maps each name to its class, imported on first use: naming and
resolving engines stays torch-free (config errors are fast). The Engine protocol and what
every engine implements are in base.py; docs/engines.md says how to add one.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from ftdist.errors import UserError

if TYPE_CHECKING:
    from ftdist.engines.base import EngineClass

# name -> (module, class, the libraries it alone imports). A new engine: one module here and
# one line below.
ENGINES = {
    "plain": ("ftdist.engines.plain", "PlainEngine", ()),
    "deepspeed": ("ftdist.engines.deepspeed", "DeepSpeedEngine", ("deepspeed",)),
}
CHOICES = ("auto", *ENGINES)


def resolve(choice: str, local: bool) -> str:
    """The engine a run uses: `choice` (distributed.engine) in local mode or on Ray workers.
    Every engine runs in both: in local mode one that steps through torch.distributed gets a
    process group of one (LocalContext.open_world)."""
    if choice == "auto":
        return "plain" if local else "deepspeed"
    if choice not in ENGINES:
        raise UserError(f"distributed.engine {choice!r} is not one of {', '.join(CHOICES)}")
    return choice


def engine_class(name: str) -> "EngineClass":
    module, cls, _ = ENGINES[name]
    return getattr(importlib.import_module(module), cls)


def unused_libraries(name: str) -> list[str]:
    """The libraries only other engines than `name` import (a run of `name` can hide them)."""
    used = set(ENGINES[name][2])
    return sorted({lib for _, _, libs in ENGINES.values() for lib in libs} - used)


def all_classes() -> list["EngineClass"]:
    return [engine_class(name) for name in ENGINES]


# ---------------------------------------------------------------- checkpoint files, whoever wrote them


def first_answer(ask: Callable[["EngineClass"], Any]) -> Any:
    """The first engine's answer that is not None (None: no engine's)."""
    return next((answer for answer in map(ask, all_classes()) if answer is not None), None)


def file_rank(name: str) -> Optional[int]:
    """The rank whose share a checkpoint file holds (None: a file every rank reads)."""
    return first_answer(lambda cls: cls.file_rank(name))


def pickled_classes() -> list[Any]:
    """The classes beyond tensors and containers that some engine's torch files hold."""
    return [c for cls in all_classes() for c in cls.pickled_classes()]


def weights_of(checkpoint: Path, adapters_only: bool) -> dict:
    """One consolidated float32 state dict of a checkpoint, by the training model's parameter
    names, from whichever engine's files it holds (for export)."""
    for cls in all_classes():
        if cls.holds_weights(checkpoint):
            return cls.read_weights(checkpoint, adapters_only)
    files = [n for cls in all_classes() for n in cls.WEIGHT_FILES]
    names = ", ".join(files[:-1]) + " or " + files[-1]
    raise UserError(f"{checkpoint}: no weights in this checkpoint (no {names}); export another checkpoint")


def adapter_folder(checkpoint: Path) -> Optional[Path]:
    """The PEFT adapter directory an engine saved in a checkpoint, if one did."""
    return first_answer(lambda cls: cls.adapter_folder(checkpoint))
