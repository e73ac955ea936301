"""The `ftdist tune` driver: preflight, one base model and one dataset for all trials, then a
Ray Tune experiment (new, or restored from <run.output>/<tune.name>/tuner), then the report.

Resources: a trial's Ray Train run places its own workers (Train V2 gives each run its own
placement group), so a trial is admitted only while the cluster can hold the workers of
every running trial: at most cluster // (workers x resources per worker) trials run at
once. Trials then never wait on each other for CPUs or GPUs, which is how concurrent
trials deadlock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from ftdist.config.schema import Config
from ftdist.errors import UserError
from ftdist.io import safewrite
from ftdist.io.layout import BASE_DIR, TUNER_DIR
from ftdist.io.storage import RunStore, is_remote
from ftdist.launch.preflight import check_inputs, model_config_of
from ftdist.launch.ray_train import preflight_cluster, shared_inputs, worker_resources
from ftdist.launch.rayhead import watch_head
from ftdist.launch.rundir import SEARCH, TUNE_RESUMABLE_CHANGES, check_free, writing
from ftdist.model.source import gguf_location
from ftdist.tracking.run import open_search_tracking
from ftdist.tune.space import check_space, ray_domains

TRIAL_DRIVER_MEMORY = 256 * 2**20


@dataclass
class Experiment:
    cfg: Config  # as the user wrote it (s3:// data paths kept)
    raw: dict  # the same, as plain data: trials and best.yaml start from it
    store: RunStore  # <run.output>/<tune.name>
    tracking: Any  # tracking.hub.Tracking: the search's parent run, ended by the caller with the results
    release: Any = None  # lets go of the search's directory (runlock): the caller's, once the report is written

    def done(self) -> None:
        if self.release is not None:
            self.release()


def tune(cfg: Config, raw: dict, restart: bool = False, address: Optional[str] = None) -> tuple[Experiment, Any]:
    """Run (or continue) the experiment; returns it with Tune's ResultGrid. The search's
    directory stays held by this process (one writer) until the caller's Experiment.done()."""
    from contextlib import ExitStack

    checked, use_gpu = preflight(cfg, raw, address)
    concurrency = trial_concurrency(cfg, use_gpu)
    held = ExitStack()
    store = held.enter_context(writing(experiment_config(cfg), restart, TUNE_RESUMABLE_CHANGES, kind=SEARCH))
    try:
        tracking, results = search(cfg, checked, raw, store, use_gpu, concurrency)
    except BaseException:
        held.close()
        raise
    return Experiment(cfg, raw, store, tracking, held.close), results


def search(cfg: Config, checked, raw: dict, store: RunStore, use_gpu: bool, concurrency: int):
    from dataclasses import asdict

    experiment, datasets, steps = trial_inputs(cfg, checked, raw, store, use_gpu)
    tracking, group = open_search_tracking(checked.cfg, store)
    experiment["tracking_group"] = asdict(group)
    t = cfg.tune
    print(f"tune: {t.num_samples} trials of {cfg.distributed.workers} worker(s), {concurrency} at a time; search "
          f"{t.search}, scheduler {t.scheduler.type}; {steps} steps per trial; outputs in {store.url}", flush=True)
    tuner = build_tuner(cfg, store, experiment, datasets, concurrency)
    try:
        with watch_head(lambda: f"the search's state and its trials' checkpoints are kept in {store.url}"):
            results = tuner.fit()
    except BaseException:
        tracking.end("FAILED")
        raise
    return tracking, results


def preflight(cfg: Config, raw: dict, address: Optional[str]):
    """Everything that can be wrong, before the first trial: the config and its space, the
    data, the cluster. Returns the checked inputs (local data paths, format) and whether
    trials use GPUs."""
    if cfg.tune is None:
        raise UserError("the config has no tune: section; add one (docs/tuning.md) to search with ftdist tune")
    if cfg.distributed.workers == 0:
        raise UserError("ftdist tune runs each trial as a Ray Train run: set distributed.workers to 1 or more")
    if cfg.distributed.elastic:  # trials compared at unequal sizes, and each holding workers the others wait for
        raise UserError(f"distributed.workers {list(cfg.distributed.workers)}: a search's trials run at a fixed size; "
                        "set distributed.workers to one number for ftdist tune")

    checked = check_inputs(cfg)
    check_space(raw, cfg, model_config_of(cfg).num_hidden_layers)  # before Ray starts
    check_free(experiment_config(cfg), SEARCH)  # a train's directory, or a search another tune runs
    use_gpu, _, _ = preflight_cluster(checked.cfg, address)
    return checked, use_gpu


def trial_inputs(cfg: Config, checked, raw: dict, store: RunStore, use_gpu: bool) -> tuple[dict, dict, int]:
    """What every trial shares, made once: the base model (built into the experiment for
    model.init), the Ray datasets, and the experiment's description. Returns those and the
    steps of one trial."""
    t = cfg.tune
    inputs = shared_inputs(checked, store)
    steps = inputs.plan.total_steps
    if t.scheduler.type == "asha" and t.scheduler.max_t < steps:
        raise UserError(f"tune.scheduler.max_t {t.scheduler.max_t} is less than the {steps} steps a trial "
                        f"runs: ASHA's rungs would not reach the end; set max_t to {steps}, or "
                        f"train.max_steps to {t.scheduler.max_t}")
    experiment = {
        "raw_config": raw, "tune_url": store.url, "tune": t.model_dump(), "use_gpu": use_gpu,
        "data_stats": inputs.data_stats, "split_in_workers": inputs.split_in_workers, "model_source": trial_model_source(cfg, store.path(BASE_DIR), inputs.base_path),
        # A classifier's labels as preflight read them from the rows: every trial's head has the same.
        "classification_labels": checked.cfg.classification.labels,
    }
    return experiment, inputs.datasets, steps


def build_tuner(cfg: Config, store: RunStore, experiment: dict, datasets: dict, concurrency: int):
    """A Tuner for the experiment: restored from its state in the store when there is one
    (finished trials kept, unfinished ones run again and resume), else a new one."""
    from ray import tune as ray_tune

    from ftdist.tune.trial import run_trial

    t = cfg.tune
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(run_trial, experiment=experiment, datasets=datasets),
        # The trial's own process only waits on its Train run: no CPU (its workers hold those), but
        # Tune needs some resource in a trial's bundle; a little memory takes nothing from the workers.
        {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})
    storage_path, fs = tune_storage(store)
    path = f"{storage_path}/{TUNER_DIR}"
    if not store.remote:
        safewrite.check(store.root / TUNER_DIR, store.root, "Ray Tune's state")  # never through a link
    if ray_tune.Tuner.can_restore(path, storage_filesystem=fs):
        print(f"tune: continuing the experiment in {store.path(TUNER_DIR)} (trials that ended are kept)", flush=True)
        return ray_tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                      storage_filesystem=fs)
    return ray_tune.Tuner(
        trainable, param_space=ray_domains(t.space),
        tune_config=ray_tune.TuneConfig(
            metric=t.metric, mode=t.mode, num_samples=t.num_samples,
            search_alg=search_algorithm(cfg, concurrency), scheduler=scheduler(cfg),
            trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=ray_tune.RunConfig(name=TUNER_DIR, storage_path=storage_path, storage_filesystem=fs,
                                      failure_config=ray_tune.FailureConfig(max_failures=0), verbose=1))


def experiment_config(cfg: Config) -> Config:
    """The config whose run directory is the experiment's: <run.output>/<tune.name>."""
    return cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": cfg.tune.name})})


def trial_model_source(cfg: Config, experiment_base: str, base_path: str) -> dict:
    """The model section's source for every trial: the experiment's base (model.init, a GGUF
    file dequantized), or the user's model as an absolute path or URL (a trial's process need
    not share this one's working directory)."""
    from pathlib import Path

    if cfg.model.init:
        return {"name_or_path": experiment_base, "init": None, "tokenizer": None}
    name = cfg.model.name_or_path
    if gguf_location(cfg.model):
        source = {"name_or_path": experiment_base, "gguf_file": None}
    else:
        source = {"name_or_path": name if is_remote(name) or not Path(base_path).is_dir()
                  else str(Path(base_path).resolve())}
    if cfg.model.tokenizer and not is_remote(cfg.model.tokenizer) and Path(cfg.model.tokenizer).exists():
        source["tokenizer"] = str(Path(cfg.model.tokenizer).resolve())
    return source


def trial_name(trial) -> str:
    """trial-00003: the index Tune gives the trial (stable across a restored experiment)."""
    return "trial-" + trial.trial_id.rsplit("_", 1)[-1]


def trial_concurrency(cfg: Config, use_gpu: bool) -> int:
    """Trials the cluster can run at once, each with all its workers placed."""
    import ray

    d, total = cfg.distributed, ray.cluster_resources()
    need = worker_resources(cfg, use_gpu)
    fits = min(math.floor(total.get(r, 0) / (amount * d.workers)) for r, amount in need.items() if amount > 0)
    if fits < cfg.tune.max_concurrent_trials:
        print(f"tune: the cluster holds {fits} trial(s) of {d.workers} worker(s) at once; running {fits} at a time "
              f"instead of tune.max_concurrent_trials {cfg.tune.max_concurrent_trials}", flush=True)
    return max(1, min(fits, cfg.tune.max_concurrent_trials))


def search_algorithm(cfg: Config, concurrency: int):
    """Seeded by train.seed: the same config samples the same trials."""
    if cfg.tune.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=cfg.train.seed), max_concurrent=concurrency)  # TPE
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=concurrency)


def scheduler(cfg: Config):
    s = cfg.tune.scheduler
    if s.type == "none":
        from ray.tune.schedulers import FIFOScheduler

        return FIFOScheduler()
    from ray.tune.schedulers import ASHAScheduler

    # time_attr "step": grace_period and max_t count optimizer steps, as the rest of the config does.
    # stop_last_trials off: a trial that reaches max_t ends by itself, after saving its final model.
    return ASHAScheduler(time_attr="step", grace_period=s.grace_period, reduction_factor=s.reduction_factor,
                         max_t=s.max_t, stop_last_trials=False)


def tune_storage(store: RunStore) -> tuple[str, Any]:
    """Where Ray Tune keeps the experiment (in TUNER_DIR there): the experiment's directory,
    local or in the bucket through s3fs (pyarrow names bucket paths without s3://)."""
    if not store.remote:
        return str(store.root), None
    import pyarrow.fs

    return store.fs._strip_protocol(store.url), pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(store.fs))
