"""The checkpoints a run directory holds, <run>/checkpoints/step-<N>/: their names, which are
complete (a COMPLETE marker, written last), the newest, and where a rerun starts. Read by the
loop's resume, export, the driver's messages; written by ftdist.training.checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ftdist.io.layout import CHECKPOINTS as ROOT
from ftdist.io.storage import RunStore

MARKER = "COMPLETE"


PREFIX = "step-"


def step_dir(step: int) -> str:
    return f"{ROOT}/{PREFIX}{step}"


def step_of(name: str) -> Optional[int]:
    suffix = name.removeprefix(PREFIX)
    return int(suffix) if name.startswith(PREFIX) and suffix.isdigit() else None


def all_steps(store: RunStore) -> list[int]:
    """Steps of every checkpoint directory in the store, complete or not, oldest first."""
    return sorted(s for s in (step_of(n) for n in store.list_dirs(ROOT)) if s is not None)


def complete_markers(store: RunStore) -> list[dict]:
    """The COMPLETE markers ({step, eval_loss, world_size}) of complete checkpoints, oldest first."""
    markers = []
    for step in all_steps(store):
        marker = f"{step_dir(step)}/{MARKER}"
        if store.exists(marker):
            markers.append({**read_marker(store, step), "step": step})
    return markers


def read_marker(store: RunStore, step: int) -> dict:
    """A checkpoint's COMPLETE marker; {} when it is empty or not a JSON object (resume_point
    then finds no file list in it: damage)."""
    try:
        marker = json.loads(store.read_text(f"{step_dir(step)}/{MARKER}") or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return marker if isinstance(marker, dict) else {}


def latest_step(store: RunStore) -> Optional[int]:
    markers = complete_markers(store)
    return markers[-1]["step"] if markers else None


def describe_newest(store: RunStore) -> str:
    """Where a rerun of this run resumes from, in words."""
    step = latest_step(store)
    if step is None:
        return f"no checkpoint of {store.url} is complete yet: a rerun starts from step 0"
    return f"the newest complete checkpoint is {store.path(step_dir(step))}"


def rerun_starts(run_dir: Path) -> str:
    """Where a rerun of the run in `run_dir` (a local copy) starts: its newest complete checkpoint."""
    root = run_dir / ROOT
    steps = sorted(s for s in (step_of(p.name) for p in root.glob(PREFIX + "*") if (p / MARKER).is_file())
                   if s is not None) if root.is_dir() else []
    return f"it resumes from step-{steps[-1]}" if steps else "it starts again from step 0 (no checkpoint was complete)"


def start_steps_local(store: RunStore) -> list[int]:
    """Steps of the complete checkpoints in this rank's local copy (no store call: it may be away)."""
    root = store.local / ROOT
    return sorted(s for s in (step_of(p.name) for p in root.glob(PREFIX + "*") if (p / MARKER).is_file())
                  if s is not None) if root.is_dir() else []


def size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
