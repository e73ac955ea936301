"""The run directory <run.output>/<run.name>/: created, snapshotted, resumed or restarted."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from ftdist.config import Config, config_yaml
from ftdist.errors import UserError

SNAPSHOT = "config.yaml"
# Keys that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = {"train.max_steps", "train.epochs", "train.eval_every", "train.log_every",
                     "checkpoint.every_steps", "checkpoint.keep"}


def run_dir_of(cfg: Config) -> Path:
    if cfg.run.output.startswith("s3://"):
        raise UserError(f"run.output {cfg.run.output}: s3:// outputs are not supported yet; use a local directory")
    return (Path(cfg.run.output).expanduser() / cfg.run.name).resolve()


def prepare_run_dir(cfg: Config, restart: bool) -> Path:
    """Create the directory (or clear it with restart) and write the config snapshot.

    Resuming a run that was started with a different config would mix two experiments:
    that is refused with the differing keys named.
    """
    run_dir = run_dir_of(cfg)
    if restart and run_dir.exists():
        shutil.rmtree(run_dir)
    snapshot = run_dir / SNAPSHOT
    new_text = config_yaml(cfg)
    if snapshot.exists():
        changed = sorted(k for k in diff_keys(yaml.safe_load(snapshot.read_text()), yaml.safe_load(new_text))
                         if k not in RESUMABLE_CHANGES)
        if changed:
            raise UserError(
                f"{run_dir} holds a run with a different config ({', '.join(changed)}); "
                "rerun with --restart to start over, or set another run.name"
            )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"run.output: cannot create {run_dir}: {e.strerror}") from None
    snapshot.write_text(new_text)
    return run_dir


def diff_keys(old, new, prefix: str = "") -> set[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = set(old) | set(new)
        return set().union(*(diff_keys(old.get(k), new.get(k), f"{prefix}{k}.") for k in keys)) if keys else set()
    return set() if old == new else {prefix.rstrip(".")}


def is_finished(run_dir: Path) -> bool:
    return (run_dir / "final" / "ftdist.json").is_file()
