"""Ray mode: preflight on the driver, then a Ray Train TorchTrainer whose workers each run
the one loop with the run's engine (distributed.engine; auto: DeepSpeed).

Driver: check config and data (preflight.py), then the cluster; print the plan and a memory
estimate per device (failing fast with advice when it does not fit); build the base model
files and the Ray datasets (`shared_inputs`, which a search's trials share too); fit.
Workers: `worker_loop`, the same `loop.train` local mode runs, with a RayContext (whose
engine is distributed.engine's: ftdist/engines). A worker that dies restarts the group (distributed.max_failures
times; a preempted node, distributed.max_preemptions times), and the loop resumes from the newest complete
checkpoint. An elastic run (distributed.workers: [min, max]) trains on as many workers as the cluster holds
in the range; a preemption notice, a SIGTERM to the driver and a resize each stop the workers at a step
boundary with a checkpoint first (launch/restarts.py), so none loses a step.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ftdist.config.plan import Plan, accumulation_steps, make_plan
from ftdist.config.schema import Config
from ftdist.engines.registry import engine_class, resolve
from ftdist.errors import UserError
from ftdist.io import safewrite
from ftdist.io.checkpoints import describe_newest
from ftdist.io.quiet import WORKER_ENV, filter_driver_streams, quiet_libraries, quiet_ray_data
from ftdist.io.storage import RunStore, cache_path, is_remote
from ftdist.launch.preflight import CheckedInputs, check_dtype, check_fits, check_inputs
from ftdist.launch.rayhead import answers, watch_head
from ftdist.launch.rundir import check_free, finished_summary, is_finished, read_summary, writing
from ftdist.model.source import load_tokenizer
from ftdist.tracking.run import TrackingGroup
from ftdist.training.notice import StopNotice, StoppedOnNotice, stop_on_sigterm

GPU_PROBE_TIMEOUT_S = 120
# Ray Train's controller polls its worker group every 2 s by default: each run's start, end
# and every restart waited up to that long for nothing. A poll is one cheap actor call.
# Its preemption watcher polls Ray's drained nodes every 5 s: a second of a notice's 30 s (GCP's,
# Azure's) is worth more to the checkpoint.
TRAIN_CONTROLLER_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}


def train_ray(cfg: Config, restart: bool = False, address: Optional[str] = None,
              show_progress: bool = True, notice: Optional[StopNotice] = None) -> dict:
    """`notice`: SIGTERM to this driver (after it joined Ray, whose own handler it replaces
    meanwhile) stops the workers at their next step boundary with a checkpoint."""
    checked = check_inputs(cfg)  # the snapshot keeps s3:// paths; the driver reads local copies
    check_free(cfg)  # another writer of this run: told before Ray starts
    use_gpu, device_type, per_device = preflight_cluster(checked.cfg, address)
    say = print if show_progress else (lambda *_, **__: None)
    say(describe_plan(cfg, device_type), flush=True)
    say(f"memory (estimate): {per_device.estimate.describe()}, of {per_device.available / 2**30:.1f} GiB", flush=True)

    with writing(cfg, restart) as store:  # held by the driver: its workers write under it
        if is_finished(store):
            return finished_summary(store)
        with stop_on_sigterm(notice or StopNotice()) as notice:
            inputs = shared_inputs(checked, store)
            loop_config = worker_config(checked.cfg, store, inputs.data_stats, inputs.split_in_workers,
                                        show_progress)
            if not notice.reason:
                from ftdist.launch.restarts import forwarded

                with forwarded(notice) as signals:
                    fit(checked.cfg, store, {**loop_config, "signals": signals}, inputs.datasets, use_gpu)
        if notice.reason and not is_finished(store):  # (a stop asked during the last step: the run finished)

            raise StoppedOnNotice(f"{notice.reason}: the workers stopped at a step boundary; "
                                  f"{describe_newest(store)}; run the same command again to resume from it")
        return read_summary(store)


@dataclass(frozen=True)
class DeviceBudget:
    available: float  # bytes free on one worker's device
    estimate: Any  # memory.MemoryEstimate for this run on it


def preflight_cluster(cfg: Config, address: Optional[str]) -> tuple[bool, str, DeviceBudget]:
    """Join the cluster, check it can place the workers, and that the run fits their devices.
    Returns (use GPUs, device type, the per-device budget)."""
    connect(address)
    use_gpu, device_type, per_device = cluster_budget(cfg)
    import torch

    device = torch.device(device_type)
    check_dtype(cfg, device)
    d = cfg.distributed
    # At the fewest workers of an elastic range: ZeRO's partitions are largest there.
    estimate = check_fits(cfg, device, d.min_workers, resolve(d.engine, local=False), available=per_device)
    return use_gpu, device_type, DeviceBudget(per_device, estimate)


@dataclass(frozen=True)
class SharedInputs:
    """What every worker (and every trial of a search) reads, made once on the driver."""

    base_path: str
    datasets: dict  # Ray datasets of packed rows, materialized
    data_stats: dict
    plan: Plan
    # Small data: every worker reads all training rows and keeps its part, which spares
    # Ray Data's split coordinator (an actor that holds up the workers' start).
    split_in_workers: bool


def shared_inputs(checked: CheckedInputs, store: RunStore) -> SharedInputs:
    """The base model files (built once for model.init, before any worker) and the Ray
    datasets; the loop's own batch checks run on them before any worker starts."""
    from ftdist.data.raydata import SPLIT_IN_WORKERS_MAX_ROWS, ray_datasets
    from ftdist.training.base import resolve_base

    cfg = checked.cfg
    base_path = resolve_base(cfg, store)
    datasets, stats = ray_datasets(cfg, load_tokenizer(cfg, base_path))
    datasets = {name: ds.materialize() for name, ds in datasets.items()}
    plan = make_plan(cfg, stats["train_rows"], cfg.distributed.min_workers)
    # An elastic run's workers read every row: the data order is then the same at every world size.
    return SharedInputs(base_path, datasets, stats, plan,
                        split_in_workers=stats["train_rows"] <= SPLIT_IN_WORKERS_MAX_ROWS or cfg.distributed.elastic)


def worker_config(cfg: Config, store: RunStore, data_stats: dict, split_in_workers: bool,
                  show_progress: bool, tracking_group: Optional[dict] = None) -> dict:
    """What `worker_loop` receives: the config, where the run lives, what the driver counted,
    how the training rows reach the workers (see SharedInputs), and, for a trial, the search
    its tracker runs belong to (tracking.run.TrackingGroup as a dict)."""
    return {"config": cfg.model_dump(mode="json"), "run": {"url": store.url, "root": str(store.root)},
            "show_progress": show_progress, "data_stats": data_stats, "split_in_workers": split_in_workers,
            "tracking_group": tracking_group}


def fit(cfg: Config, store: RunStore, loop_config: dict, datasets: dict, use_gpu: bool,
        callbacks: Optional[list] = None) -> None:
    """Ray Train's run of `worker_loop`. loop_config["signals"]: the run's RunSignals actor
    (launch/restarts.py), made here when the caller has none (a search's trial)."""
    from ftdist.launch.restarts import forwarded

    if loop_config.get("signals") is None:
        with forwarded(StopNotice()) as signals:
            return fit(cfg, store, {**loop_config, "signals": signals}, datasets, use_gpu, callbacks)

    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ftdist.data.raydata import SPLIT
    from ftdist.launch.restarts import RestartWatch

    d = cfg.distributed
    safewrite.make_dirs(store.root / "ray", store.root, "Ray Train's bookkeeping")  # never through a link
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=d.workers, use_gpu=use_gpu,
                                     resources_per_worker=d.resources_per_worker or None,
                                     placement_strategy=d.placement,
                                     elastic_resize_monitor_interval_s=d.resize_check_s),
        run_config=RunConfig(name=cfg.run.name, storage_path=str(store.root / "ray"),  # Ray's own bookkeeping
                             failure_config=FailureConfig(max_failures=d.max_failures,
                                                          max_preemption_failures=d.max_preemptions),
                             worker_runtime_env={"env_vars": WORKER_ENV},
                             callbacks=[*(callbacks or []), RestartWatch(loop_config["signals"],
                                                                          d.resize_check_s if d.elastic else None)]),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[] if loop_config["split_in_workers"] else SPLIT),
    )

    with watch_head(lambda: describe_newest(store)):
        try:
            trainer.fit()
        except Exception as e:  # Ray wraps worker errors; a user error inside is still one message
            user_error = find_user_error(e)
            if user_error is not None:
                raise UserError(str(user_error)) from None
            raise


def worker_loop(config: dict[str, Any]) -> None:
    """Each Ray Train worker: the one loop, with this worker's context."""
    quiet_libraries()
    quiet_ray_data()
    import ray.train
    import ray.train.torch

    from ftdist.training.context import RayContext
    from ftdist.training.loop import train

    context = ray.train.get_context()
    cfg = Config.model_validate(config["config"])
    rank = context.get_world_rank()
    ctx = RayContext(
        store=worker_store(config["run"], cfg, rank),
        device=ray.train.torch.get_device(), rank=rank, world_size=context.get_world_size(),
        show_progress=config["show_progress"], data_stats=config["data_stats"],
        split_in_workers=config["split_in_workers"],
        tracking_group=TrackingGroup(**config["tracking_group"]) if config.get("tracking_group") else None,
        signals=config.get("signals"),
    )
    if ctx.device.type == "cuda":
        import torch

        torch.cuda.set_device(ctx.device)
    try:
        train(cfg, ctx)
        if ctx.is_main and ctx.signals is not None:  # (the last step takes no stop: a resize asked then ends here)
            import ray

            ray.get(ctx.signals.ended.remote(), timeout=60)
    except StoppedOnNotice as stopped:
        if stopped.notice.restarts:  # a preemption or a resize: its checkpoint committed, Ray Train restarts
            if ctx.is_main and ctx.show_progress:
                print(f"stopping: {stopped}", flush=True)
            from ftdist.launch.restarts import await_restart

            await_restart(ctx, stopped.notice)
        return  # a stop asked of the driver: the group ends without a failure to retry


def worker_store(run: dict, cfg: Config, rank: int) -> RunStore:
    """This worker's RunStore: a local run is the driver's (shared) directory; an s3:// run is
    worked on in this node's own cache (each node has its own home and disk)."""
    url = run["url"]
    root = cache_path(cfg.storage, "runs", url) if is_remote(url) else Path(run["root"])
    return RunStore(url, root, cfg.storage, rank)


# ---------------------------------------------------------------- the cluster


def connect(address: Optional[str]) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS, or the one this job runs in), or start one."""
    import ray

    filter_driver_streams()
    quiet_ray_data()
    os.environ.update(WORKER_ENV)  # inherited by a local Ray this process starts
    for key, value in TRAIN_CONTROLLER_ENV.items():  # Ray Train hands these to its controller
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    address = reachable_address(address or os.environ.get("RAY_ADDRESS"))
    try:
        ray.init(address=address, logging_config=ray.LoggingConfig(log_level="WARNING"))
    except ConnectionError as e:
        raise UserError(f"cannot reach the Ray cluster at {address}: {e}; start it with `ray start --head` "
                        "or drop --address to start a local one") from None


def reachable_address(address: Optional[str]) -> Optional[str]:
    """The address to give ray.init, checked first: Ray retries an address where nothing
    answers for minutes, and waits for ever on the cluster a stale ray_current_cluster file
    names (a `ray start` since stopped). A given address that does not answer is an error;
    a stale file is ignored, with one line, for a new local Ray."""
    from ray._common.utils import get_ray_address_file

    if address is not None:
        if address not in ("auto", "local") and not address.startswith("ray://") and not answers(address):
            raise UserError(f"no Ray cluster answers at {address} (--address or RAY_ADDRESS); start one there with "
                            "`ray start --head`, or drop the address to start a local Ray")
        return address
    current = Path(get_ray_address_file(None))
    if not current.is_file():
        return None
    named = current.read_text().strip()
    if named and answers(named):
        return None  # ray.init joins the cluster the file names
    print(f"ftdist: ignoring {current}: no Ray answers at {named or '(empty file)'} (a stopped `ray start`); "
          "starting a local Ray", flush=True)
    return "local"


def cluster_budget(cfg: Config) -> tuple[bool, str, float]:
    """(use GPUs, device type, memory bytes per worker device), and a check that the cluster
    can place the workers at all: Ray would otherwise wait for them forever."""
    import ray

    d = cfg.distributed
    nodes = [n for n in ray.nodes() if n["Alive"]]
    total = ray.cluster_resources()
    gpus = total.get("GPU", 0)
    use_gpu = gpus >= 1 if d.use_gpu == "auto" else d.use_gpu
    need = worker_resources(cfg, use_gpu)
    workers = d.min_workers  # an elastic run starts with as many as fit, from its minimum
    what = f"distributed.workers {d.workers}" + (" (its minimum)" if d.elastic else "")
    for resource, amount in need.items():
        if amount * workers > total.get(resource, 0):
            raise UserError(
                f"{what} x {amount:g} {resource} (distributed.resources_per_worker) need "
                f"{amount * workers:g} {resource} but the Ray cluster has {total.get(resource, 0):g}; "
                "lower distributed.workers or resources_per_worker, or add nodes")
    if d.placement == "STRICT_SPREAD" and workers > len(nodes):
        raise UserError(f"distributed.placement STRICT_SPREAD puts each of {workers} workers on its own node, "
                        f"but the cluster has {len(nodes)} nodes; use SPREAD or PACK, or add nodes")
    if use_gpu:
        return True, "cuda", gpu_memory()
    per_node = max(1, math.ceil(workers / len(nodes))) if d.placement != "PACK" else workers
    return False, "cpu", min(n["Resources"].get("memory", 0) for n in nodes) / max(1, min(per_node, workers))


def worker_resources(cfg: Config, use_gpu: bool) -> dict[str, float]:
    """What Ray places each training worker with: resources_per_worker, else one CPU (and a GPU)."""
    need = dict(cfg.distributed.resources_per_worker) or {"CPU": 1.0}
    if use_gpu:
        need.setdefault("GPU", 1.0)
    return need


def gpu_memory() -> float:
    """Free memory of one of the cluster's GPUs, measured by a task that holds one."""
    import ray

    @ray.remote(num_gpus=1)
    def probe() -> float:
        import torch

        return float(torch.cuda.mem_get_info()[0])

    try:
        return ray.get(probe.remote(), timeout=GPU_PROBE_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise UserError(f"no GPU of the Ray cluster became free within {GPU_PROBE_TIMEOUT_S} s to measure its "
                        "memory; free one, or set distributed.use_gpu: false") from None


def describe_plan(cfg: Config, device_type: str) -> str:
    d, t = cfg.distributed, cfg.train
    engine = engine_class(resolve(d.engine, local=False)).describe(cfg)
    split = " or ".join(f"{n} workers x {accumulation_steps(t, n)} accumulation steps" for n in
                        (d.sizes if len(d.sizes) <= 3 else (d.min_workers, d.max_workers)))
    workers = (f"{d.min_workers} to {d.max_workers} workers (elastic)" if d.elastic else f"{d.workers} workers")
    return (f"plan: {workers} on {device_type} ({'nccl' if device_type == 'cuda' else 'gloo'}), "
            f"{engine}, placement {d.placement}; "
            f"global batch {t.batch_size} = {split} x micro batch {t.micro_batch_size}")


def find_user_error(error: BaseException, depth: int = 0) -> Optional[BaseException]:
    """The UserError somewhere inside Ray's wrappers of a worker's exception, if any."""
    if error is None or depth > 8:
        return None
    if isinstance(error, UserError):  # Ray's wrapper subclasses the cause: prefer the clean original
        cause = getattr(error, "cause", None)
        return cause if isinstance(cause, UserError) else error
    inner = [error.__cause__, error.__context__, getattr(error, "cause", None),
             getattr(error, "controller_failure", None), *getattr(error, "worker_failures", {}).values()]
    for candidate in inner:
        found = find_user_error(candidate, depth + 1) if isinstance(candidate, BaseException) else None
        if found is not None:
            return found
    return None
