"""The run directory <run.output>/<run.name> (local or s3://): created, snapshotted, resumed or restarted."""

from __future__ import annotations

import shutil

import yaml

from ftdist.config import Config, config_yaml
from ftdist.errors import UserError
from ftdist.storage import RunStore, open_run_store

SNAPSHOT = "config.yaml"
# Keys that may change between an interrupted run and its resumption: how long and how
# often, where and on how many workers it runs (checkpoints load at any world size).
RESUMABLE_CHANGES = {"train.max_steps", "train.epochs", "train.eval_every", "train.log_every",
                     "checkpoint.every_steps", "checkpoint.keep",
                     "distributed.workers", "distributed.zero_stage", "distributed.use_gpu",
                     "distributed.resources_per_worker", "distributed.placement", "distributed.max_failures",
                     "storage.endpoint_url", "storage.region", "storage.retry_deadline_s", "storage.cache_dir",
                     "tune."}  # a prefix: `ftdist train` does not read the tune: section
# A search's trials must stay comparable, and a restored search keeps the trial admission it
# started with: only retries and how the store is reached may change.
TUNE_RESUMABLE_CHANGES = {"distributed.max_failures", "storage.endpoint_url", "storage.region",
                          "storage.retry_deadline_s", "storage.cache_dir"}


def prepare_run_dir(cfg: Config, restart: bool, resumable: set[str] = RESUMABLE_CHANGES) -> RunStore:
    """Create the run (or clear it with restart) and write the config snapshot.

    Resuming a run that was started with a different config would mix two experiments:
    that is refused with the differing keys named.
    """
    store = open_run_store(cfg)
    if restart:
        store.remove("")
        shutil.rmtree(store.root, ignore_errors=True)
    new_text = config_yaml(cfg)
    old_text = store.read_text(SNAPSHOT) if store.exists(SNAPSHOT) else None
    if old_text is not None:
        old = yaml.safe_load(old_text)
        changed = sorted(k for k in diff_keys(old, yaml.safe_load(new_text)) if not may_change(k, resumable))
        if changed:
            raise UserError(
                f"{store.url} holds a run with a different config ({', '.join(changed)}); "
                "rerun with --restart to start over, or set another run.name"
            )
    try:
        store.local.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"run.output: cannot create {store.local}: {e.strerror}") from None
    if new_text != old_text:  # a finished run opened again is left as it was
        store.write_text(SNAPSHOT, new_text)
    return store


def may_change(key: str, resumable: set[str]) -> bool:
    return key in resumable or any(p.endswith(".") and key.startswith(p) for p in resumable)


def diff_keys(old, new, prefix: str = "") -> set[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = set(old) | set(new)
        return set().union(*(diff_keys(old.get(k), new.get(k), f"{prefix}{k}.") for k in keys)) if keys else set()
    return set() if old == new else {prefix.rstrip(".")}


def is_finished(store: RunStore) -> bool:
    return store.exists("final/ftdist.json")
