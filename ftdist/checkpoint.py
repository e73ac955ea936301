"""Checkpoints in <run>/checkpoints/step-<N>/, complete only once their marker exists.

  local mode, full:       model.safetensors (every weight)
  local mode, lora/qlora: adapter/ (a PEFT adapter directory: the adapters alone, megabytes)
  local mode:             optimizer.pt, scheduler.pt
  Ray workers:            deepspeed/ (DeepSpeed's files: each rank writes its own partition;
                          adapter runs leave the frozen base out)
  every mode:             rng-<rank>.pt, state.json (step, data position, ...)
  COMPLETE                written last, once every rank is done; a directory without it is
                          ignored and later removed
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

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


def save_checkpoint(run_dir: Path, step: int, engine, state: dict, keep: int, ctx) -> Path:
    """Collective: every rank calls it; rank 0 marks the checkpoint complete last."""
    path = checkpoints_root(run_dir) / f"{PREFIX}{step}"
    if ctx.is_main:
        shutil.rmtree(path, ignore_errors=True)  # a partial one left by a crash
        path.mkdir(parents=True)
    ctx.barrier()
    engine.save(path, ctx.is_main)
    torch.save(rng_state(), path / f"rng-{ctx.rank}.pt")
    ctx.barrier()
    if ctx.is_main:
        (path / "state.json").write_text(json.dumps(state, indent=2))
        (path / MARKER).write_text(str(step))
        prune(run_dir, keep)
    return path


def load_checkpoint(path: Path, engine, rank: int) -> dict:
    engine.load(path)
    rng_file = path / f"rng-{rank}.pt"
    if rng_file.is_file():  # absent when this rank did not exist in the saving run
        set_rng_state(torch.load(rng_file, weights_only=False))
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
