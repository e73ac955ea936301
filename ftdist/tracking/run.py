"""Opening the trackers of a run (rank 0 of a run or trial) and of a search (its parent run).

Each tracker's run id is kept in the run directory's tracking.json, so that a resumed run,
a restarted worker group and a trial run again continue the same tracker runs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ftdist.config.load import config_yaml
from ftdist.config.redact import redact_url
from ftdist.config.schema import Config
from ftdist.io import safewrite
from ftdist.io.layout import METRICS, TENSORBOARD_DIR, TRACKING, WANDB_DIR
from ftdist.io.metrics_log import parse_metrics, read_metrics
from ftdist.io.storage import RunStore
from ftdist.tracking.hub import Tracking, warn_line
from ftdist.tracking.mlflow_run import MlflowRun, client
from ftdist.tracking.params import flat_params, record_metrics, run_tags
from ftdist.tracking.preflight import unreachable_reason
from ftdist.tracking.tensorboard import TensorBoardLog
from ftdist.tracking.wandb_run import WandbRun


@dataclass(frozen=True)
class TrackingGroup:
    """The search a trial belongs to: its runs are children of the search's MLflow run and one
    W&B group; `searched`, the trial's own values of the searched keys."""

    name: str
    mlflow_parent_run_id: Optional[str] = None
    searched: dict[str, Any] = field(default_factory=dict)


def open_tracking(cfg: Config, store: RunStore, layout: dict, group: Optional[TrackingGroup] = None,
                  resumed_at: Optional[int] = None, warn=None) -> Tracking:
    """The trackers `cfg.logging` asks for, opened for this run (continued when tracking.json
    names their runs). `layout`: the engine's (world size, ZeRO stage), for tags; `resumed_at`:
    the checkpoint's step when the run resumes. A tracker that cannot be opened is one
    warning; the run goes on without it."""
    conf = cfg.logging
    warn = warn or warn_line
    if not (conf.tensorboard or conf.mlflow or conf.wandb):
        return Tracking([], warn)
    saved = read_state(store)
    # Steps this run logged before it stopped (resumed, or started again without a checkpoint):
    # a tracker run that is continued and cannot tell what it holds must not get them twice.
    logged = max((r["step"] for r in read_metrics(store.local / METRICS) if "step" in r), default=-1)
    params, tags = flat_params(cfg), run_tags(cfg, layout)
    if group is not None:
        tags.update(search=group.name, searched=",".join(sorted(group.searched)))
    name = cfg.run.name
    reporters, ids = [], TrackerIds(store, saved)
    own_dirs(store, tensorboard=conf.tensorboard is True, wandb=bool(conf.wandb))
    if conf.tensorboard:
        log_dir = store.local / TENSORBOARD_DIR if conf.tensorboard is True else \
            Path(conf.tensorboard).expanduser() / (group.name if group else "") / name
        upload = (lambda: store.upload(TENSORBOARD_DIR)) if conf.tensorboard is True and store.remote else \
            (lambda: None)
        reporters.append(_opened(warn, ids, "tensorboard", str(log_dir), lambda: _tensorboard(
            log_dir, resumed_at, config_yaml(cfg), upload)))
    if conf.mlflow:
        run_name = f"{conf.mlflow.run_name}-{name}" if conf.mlflow.run_name and group else conf.mlflow.run_name or name
        reporters.append(_opened(warn, ids, "mlflow", conf.mlflow.tracking_uri, lambda: _mlflow(
            conf.mlflow, run_name, params, tags, saved.get("mlflow"), group and group.mlflow_parent_run_id)))
    if conf.wandb:
        upload = (lambda: store.upload(WANDB_DIR)) if store.remote else (lambda: None)
        reporters.append(_opened(warn, ids, "wandb", conf.wandb.project, lambda: _wandb(
            conf.wandb, store.local, name, params, tags, saved.get("wandb"),
            group.name if group else None, "trial" if group else "train", upload)))
    reporters = [r for r in reporters if r is not None]
    for r in reporters:
        if r.skip_through is None:
            r.skip_through = logged
    return Tracking(reporters, warn)


def open_search_tracking(cfg: Config, store: RunStore, warn=None) -> tuple[Tracking, TrackingGroup]:
    """A search's own tracker runs (MLflow: the parent of every trial's run; W&B: a run of job
    type "search" in the trials' group), which get the results table at the end."""
    conf = cfg.logging
    name = cfg.tune.name
    warn = warn or warn_line
    saved = read_state(store)
    params = {**flat_params(cfg), **{f"tune.{k}": v for k, v in flat_tune(cfg).items()}}
    tags = {**run_tags(cfg), "search": name}
    reporters, ids = [], TrackerIds(store, saved)
    own_dirs(store, wandb=bool(conf.wandb))
    if conf.mlflow:
        reporters.append(_opened(warn, ids, "mlflow", conf.mlflow.tracking_uri, lambda: _mlflow(
            conf.mlflow, conf.mlflow.run_name or name, params, tags, saved.get("mlflow"), None)))
    if conf.wandb:
        upload = (lambda: store.upload(WANDB_DIR)) if store.remote else (lambda: None)
        reporters.append(_opened(warn, ids, "wandb", conf.wandb.project, lambda: _wandb(
            conf.wandb, store.local, name, params, tags, saved.get("wandb"), name, "search", upload)))
    reporters = [r for r in reporters if r is not None]
    for r in reporters:
        if r.skip_through is None:
            r.skip_through = -1  # a search logs its best once, at its end
    parent = next((r.run_id for r in reporters if r.name == "mlflow"), None)
    return Tracking(reporters, warn), TrackingGroup(name, parent)


def settle_trial_runs(cfg: Config, search: RunStore, stopped: list[str], finished: list[str], warn=None) -> None:
    """The MLflow runs of trials whose processes ended before they could end their runs, as the
    search ends. Trials ASHA stopped: KILLED (left RUNNING, or FAILED by the stop on their way
    down; their W&B offline files may be cut short, W&B's process ending with theirs). Trials
    that finished as the search was interrupted (they are not run again): what their runs lack
    of their metrics.jsonl sent, and FINISHED."""
    conf = cfg.logging.mlflow
    if conf is None or not (stopped or finished):
        return
    try:
        mlflow = client(conf)
        for trial in (*stopped, *finished):
            saved = read_state(search, f"{trial}/{TRACKING}").get("mlflow")
            if not saved or saved.get("tracking_uri") != redact_url(conf.tracking_uri):
                continue  # no run of this server's to settle
            run = mlflow.get_run(saved["run_id"]).info
            if run.lifecycle_stage != "active":
                continue
            if trial in stopped:
                if run.status in ("RUNNING", "FAILED"):
                    mlflow.set_terminated(saved["run_id"], "KILLED")
            elif run.status != "FINISHED" and search.exists(f"{trial}/{METRICS}"):
                reporter = MlflowRun(conf, trial, {}, {}, saved)  # continued: only what the run lacks is sent
                records = parse_metrics(search.read_text(f"{trial}/{METRICS}"))
                reporter.log([p for p in map(record_metrics, records) if p is not None])
                reporter.close("FINISHED")
    except Exception as e:  # noqa: BLE001: the search's results stand without it
        (warn or warn_line)(f"ftdist: warning: mlflow at {redact_url(conf.tracking_uri)}: cannot settle the runs of "
                            f"stopped or interrupted trials ({unreachable_reason(e)})")


def flat_tune(cfg: Config) -> dict[str, Any]:
    t = cfg.tune.model_dump(mode="json")
    space = t.pop("space")
    flat = {k: v for k, v in t.items() if not isinstance(v, dict)}
    flat.update({f"scheduler.{k}": v for k, v in t["scheduler"].items()})
    flat.update({f"space.{k}": json.dumps({kind: v for kind, v in spec.items() if v is not None})
                 for k, spec in space.items()})
    return flat


def own_dirs(store: RunStore, tensorboard: bool = False, wandb: bool = False) -> None:
    """The trackers' directories in the run (made if missing), before any tracker writes there:
    a link in their place is refused (never written through), not a tracker's warning."""
    for wanted, rel, what in ((tensorboard, TENSORBOARD_DIR, "TensorBoard's event files"),
                              (wandb, WANDB_DIR, "W&B's run files")):
        if wanted:
            safewrite.make_dirs(store.local / rel, store.local, what)


def read_state(store: RunStore, rel: str = TRACKING) -> dict:
    if not store.exists(rel):
        return {}
    try:
        return json.loads(store.read_text(rel))
    except ValueError:
        return {}  # damaged: new tracker runs rather than none


class TrackerIds:
    """tracking.json, written as soon as each tracker run exists: a run stopped a moment later
    (a search interrupted while its trials start) continues that tracker run, never a second one."""

    def __init__(self, store: RunStore, saved: dict):
        self.store, self.state = store, dict(saved)

    def keep(self, reporter) -> None:
        if hasattr(reporter, "state") and self.state.get(reporter.name) != reporter.state():
            self.state[reporter.name] = reporter.state()
            self.store.write_text(TRACKING, json.dumps(self.state, indent=2))


def _opened(warn, ids: TrackerIds, name: str, where: str, opener):
    """The reporter `opener` makes (its run's id kept at once), or None (with one warning) when
    its tracker cannot be reached."""
    try:
        reporter = opener()
    except Exception as e:  # noqa: BLE001: whatever the client raises, the run goes on without it
        warn(f"ftdist: warning: {name} at {redact_url(where)}: cannot open a run ({unreachable_reason(e)}); "
             "training goes on without it, every record is in metrics.jsonl")
        return None
    ids.keep(reporter)
    return reporter


def _tensorboard(log_dir: Path, resumed_at, config_text: str, upload):
    return TensorBoardLog(log_dir, resumed_at, config_text, upload)


def _mlflow(conf, run_name, params, tags, saved, parent):
    return MlflowRun(conf, run_name, params, tags, saved, parent)


def _wandb(conf, run_dir, run_name, params, tags, saved, group, job_type, upload):
    return WandbRun(conf, run_dir, run_name, params, tags, saved, group, job_type, upload)
