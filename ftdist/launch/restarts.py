"""Between the driver, Ray Train's controller and the workers of a Ray run: stops asked of the
driver, resizes of an elastic run, and why each restart of the workers happened.

    RunSignals    an actor every party can reach: the driver's stop (SIGTERM), the resize the
                  controller is about to make, the checkpoint the workers committed for it, and
                  the cause of the latest restart (read by the new workers' rank 0, which logs it)
    forwarded     the driver's SIGTERM to RunSignals, by a thread (a signal handler must not call Ray)
    await_restart the workers, their checkpoint for a preemption or a resize committed, until Ray
                  Train ends their group
    RestartWatch  a callback in Ray Train's controller: notes each restart's cause, and before it
                  resizes a running group (an elastic run growing back) has the workers checkpoint
                  at a step boundary, so that a resize loses no step; keeps the cluster view
                  that sizes the group fresh (nodes lost, nodes come)

Preemption notices need none of this: Ray Train's watcher tells the workers, which ask
ray.train.get_preemption_info() at each step boundary (training/context.py).
This module imports Ray at the top: only launch/ray_train.py imports it, inside functions.
"""

from __future__ import annotations

import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator, Optional

import ray

# DeveloperAPI: the controller's and the worker group's hooks
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

from ftdist.config.redact import redact_url
from ftdist.training.notice import Notice, StopNotice

SIGNALS_NAMESPACE = "ftdist"  # where a driver's RunSignals actor lives (named ftdist-signals-<id>): `ray list actors`
RESIZE_CHECKPOINT_TIMEOUT_S = 600  # how long a resize waits for the workers' checkpoint before it goes ahead
# For a lost node (a preemption's deadline passed, a node that stopped answering) to be declared
# gone before a restart counts the nodes: Ray's own health checks take about 15 s by default.
LOST_NODE_WAIT_S = 45
PROBE_TIMEOUT_S = 5  # for a task on a node whose worker failed: no answer, the node is taken as lost
RESTART_WAIT_MARGIN_S = 120  # past a preemption's deadline (or a resize's request) before a waiting worker gives up


class RunSignals:
    """One run's signals (a Ray actor: see `start`)."""

    def __init__(self) -> None:
        self.stop: Optional[str] = None  # the run is to end (the driver got SIGTERM)
        self.resize: Optional[str] = None  # the workers are to checkpoint: the group is about to be resized
        self.checkpointed = False  # the workers committed their checkpoint for it
        # Why the workers stopped for a restart (a preemption notice, a resize): the cause of the
        # next restart, whatever Ray makes of the node's end (its workers' deaths may look like failures).
        self.stopped_for: Optional[str] = None
        self.restart: Optional[str] = None  # why the controller restarted the workers, until rank 0 reads it

    def request_stop(self, why: str) -> None:
        self.stop = self.stop or why

    def request_checkpoint(self, why: str) -> None:
        self.resize, self.checkpointed = why, False

    def committed(self, why: str) -> None:
        self.checkpointed, self.stopped_for = True, why

    def ended(self) -> None:
        """The workers finished the run: a resize waiting for their checkpoint waits no more."""
        self.checkpointed = True

    def checkpoint_done(self) -> bool:
        return self.checkpointed

    def asked(self) -> dict:
        return {"stop": self.stop, "resize": self.resize}

    def note_restart(self, why: str) -> None:
        # The first cause until rank 0 reads it: a restart may take tries (a start that timed out).
        self.restart = self.stopped_for or self.restart or why
        self.resize, self.stopped_for = None, None  # a new group has nothing to checkpoint for

    def cause(self) -> Optional[str]:
        why, self.restart = self.restart, None
        return why


def start_signals():
    """A RunSignals actor for one run, named so an operator (or a test) can find it, on the
    driver's node: a node the run may lose (a spot node) would take the run's signals with it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(RunSignals).options(
        name=f"ftdist-signals-{uuid.uuid4().hex[:12]}", namespace=SIGNALS_NAMESPACE, scheduling_strategy=here).remote()


@contextmanager
def forwarded(notice: StopNotice, poll_s: float = 0.05) -> Iterator:
    """A RunSignals actor, told of a stop asked of this driver for as long as the block runs."""
    signals = start_signals()
    done = threading.Event()

    def forward() -> None:
        while not done.wait(poll_s):
            if notice.reason:
                ray.get(signals.request_stop.remote(notice.reason), timeout=60)
                return

    thread = threading.Thread(target=forward, name="ftdist-stop-forwarder", daemon=True)
    thread.start()
    try:
        yield signals
    finally:
        done.set()
        thread.join(timeout=70)
        ray.kill(signals)


class RestartWatch(ControllerCallback, WorkerGroupCallback):
    """Ray Train's controller calls this at each change of its state and each start of a worker
    group (in the controller's process)."""

    def __init__(self, signals, resize_check_s: Optional[float] = None) -> None:
        """`resize_check_s`: an elastic run's (None: a fixed size)."""
        self.signals = signals
        self.resize_check_s = resize_check_s
        self.refreshed = time.monotonic()
        self.node_of: dict[int, str] = {}  # each rank's node, in the group running now

    def after_worker_group_start(self, worker_group) -> None:
        try:
            self.node_of = {w.distributed_context.world_rank: w.metadata.node_id for w in worker_group.get_workers()}
        except Exception:  # noqa: BLE001 - only a restart's wait for a lost node needs it
            self.node_of = {}

    def after_controller_state_update(self, previous_state, current_state) -> None:
        try:
            state = type(current_state).__name__
            if state == "RunningState" and self.resize_check_s is not None and \
                    time.monotonic() - self.refreshed >= self.resize_check_s:
                # Nodes that came are seen at this resize check, not at the coordinator's next 20 s tick.
                self.refreshed = time.monotonic()
                refresh_cluster_view()
            elif state == "ResizingState":  # a running group (an elastic run that can grow): checkpoint first
                workers = current_state.scaling_decision.num_workers
                self.checkpoint_before_resize(f"room for {workers} workers (Ray Train's resize check)")
            elif state in ("RestartingState", "ReschedulingState"):
                error = current_state.training_failed_error
                ray.get(self.signals.note_restart.remote(describe_failure(error)), timeout=60)
                info = getattr(error, "preemption_info", None)
                failed = getattr(error, "worker_failures", None) or {}
                lost = info.preempted_node_ids if info is not None else unreachable(
                    {self.node_of[rank] for rank in failed if rank in self.node_of})
                wait_until_gone(lost, LOST_NODE_WAIT_S)
                refresh_cluster_view()
        except Exception:  # noqa: BLE001 - a callback's error would count as a failure of the run
            pass

    def checkpoint_before_resize(self, why: str) -> None:
        """The workers checkpoint at their next step boundary and say so; the resize then shuts
        them down. Bounded: a group that does not answer is resized anyway (it loses the steps
        since its last checkpoint, as on a failure)."""
        ray.get(self.signals.request_checkpoint.remote(why), timeout=60)
        deadline = time.monotonic() + RESIZE_CHECKPOINT_TIMEOUT_S
        while time.monotonic() < deadline and not ray.get(self.signals.checkpoint_done.remote(), timeout=60):
            time.sleep(0.2)
        ray.get(self.signals.note_restart.remote(why), timeout=60)


def unreachable(node_ids: set[str]) -> list[str]:
    """Those of the nodes where no task runs within PROBE_TIMEOUT_S (a node that is gone, before
    Ray's health checks say so); nodes whose workers failed for another reason answer at once."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0, max_retries=0)
    def answer() -> bool:
        return True

    probes = {answer.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(): node
              for node in node_ids}
    done, _ = ray.wait(list(probes), num_returns=len(probes), timeout=PROBE_TIMEOUT_S)
    answered = set()
    for ref in done:
        try:
            ray.get(ref, timeout=1)
            answered.add(probes[ref])
        except Exception:  # noqa: BLE001 - a probe that failed did not answer
            pass
    return sorted(node_ids - answered)


def wait_until_gone(node_ids: list[str], timeout_s: float) -> None:
    """Until the lost nodes are declared gone (bounded): a restart that counted them would ask for
    workers there, and wait a minute (Ray Train's start timeout) before it tried the nodes left."""
    if not node_ids:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive_nodes().intersection(node_ids):
            return
        time.sleep(0.5)


def alive_nodes() -> set[str]:
    """The ids of the cluster's nodes Ray holds alive."""
    return {node["NodeID"] for node in ray.nodes() if node["Alive"]}


def await_restart(ctx, notice: Notice) -> None:
    """A worker after the checkpoint for a preemption or a resize: rank 0 says it is committed (a
    resize waits for that); then the workers wait for Ray Train to end the group and start the
    next. Once a preempted node is gone, the workers elsewhere end (Ray Train then restarts at
    once, not at the deadline); else Ray Train ends them at the deadline, or for the resize.
    Bounded: a group still here well after that fails, which Ray Train counts and retries like
    any failure."""
    if ctx.is_main and ctx.signals is not None:
        ray.get(ctx.signals.committed.remote(notice.reason), timeout=60)
    here = ray.get_runtime_context().get_node_id()
    until = (notice.deadline or time.time() + 120) + RESTART_WAIT_MARGIN_S  # Ray's default deadline: 120 s
    while time.time() < until:
        if notice.nodes and here not in notice.nodes and not alive_nodes().issuperset(notice.nodes):
            return
        time.sleep(1.0)
    raise RuntimeError(f"{notice.reason}: the checkpoint was committed, but Ray Train did not restart the workers "
                       f"within {RESTART_WAIT_MARGIN_S} s of the deadline")


def refresh_cluster_view() -> None:
    """Ray Train sizes a restarted group by the cluster view of Ray Data's autoscaling coordinator,
    refreshed every 20 s: a node lost a moment ago would still count, and the restart would wait
    for it a minute (Ray Train's start timeout) before trying again with the nodes there are.
    One refresh now spares that; internal to Ray, so its absence is no failure."""
    try:
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )

        ray.get(get_or_create_autoscaling_coordinator().get_reserved_resources.remote("ftdist", recompute=True),
                timeout=30)
    except Exception:  # noqa: BLE001 - the minute's wait is the worst it costs
        pass


def describe_failure(error: BaseException) -> str:
    """A restart's cause in one bounded clause: a preemption (with notice or without) or the
    first line of what the workers died of."""
    info = getattr(error, "preemption_info", None)
    if info is not None:
        ranks = ", ".join(map(str, info.preempted_ranks))
        return f"node preempted with notice (rank {ranks})"
    failures = getattr(error, "worker_failures", None) or {}
    if any(getattr(e, "preempted", False) for e in failures.values()):
        return f"node preempted without notice (rank {', '.join(map(str, sorted(failures)))})"
    if failures:
        rank, first = sorted(failures.items())[0]
        return f"worker failure (rank {rank}: {first_line(first)})"
    return f"worker failure ({first_line(error)})"


def first_line(error: BaseException, limit: int = 200) -> str:
    """An error's first line, its URLs' credentials redacted, cut to `limit` characters."""
    line = redact_url((str(error).strip().splitlines() or [type(error).__name__])[0])
    return line if len(line) <= limit else line[: limit - 3] + "..."
