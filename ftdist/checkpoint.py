"""Checkpoints in <run>/checkpoints/step-<N>/, complete only once their marker exists.

  full:       model.safetensors (every weight)
  lora/qlora: adapter/ (a PEFT adapter directory: the adapters alone, megabytes)
  both:       optimizer.pt, scheduler.pt, rng.pt, state.json (step, data position, ...)
  COMPLETE    written last; a directory without it is ignored and later removed
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_model, save_model

MARKER = "COMPLETE"
PREFIX = "step-"


def checkpoints_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _step_of(path: Path) -> Optional[int]:
    suffix = path.name.removeprefix(PREFIX)
    return int(suffix) if path.name.startswith(PREFIX) and suffix.isdigit() else None


def list_checkpoints(run_dir: Path, complete_only: bool = True) -> list[Path]:
    """Oldest first."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None]
    if complete_only:
        found = [p for p in found if (p / MARKER).is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    complete = list_checkpoints(run_dir)
    return complete[-1] if complete else None


def is_adapter_model(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, state: dict, keep: int) -> Path:
    path = checkpoints_root(run_dir) / f"{PREFIX}{step}"
    shutil.rmtree(path, ignore_errors=True)  # a partial one left by a crash
    path.mkdir(parents=True)
    if is_adapter_model(model):
        model.save_pretrained(path / "adapter")
    else:
        save_model(model, str(path / "model.safetensors"))
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save(scheduler.state_dict(), path / "scheduler.pt")
    torch.save(rng_state(), path / "rng.pt")
    (path / "state.json").write_text(json.dumps(state, indent=2))
    (path / MARKER).write_text(str(step))
    prune(run_dir, keep)
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    if is_adapter_model(model):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(path / "adapter" / "adapter_model.safetensors")))
    else:
        load_model(model, str(path / "model.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())


def prune(run_dir: Path, keep: int) -> None:
    """Drop all but the newest `keep` complete checkpoints, and partial ones older than them."""
    complete = list_checkpoints(run_dir)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    newest = _step_of(complete[-1]) if complete else None
    for path in list_checkpoints(run_dir, complete_only=False):
        if not (path / MARKER).is_file() and newest is not None and _step_of(path) < newest:
            shutil.rmtree(path, ignore_errors=True)


def size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
