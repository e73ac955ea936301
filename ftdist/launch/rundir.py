"""The run directory <run.output>/<run.name> (local or s3://): claimed, snapshotted, resumed or
restarted, and read back once finished.

A directory becomes an ftdist run when ftdist creates it (or finds it empty) and writes its
marker there. A non-empty directory without that marker is the user's: ftdist neither writes
into it nor deletes anything in it. `--restart` deletes only the entries ftdist writes
(layout.RUN_ENTRIES), so a file the user put in a run directory stays.

The marker says what kind of directory it is: a training run's or a tune search's (older
markers without it: a search has tuner/ or trial-N/ runs). `ftdist train` never writes into a
search's directory, nor into a run inside one (its trials are the search's), and `ftdist tune`
never into a training run's: each would replace the other's snapshot.

One writer at a time (runlock.py): `writing` holds the directory's lock (a lease on s3://) for
the whole command; a second writer is refused naming the holder. A run directory that is a
symbolic link is refused (safewrite.py: ftdist never writes through a link).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import yaml

from ftdist import __version__
from ftdist.artifacts.report import plot_run
from ftdist.config.load import config_yaml
from ftdist.config.schema import Config
from ftdist.errors import UserError
from ftdist.io import runlock
from ftdist.io.layout import (
    CHECKPOINTS,
    FINAL_DIR,
    FINISHED,
    LEASE_FILE,
    LOCK_FILE,
    METRICS,
    RUN_MARKER,
    SEARCH_OUTPUTS,
    SNAPSHOT,
    SUMMARY,
    TRIAL_PREFIX,
    TUNER_DIR,
    is_ftdist_entry,
)
from ftdist.io.storage import RunStore, open_run_store

RUN, SEARCH = "run", "search"  # the kinds of directory ftdist writes (the marker's "kind")
KINDS = {RUN: ("a training run", "ftdist train", "run.name"), SEARCH: ("a tune search", "ftdist tune", "tune.name")}
LOCKS = {LOCK_FILE, LEASE_FILE}  # ftdist's own, in a directory not yet marked (claim)

# Keys that may change between an interrupted run and its resumption: how long and how
# often, where and on how many workers it runs (checkpoints load at any world size), and where
# its directory now lies (run.output: a run moved or copied whole resumes there), and whether a
# model's own code may run (a permission: the model and its numbers are the same either way).
RESUMABLE_CHANGES = {"run.output", "model.trust_remote_code",
                     "train.max_steps", "train.epochs", "train.eval_every", "train.log_every",
                     "checkpoint.every_steps", "checkpoint.keep",
                     "distributed.workers", "distributed.zero_stage", "distributed.engine", "distributed.use_gpu",
                     "distributed.resources_per_worker", "distributed.placement", "distributed.max_failures",
                     "distributed.max_preemptions", "distributed.resize_check_s",
                     "storage.endpoint_url", "storage.region", "storage.retry_deadline_s", "storage.cache_dir",
                     "logging.",  # where a run reports: its numbers are the same wherever they go
                     "tune."}  # a prefix: `ftdist train` does not read the tune: section
# A search's trials must stay comparable, and a restored search keeps the trial admission it
# started with: only retries, how the store is reached and where results are reported may change.
TUNE_RESUMABLE_CHANGES = {"distributed.max_failures", "distributed.max_preemptions", "storage.endpoint_url",
                          "storage.region", "storage.retry_deadline_s", "storage.cache_dir", "logging."}


@contextmanager
def writing(cfg: Config, restart: bool = False, resumable: set[str] = RESUMABLE_CHANGES,
            kind: str = RUN) -> Iterator[RunStore]:
    """The run directory, prepared (prepare_run_dir) and held by this process alone until the
    block ends: a second writer of it is refused with this one named."""
    store = open_run_store(cfg)
    claim(store, kind)
    held = hold(store)
    try:
        yield prepare_run_dir(cfg, restart, resumable, kind, store=store)
    finally:
        held.release()


def check_free(cfg: Config, kind: str = RUN) -> None:
    """Before a command's slow start (models, Ray): refuse at once a directory it may not write
    (not ftdist's, the other kind, a link) or that another process writes now. Takes nothing."""
    store = open_run_store(cfg)
    claim(store, kind)
    holder = runlock.lease_holder(store) if store.remote else runlock.lock_holder(store.local / LOCK_FILE)
    if holder is not None:
        raise UserError(busy(store, holder))


def hold(store: RunStore) -> runlock.Held:
    """This process's lock of the run directory (made if missing), or its lease on s3://."""
    if store.remote:
        return runlock.take_lease(store, lambda holder: busy(store, holder))
    make_run_dir(store)
    return runlock.lock_file(store.local / LOCK_FILE, lambda holder: busy(store, holder))


def busy(store: RunStore, holder: Optional[dict]) -> str:
    return (f"{store.url} is being written by {runlock.describe(holder)}; a run has one writer at a time: wait for "
            "that command to end (or stop it), then run this one again")


def prepare_run_dir(cfg: Config, restart: bool, resumable: set[str] = RESUMABLE_CHANGES, kind: str = RUN,
                    trial: bool = False, store: Optional[RunStore] = None) -> RunStore:
    """Claim the run directory (or clear ftdist's files in it with restart) and write the
    config snapshot. `trial`: a search's trial, which writes in the search's directory (under
    its lock); `store`: the run's, when the caller opened it.

    Resuming a run that was started with a different config would mix two experiments:
    that is refused with the differing keys named.
    """
    store = store or open_run_store(cfg)
    claim(store, kind, trial)
    if restart:
        clear_run(store)
    new_text = config_yaml(cfg)
    old_text = store.read_text(SNAPSHOT) if store.exists(SNAPSHOT) else None
    if old_text is not None:
        old = with_defaults(read_snapshot(store, old_text))
        changed = sorted(k for k in diff_keys(old, yaml.safe_load(new_text)) if not may_change(k, resumable))
        if changed and not holds_progress(store):
            # An attempt that stopped before its first checkpoint (a failed start): nothing of it
            # can be resumed, so the corrected config simply starts the run.
            print(f"ftdist: {store.url}: an earlier attempt with another config ({', '.join(changed)}) saved no "
                  "checkpoint; starting with this config", file=sys.stderr, flush=True)
        elif changed:
            raise UserError(
                f"{store.url} holds a run with a different config ({', '.join(changed)}); "
                "rerun with --restart to start over, or set another run.name"
            )
    make_run_dir(store)
    if not store.exists(RUN_MARKER):
        store.write_text(RUN_MARKER, json.dumps({"ftdist": __version__, "kind": kind,
                                                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    if new_text != old_text:  # a finished run opened again is left as it was
        store.write_text(SNAPSHOT, new_text)
    return store


def make_run_dir(store: RunStore) -> None:
    """The run's local directory (for s3:// runs: its working copy), made if missing."""
    try:
        store.local.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocked = next((p for p in (store.local, *store.local.parents) if p.is_file()), None)
        why = f"{blocked} is a file, where the run's directory goes" if blocked else e.strerror
        raise UserError(f"run.output: cannot create {store.local}: {why}; set run.output (or run.name) to a "
                        "directory") from None


def read_snapshot(store: RunStore, text: str) -> dict:
    """The run's config snapshot; a damaged one is named with the ways to go on, never overwritten."""
    try:
        snapshot = yaml.safe_load(text)
    except yaml.YAMLError as e:
        snapshot = e
    if not isinstance(snapshot, dict):
        why = f"not valid YAML ({getattr(snapshot, 'problem', None) or snapshot})" if isinstance(snapshot, Exception) \
            else "not a mapping of config sections"
        raise UserError(f"{store.url}/{SNAPSHOT}: the run's config snapshot is {why}; repair it (it is the config "
                        "the run started with), or rerun with --restart to start the run over")
    return snapshot


def with_defaults(snapshot: dict) -> dict:
    """The snapshot with every key's default filled in, as a config written now has them: keys
    a newer ftdist added (at their defaults) are no change to a run started before them."""
    from pydantic import ValidationError

    try:
        return yaml.safe_load(config_yaml(Config.model_validate(snapshot)))
    except ValidationError:  # a key since renamed or removed: compared as written
        return snapshot


def holds_progress(store: RunStore) -> bool:
    """Whether an earlier attempt left anything to resume or keep: a checkpoint or a final model."""
    return bool(store.list_dirs(CHECKPOINTS)) or store.exists(FINAL_DIR) or store.exists(SUMMARY)


def claim(store: RunStore, kind: str = RUN, trial: bool = False) -> None:
    """Refuse a directory that is a link, holds something and is not an ftdist run, or is
    the other kind's (a search's for a train, a run's for a tune); and a train whose run.output
    is a search's directory (its trials are the search's)."""
    if not store.remote and store.root.is_symlink():
        target = Path(os.path.realpath(store.root))
        what, _, key = KINDS[kind]
        raise UserError(f"{store.url} is a symbolic link (to {target}) where ftdist writes {what}'s directory; "
                        f"ftdist never writes through a link: give the directory itself (run.output {target.parent}, "
                        f"{key} {target.name}), or remove the link")
    names = store.list_names("")
    if names and RUN_MARKER not in names and not set(names) <= LOCKS:
        shown = ", ".join(sorted(set(names) - LOCKS)[:3]) + (", ..." if len(set(names) - LOCKS) > 3 else "")
        raise UserError(
            f"{store.url} is not empty ({shown}) and is not an ftdist run (no {RUN_MARKER} there): ftdist writes "
            "into, and deletes in, only directories it created; set run.name (or run.output) to a new or empty "
            "directory")
    if RUN_MARKER in names:
        found = kind_of(store, names)
        if found != kind:
            raise other_kind(store.url, found, kind)
    if kind == RUN and not trial:
        parent = store.url.rsplit("/", 1)[0]
        above = RunStore(parent, store.root.parent, store.storage)
        if above.exists(RUN_MARKER) and kind_of(above, above.list_names("")) == SEARCH:
            raise UserError(f"run.output {parent} is a tune search's directory: its trial-N runs are the search's, "
                            "and `ftdist train` never writes there (rerun `ftdist tune` to continue the search); set "
                            "run.output to another directory")


def kind_of(store: RunStore, names: list[str]) -> str:
    """What an ftdist directory is: its marker says; an older marker does not, and then a
    search is told by what only a search writes (tuner/, trial-N/ runs, results.csv ...)."""
    try:
        marker = json.loads(store.read_text(RUN_MARKER) or "{}")
    except (ValueError, UnicodeDecodeError):
        marker = {}
    if isinstance(marker, dict) and marker.get("kind") in KINDS:
        return marker["kind"]
    searched = TUNER_DIR in names or any(n in SEARCH_OUTPUTS for n in names) or any(
        n.startswith(TRIAL_PREFIX) and n[len(TRIAL_PREFIX):].isdigit() for n in names)
    if not searched and SNAPSHOT in names:  # a search stopped before its first trial: its snapshot says
        try:
            snapshot = yaml.safe_load(store.read_text(SNAPSHOT))
            tune = snapshot.get("tune") if isinstance(snapshot, dict) else None
            searched = isinstance(tune, dict) and tune.get("name") == store.url.rstrip("/").rsplit("/", 1)[-1] \
                and snapshot.get("run", {}).get("name") == tune.get("name")
        except (yaml.YAMLError, AttributeError, UnicodeDecodeError):
            pass
    return SEARCH if searched else RUN


def other_kind(url: str, found: str, kind: str) -> UserError:
    what, command, _ = KINDS[found]
    _, mine, key = KINDS[kind]
    return UserError(f"{url} is {what}'s directory (`{command}`), and `{mine}` never writes into it: it would "
                     f"replace that {'search' if found == SEARCH else 'run'}'s snapshot and files; set {key} to "
                     "another name")


def clear_run(store: RunStore) -> None:
    """--restart: delete what ftdist wrote in the run directory, keep everything else; refused
    while another process reads the (local) run, e.g. an export of it."""
    if store.remote:
        _clear(store)
        shutil.rmtree(store.root, ignore_errors=True)  # the local working copy in the cache is ftdist's own
        return
    with runlock.deleting(store.local, store.url):
        _clear(store)


def _clear(store: RunStore) -> None:
    for name in store.list_names(""):
        if name == RUN_MARKER or not is_ftdist_entry(name):
            continue
        if name.startswith(TRIAL_PREFIX) and not store.exists(f"{name}/{RUN_MARKER}"):
            continue  # a trial-N/ that ftdist did not make
        store.remove(name)


def may_change(key: str, resumable: set[str]) -> bool:
    return key in resumable or any(p.endswith(".") and key.startswith(p) for p in resumable)


def diff_keys(old, new, prefix: str = "") -> set[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = set(old) | set(new)
        return set().union(*(diff_keys(old.get(k), new.get(k), f"{prefix}{k}.") for k in keys)) if keys else set()
    return set() if old == new else {prefix.rstrip(".")}


def is_finished(store: RunStore) -> bool:
    return store.exists(FINISHED)


def read_summary(store: RunStore) -> dict:
    if not store.exists(SUMMARY) and is_finished(store):
        finish_from_final(store)
    summary = json.loads(store.read_text(SUMMARY))
    summary.update(run_dir=store.url, final_dir=store.path(FINAL_DIR))
    return summary


def finished_summary(store: RunStore) -> dict:
    if not store.exists(SUMMARY):
        print(f"ftdist: {store.url}: final/ is complete but the run stopped before its summary; finishing from "
              f"final/ (the summary rebuilt from {METRICS}), not training again", file=sys.stderr, flush=True)
    else:
        print(f"{store.url} is already finished; rerun with --restart to train again", flush=True)
    return read_summary(store)


# The model's figures a run's start record and its summary share (ftdist.model.build.ModelInfo).
MODEL_INFO = ("method", "trainable_params", "total_params", "num_layers", "frozen_blocks", "lora_targets")


def finish_from_final(store: RunStore) -> None:
    """A run stopped between writing final/ (complete: its ftdist.json is written last) and its
    summary: the summary rebuilt from the metrics log, which holds every figure it reports, and the
    plots drawn, so that the run is finished from final/ instead of trained again from step 0."""
    records = []
    for line in (store.read_text(METRICS) if store.exists(METRICS) else "").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by the stop
    steps = [r for r in records if "loss" in r and "event" not in r]
    start = next((r for r in records if r.get("event") == "start"), {})
    summary = {"steps": steps[-1]["step"] if steps else 0, "tokens_seen": steps[-1].get("tokens_seen") if steps else 0,
               **{k: start[k] for k in MODEL_INFO if k in start}}
    peaks = [r["peak_memory_gib"] for r in steps if r.get("peak_memory_gib") is not None]
    if peaks:
        summary["peak_memory_gib"] = max(peaks)
    done = [r for r in records if r.get("event") == "checkpoint"]
    if done:
        summary.update(checkpoint_bytes=done[-1].get("bytes"), base_model_bytes=done[-1].get("base_model_bytes"))
    evals = [r for r in records if "eval_loss" in r and r.get("step", 0) > 0]
    if evals:
        last = evals[-1]
        summary.update(eval_loss=last["eval_loss"], best_eval_loss=min(r["eval_loss"] for r in evals),
                       **{k: v for k, v in last.items() if k.startswith("eval_") and "/" not in k and k != "eval_loss"})
        by_source = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("eval_loss/")}
        if by_source:
            summary["eval_loss_by_source"] = by_source
        first = next((r for r in records if "eval_loss" in r and r.get("step") == 0), None)
        if first is not None and last["eval_loss"] > first["eval_loss"]:
            summary["negative_transfer"] = {"eval_loss_start": first["eval_loss"], "eval_loss_end": last["eval_loss"]}
    retained = [r for r in records if "retention_loss" in r and r.get("step", 0) > 0]
    before = start.get("retention_loss_before")
    if retained and before is not None:
        summary.update(retention_loss_before=before, retention_loss_after=retained[-1]["retention_loss"],
                       forgetting=retained[-1]["retention_loss"] - before)
    if not store.remote:
        final = store.local / FINAL_DIR
        summary["final_size_bytes"] = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
    summary["finished_from_final"] = f"the summary rebuilt from {METRICS}: the run stopped after final/ was written"
    store.write_text(SUMMARY, json.dumps(summary, indent=2))
    if not store.remote:
        try:
            plot_run(store.local)
        except Exception as e:  # noqa: BLE001 - plots are a courtesy; the run is finished without them
            print(f"ftdist: warning: {store.url}: no plots ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
