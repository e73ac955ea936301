"""Reading torch files without running anything they hold.

ftdist never unpickles a file it reads: its own files are safetensors or JSON (the RNG state),
or torch files of plain tensors and containers (optimizer.pt, scheduler.pt, older runs'
rng-<rank>.pt), and an engine's checkpoint files are read with `weights_only=True` and an
explicit allow-list of the few classes its checkpoints really hold (each engine names them:
Engine.pickled_classes, ftdist/engines). A pickle that
names anything else (a planted `__reduce__` in a shared bucket or a copied run) fails to load
instead of running: for a checkpoint that is damage (checkpoint.damage names it and the run
resumes from the checkpoint before it).

A library may call `torch.load(..., weights_only=False)` itself (an engine's own checkpoint
loaders): `weights_only_loads()` makes every torch.load inside it weights_only with the
allow-list, for the duration of the call only (a load elsewhere in that window is made only
stricter).
"""

from __future__ import annotations

import pickle
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from ftdist.engines.registry import pickled_classes

# What a file that will not load this way raises: a refused global or opcode
# (UnpicklingError), a truncated or foreign file (RuntimeError from the zip reader, EOFError).
LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError,
               AttributeError, IndexError, zipfile.BadZipFile, UnicodeDecodeError)


def allowed_globals() -> list[Any]:
    """The classes beyond tensors and plain containers that the files ftdist reads may hold:
    numpy's array pieces (older runs' rng-<rank>.pt: numpy's RNG state), and the classes the
    engines' own files hold."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 / 1
    allowed: list[Any] = [np.ndarray, np.dtype, core.multiarray._reconstruct]
    if hasattr(np, "dtypes"):  # numpy >= 1.25 pickles a dtype through its class
        allowed.append(np.dtypes.UInt32DType)
    return allowed + pickled_classes()


def safe_load(path: Path | str, map_location: Any = "cpu", mmap: bool = False, allowed: bool = True) -> Any:
    """torch.load of `path` with weights_only=True and the allow-list (`allowed`: False for
    torch's own defaults only, as transformers loads a base model's .bin): tensors, containers
    and the listed classes, never code. Raises one of LOAD_ERRORS when the file holds anything else."""
    with torch.serialization.safe_globals(allowed_globals() if allowed else []):
        return _torch_load(path, map_location=map_location, weights_only=True, mmap=mmap)


def why_unloadable(path: Path, allowed: bool = True) -> str | None:
    """None when `path` loads as safe_load reads it (memory-mapped where the file is torch's zip
    format: the tensors are not read), else the reason in a few words."""
    try:
        safe_load(path, mmap=zipfile.is_zipfile(path), allowed=allowed)
    except LOAD_ERRORS as e:
        if isinstance(e, pickle.UnpicklingError):
            return f"holds objects other than tensors and data, refused unloaded ({reason(e)})"
        return f"does not load as a torch file ({reason(e)})"
    return None


def reason(error: Exception) -> str:
    """The line of a load error that says what was wrong (torch's weights-only refusal names the
    global it refused a few lines down its message)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line or "WeightsUnpickler" in line]
    return ((named or lines or [type(error).__name__])[0])[:200]


# ---------------------------------------------------------------- a library's own loads

_torch_load = torch.serialization.load
_lock = threading.Lock()
_depth = 0


def _weights_only_load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **kwargs):
    """torch.load as a library calls it, made weights_only with the allow-list whatever it asks."""
    with torch.serialization.safe_globals(allowed_globals()):
        return _torch_load(f, map_location=map_location, weights_only=True, mmap=mmap, **kwargs)


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within: every `torch.load` (a library's, which may ask for weights_only=False) loads with
    weights_only=True and the allow-list. Restored on the way out; nests."""
    global _depth
    with _lock:
        if _depth == 0:
            torch.load = _weights_only_load
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                torch.load = _torch_load
