"""Checkpoints in <run>/checkpoints/step-<N>/: written locally, committed in the background.

  the engine's files      (ftdist/engines) the plain engine: the trained weights or adapters (rank 0's),
                          optimizer and scheduler states; a partitioning engine (DeepSpeed): each
                          rank its own partition (adapter runs leave the frozen base out)
  every mode:             rng-<rank>.safetensors (the RNG states: tensors, the rest as JSON in its
                          header; older runs wrote rng-<rank>.pt, still read, weights only),
                          state.json (the loop's TrainState and the engine's layout),
                          metrics.jsonl (the log up to this step: a resume continues it)
  done-<rank>             one per rank, once its files are written (and, for s3:// runs, uploaded)
  COMPLETE                written last by rank 0, once every rank's done-<rank> is there, with
                          the manifest: each file's size and SHA-256; a directory without it is
                          never resumed from, and is removed

Saving costs the training thread only the copy into memory (the plain engine) or the local
write (DeepSpeed); writing staged files, uploading, the markers and pruning run in the rank's
Uploader. Resuming at another world size is the engine's (Engine.load: DeepSpeed converts
through its universal checkpoint). A resume first checks, on every rank, the files that rank loads
against the manifest, and that each torch file loads as tensors and data only (safeload: nothing
in a checkpoint is ever unpickled; a planted pickle is damage, never run); a COMPLETE without the
file list cannot be checked and counts as damage too. A damaged checkpoint is named with the
file that failed and skipped for the one before it (and then removed); the only one left is
never removed: the run stops.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ftdist.engines.registry import file_rank
from ftdist.errors import UserError
from ftdist.io import safewrite
from ftdist.io.checkpoints import (
    MARKER,
    PREFIX,
    all_steps,
    complete_markers,
    read_marker,
    size_bytes,
    start_steps_local,
    step_dir,
    step_of,
)
from ftdist.io.layout import CHECKPOINTS as ROOT
from ftdist.io.layout import METRICS
from ftdist.io.safeload import safe_load, why_unloadable
from ftdist.io.space import no_room_stops
from ftdist.io.storage import NotYet, RunStore, Uploader, retrying

RNG_FILE = re.compile(r"^rng-(\d+)\.(pt|safetensors)$")


# ---------------------------------------------------------------- saving


def disk_full_stops(path: Path, step: int, store: RunStore):
    """A checkpoint that does not fit the disk (or a file-size limit) stops the run with one
    message; its partial directory goes (freeing what it took), the complete ones stay."""
    what = f"checkpoint step-{step}"
    before = [s for s in start_steps_local(store) if s < step]
    return no_room_stops(path, what, "free space there (or point storage.cache_dir / run.output elsewhere) and run "
                         f"the same command again: it resumes from {f'step-{before[-1]}' if before else 'the start'}",
                         remove=lambda: safewrite.remove_quietly(path, store.local, what))


def save_checkpoint(store: RunStore, step: int, engine, state: dict, keep: int, ctx, uploader: Uploader) -> Path:
    """Collective: every rank calls it. Returns once this rank's part is staged locally."""
    rel = step_dir(step)
    path = store.local / rel
    shared = not store.remote  # ranks of a local run write into one directory
    what = f"checkpoint step-{step}"
    if ctx.is_main or not shared:  # a new directory of ftdist's own (never a link's target): its files are ours
        safewrite.remove(path, store.local, what)
        safewrite.make_dirs(path, store.local, what)
    if shared:
        ctx.barrier()
    with disk_full_stops(path, step, store):
        write_rest = engine.save(path, ctx.is_main)
        save_rng(path / f"rng-{ctx.rank}.safetensors")
        if ctx.is_main:
            safewrite.write_text(path / "state.json", store.local, what, json.dumps(state, indent=2))
            metrics = store.local / METRICS
            if metrics.is_file() and not metrics.is_symlink():
                safewrite.copy_file(metrics, path / METRICS, store.local, what)
    uploader.submit(partial(commit, store, step, ctx.rank, ctx.world_size, write_rest, keep, state.get("eval_loss")))
    return path


def commit(store: RunStore, step: int, rank: int, world_size: int, write_rest: Optional[Callable[[], None]],
           keep: int, eval_loss: Optional[float]) -> dict:
    """In the background: finish writing, upload this rank's files, mark them done; rank 0
    then waits for every rank, writes COMPLETE and prunes."""
    started = time.perf_counter()
    rel = step_dir(step)
    if write_rest is not None:
        with disk_full_stops(store.local / rel, step, store):
            write_rest()
    size = size_bytes(store.local / rel)
    uploading = time.perf_counter()
    sent = store.upload(rel)
    upload_s = time.perf_counter() - uploading
    if rank == 0:  # the log so far, readable in the store while training goes on (s3:// runs)
        store.upload_file(store.local / rel / METRICS, METRICS)
    # s3:// runs: each rank hashes its own local part; a local run's ranks share one directory,
    # which rank 0 hashes once all are done.
    files = manifest(store.local / rel) if store.remote else None
    store.write_text(f"{rel}/done-{rank}", json.dumps({"bytes": sent, "files": files}))
    if rank == 0:
        wait_for_ranks(store, rel, world_size)
        if store.remote:
            files = {}
            for r in range(world_size):
                files.update(json.loads(store.read_text(f"{rel}/done-{r}")).get("files") or {})
        else:
            files = manifest(store.local / rel)
        store.write_text(f"{rel}/{MARKER}", json.dumps({"eval_loss": eval_loss, "world_size": world_size,
                                                         "files": files}))
        prune(store, keep)
    if store.remote:  # older local copies of this rank are in the store now
        for old in (store.local / ROOT).glob(PREFIX + "*"):
            if (step_of(old.name) or step) < step:
                safewrite.remove_quietly(old, store.local, "an older checkpoint's local copy")
    return {"step": step, "bytes": size, "uploaded": sent, "upload_s": upload_s,
            "seconds": time.perf_counter() - started}


def wait_for_ranks(store: RunStore, rel: str, world_size: int) -> None:
    """Until every rank's done-<rank> marker exists (bounded by storage.retry_deadline_s)."""
    def all_done() -> None:
        missing = [r for r in range(world_size) if not store.fs.exists(store.path(f"{rel}/done-{r}"))]
        if missing:
            raise NotYet(f"ranks {missing} have not finished writing {rel}")

    retrying(all_done, f"waiting for every rank's part of {store.path(rel)}", store.storage.retry_deadline_s)


def prune(store: RunStore, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints and the one with the best eval loss; drop
    the rest, and partial ones older than the newest complete (dead uploads or crashes)."""
    markers = complete_markers(store)
    if not markers:
        return
    kept = {m["step"] for m in markers[-keep:]}
    evaluated = [m for m in markers if m.get("eval_loss") is not None]
    if evaluated:
        kept.add(min(evaluated, key=lambda m: m["eval_loss"])["step"])
    newest = markers[-1]["step"]
    for step in all_steps(store):
        if step < newest and step not in kept:
            store.remove(step_dir(step))


def start_points(store: RunStore) -> list[int]:
    """Before a run (re)starts: the steps of the complete checkpoints, newest first. Directories
    without a marker are the remains of a crash or a cut upload; they are removed, so that their
    stale done-<rank> markers can never complete a new checkpoint."""
    markers = complete_markers(store)
    complete = {m["step"] for m in markers}
    for step in all_steps(store):
        if step not in complete:
            store.remove(step_dir(step))
    return [m["step"] for m in reversed(markers)]


# ---------------------------------------------------------------- the manifest

MARKER_FILE = re.compile(rf"^(done-\d+|{MARKER})(\.tmp)?$")  # (.tmp: being written whole, safewrite)


def manifest(folder: Path) -> dict[str, list]:
    """{path in the checkpoint: [bytes, SHA-256]} of every file but the markers."""
    files = {}
    for f in sorted(folder.rglob("*")):
        name = f.relative_to(folder).as_posix()
        if f.is_file() and not MARKER_FILE.match(name):
            files[name] = [f.stat().st_size, file_sha256(f)]
    return files


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def damage(path: Path, files: Optional[dict], loads: Callable[[str], bool]) -> Optional[str]:
    """What is wrong with this rank's copy of a checkpoint (None: nothing): each file it loads
    against the manifest, each torch or safetensors file it loads as such (a torch file only as
    tensors and data: a pickle of anything else is damage, refused before it runs), then
    state.json as JSON. A COMPLETE without the file list (a truncated or forged marker) leaves
    nothing to check against: damaged too, never trusted."""
    if not isinstance(files, dict) or not files:
        return f"{MARKER} lists no files, so none of them can be checked"
    for name, entry in sorted(files.items()):
        if not loads(name):
            continue
        try:
            size, digest = entry
        except (TypeError, ValueError):
            return f"{MARKER} has no size and checksum for {name}"
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, not the {size} it was saved with"
        if file_sha256(f) != digest:
            return f"{name} does not match its checksum (changed after it was saved)"
    for name in sorted(files):
        if not loads(name) or not (path / name).is_file():
            continue
        if name.endswith(".pt"):
            problem = why_unloadable(path / name)
            if problem:
                return f"{name} {problem}"
        elif name.endswith(".safetensors"):
            problem = safetensors_problem(path / name)
            if problem:
                return f"{name} {problem}"
    try:
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("no step")
    except (OSError, ValueError, UnicodeDecodeError):
        return "state.json is missing or not the loop's state"
    return None


def safetensors_problem(path: Path) -> Optional[str]:
    """None when the file's safetensors header reads (the tensors are not read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        return f"is not a safetensors file ({str(e)[:200]})"
    return None


# ---------------------------------------------------------------- resuming


@dataclass(frozen=True)
class ResumePoint:
    path: Path  # this rank's local copy of the checkpoint
    saved: dict  # its state.json: the loop's state and the saving engine's layout


def resume_point(ctx) -> Optional[ResumePoint]:
    """The newest complete checkpoint whose files are intact on every rank, the same on every
    rank (rank 0 lists them and cleans up the partial ones; all_reduce_sum is collective, so no
    barrier is needed after it), or None. A damaged one is named and removed for the one before
    it; when it is the last, the run stops with it kept."""
    store = ctx.store
    steps = start_points(store) if ctx.is_main else []
    n = int(ctx.all_reduce_sum(len(steps)))
    for i in range(n):
        step = int(ctx.all_reduce_sum(steps[i] if ctx.is_main else 0))
        path = fetch_checkpoint(store, step, ctx.rank, ctx.world_size)
        marker = read_marker(store, step)
        loads = rank_loads(ctx.rank, ctx.world_size, marker.get("world_size", ctx.world_size))
        problem = damage(path, marker.get("files"), loads)
        if not int(ctx.all_reduce_sum(1 if problem else 0)):
            return ResumePoint(path, read_state(path))
        where = f"{store.url}/{step_dir(step)}"
        if i + 1 == n:
            raise UserError(f"{where} is damaged ({problem or 'on another rank'}) and is the only checkpoint left; "
                            "restore the file, or rerun with --restart to start over") from None
        if problem:
            print(f"ftdist: warning: {where} is damaged ({problem}): resuming from the checkpoint before it",
                  file=sys.stderr, flush=True)
        if ctx.is_main:
            store.remove(step_dir(step))
    return None


def rank_loads(rank: int, world_size: int, saved_world: int) -> Callable[[str], bool]:
    """Which of a checkpoint's files this rank reads: every file when the world size changed
    (an engine's re-partitioning may read all), else its own and the shared ones."""
    def loads(name: str) -> bool:
        if saved_world != world_size:
            return True
        leaf = name.rsplit("/", 1)[-1]
        rng = RNG_FILE.match(leaf)
        owner = int(rng.group(1)) if rng else file_rank(leaf)
        return owner is None or owner == rank
    return loads


def fetch_checkpoint(store: RunStore, step: int, rank: int, world_size: int) -> Path:
    """This rank's local copy of checkpoint `step` (downloaded for s3:// runs): its own files,
    or every rank's when the world size changed (an engine's re-partitioning may read all)."""
    rel = step_dir(step)
    path = store.local / rel
    if not store.remote:
        return path
    saved_world = read_marker(store, step).get("world_size", world_size)
    safewrite.remove(path, store.local, f"checkpoint step-{step}")
    store.download(rel, path, keep=rank_loads(rank, world_size, saved_world))
    return path


def read_state(path: Path) -> dict:
    state_file = path / "state.json"
    if not state_file.is_file():
        raise UserError(f"{path}: checkpoint without state.json; remove it or rerun with --restart")
    return json.loads(state_file.read_text())


def restore_rng(path: Path, rank: int) -> None:
    """This rank's RNG states as saved: rng-<rank>.safetensors, or an older run's rng-<rank>.pt
    (read weights only: its numpy array is the one class allowed beyond tensors)."""
    new, old = path / f"rng-{rank}.safetensors", path / f"rng-{rank}.pt"
    if new.is_file():
        set_rng_state(load_rng(new))
    elif old.is_file():  # absent when this rank did not exist in the saving run
        set_rng_state(safe_load(old))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_rng(path: Path, state: Optional[dict] = None) -> None:
    """The RNG states as safetensors: the generators' state words as tensors, the few numbers
    beside them (positions, cached Gaussians) as JSON in the header. Nothing to unpickle."""
    from safetensors.torch import save_file

    state = state or rng_state()
    version, words, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    tensors = {"python": torch.tensor(words, dtype=torch.int64),
               "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
               "torch": state["torch"].clone()}
    for i, cuda in enumerate(state.get("cuda") or []):
        tensors[f"cuda.{i}"] = cuda.cpu().clone()
    meta = {"python": [version, gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)],
            "cuda": len(state.get("cuda") or [])}
    save_file(tensors, str(path), metadata={"rng": json.dumps(meta)})


def load_rng(path: Path) -> dict:
    """What save_rng wrote, as rng_state() gives it."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["rng"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    version, gauss = meta["python"]
    kind, pos, has_gauss, cached = meta["numpy"]
    state = {"python": (version, tuple(int(w) for w in tensors["python"].tolist()), gauss),
             "numpy": (kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached),
             "torch": tensors["torch"]}
    if meta["cuda"]:
        state["cuda"] = [tensors[f"cuda.{i}"] for i in range(meta["cuda"])]
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def describe_size(size: int, base_size: Optional[int], method: str) -> str:
    text = f"{size / 2**20:.1f} MiB"
    if method != "full":
        text += " (adapters and their optimizer state"
        text += f"; the base model is {base_size / 2**20:.1f} MiB)" if base_size else ")"
    return text
