"""Stops that restart the workers (a preemption notice, a resize), in local mode with the notice
planted, and the bookkeeping between the driver, Ray Train's controller and the workers
(ftdist/launch/restarts.py) without a cluster."""

import json
import time
from types import SimpleNamespace

import pytest

from ftdist.io.metrics_log import read_metrics
from ftdist.launch.local import train_local
from ftdist.launch.restarts import RunSignals, describe_failure
from ftdist.training.context import LocalContext
from ftdist.training.notice import Notice, StoppedOnNotice
from tests.conftest import tiny_config


def test_a_notice_too_short_for_a_checkpoint_is_told_with_the_figures_and_the_resume_loses_no_step(tmp_path,
                                                                                                   monkeypatch):
    cfg = tiny_config(tmp_path, "train.max_steps=6", "train.eval_every=100", "train.log_every=1",
                      "checkpoint.every_steps=100")
    asked = []

    def at_step_3(self):  # a deadline already past: no checkpoint could be committed in time
        asked.append(1)
        return Notice("preemption notice for node abc (rank 0; 0 s before the node goes)", restarts=True,
                      deadline=time.time() - 1) if len(asked) == 3 else None

    monkeypatch.setattr(LocalContext, "stop_requested", at_step_3)
    with pytest.raises(StoppedOnNotice) as stopped:
        train_local(cfg, show_progress=False)
    assert stopped.value.notice.restarts and "after step 3 of 6" in str(stopped.value)
    run_dir = tmp_path / "runs" / "t"
    records = read_metrics(run_dir / "metrics.jsonl")
    short = [r for r in records if r.get("event") == "short_notice"]
    assert len(short) == 1 and short[0]["seconds_left"] < 0 and short[0]["checkpoint_s"] is None
    last = records[-1]
    assert last["event"] == "stopped" and last["step"] == 3 and last["deadline_left_s"] < 0
    assert (run_dir / "checkpoints" / "step-3" / "COMPLETE").is_file()  # committed late, complete all the same

    monkeypatch.undo()
    summary = train_local(cfg, show_progress=False)
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert summary["restarts"] == [{"step": 3, "from_world_size": 1, "world_size": 1,
                                    "why": "the run was started again", "steps_lost": 0}]
    assert json.loads((run_dir / "summary.json").read_text())["restarts"] == summary["restarts"]


def test_a_restart_is_told_by_its_first_cause_and_a_stop_for_a_notice_outranks_what_ray_makes_of_it():
    signals = RunSignals()
    signals.note_restart("worker failure (rank 1: gone)")
    signals.note_restart("worker failure (Training failed due to controller error:)")  # a retried start
    assert signals.cause() == "worker failure (rank 1: gone)" and signals.cause() is None  # read once

    signals.request_checkpoint("room for 3 workers (Ray Train's resize check)")
    assert signals.asked() == {"stop": None, "resize": "room for 3 workers (Ray Train's resize check)"}
    assert not signals.checkpoint_done()
    signals.committed("room for 3 workers (Ray Train's resize check)")
    assert signals.checkpoint_done()
    signals.note_restart("worker failure (rank 2: A worker health check failed.)")
    assert signals.cause() == "room for 3 workers (Ray Train's resize check)"
    assert signals.asked()["resize"] is None  # the new group has nothing to checkpoint for

    signals.request_stop("SIGTERM")
    signals.request_stop("SIGTERM again")
    assert signals.asked()["stop"] == "SIGTERM"


def test_a_failure_is_told_in_one_bounded_line_with_its_rank_and_no_credentials():
    preempted = SimpleNamespace(preempted=True)
    assert describe_failure(SimpleNamespace(worker_failures={2: preempted})) == \
        "node preempted without notice (rank 2)"
    info = SimpleNamespace(preempted_ranks=[1, 2])
    assert describe_failure(SimpleNamespace(preemption_info=info)) == "node preempted with notice (rank 1, 2)"
    crash = RuntimeError("read https://user:hunter2@store.example/x failed\n" + "trace " * 500)
    told = describe_failure(SimpleNamespace(worker_failures={0: crash}))
    assert told.startswith("worker failure (rank 0: read https://") and "hunter2" not in told and len(told) < 240
