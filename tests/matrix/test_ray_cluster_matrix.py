"""`make test-all`: two nodes train together (STRICT_SPREAD, one worker a node), and when the head is
lost the driver ends with one message naming the newest complete checkpoint; the same command on
a new cluster resumes from it. SIGTERM to a driver and a killed worker of a ZeRO-2 run with its
optimizer offloaded (in `make test`, tests/e2e/test_elastic.py covers both on ZeRO-2 without offload). Clusters it starts are stopped by it (never `ray stop`, which would
also stop the session's shared Ray)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.local_cluster import stop
from ftdist.io.metrics_log import read_metrics
from tests.conftest import (
    ONE_RAY_AT_A_TIME,
    REPO,
    complete_checkpoints,
    paused,
    ray_session_dir,
    run_cli,
    start_cli,
    tiny_config,
    train_worker_pids,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def wait_for_line(process: subprocess.Popen, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{''.join(seen)}")


def start_cluster(nodes: int = 2) -> tuple[subprocess.Popen, str]:
    """cluster/local_cluster.py in the background, and its address."""
    cluster = subprocess.Popen([sys.executable, str(REPO / "cluster" / "local_cluster.py"), "--nodes", str(nodes),
                                "--cpus-per-node", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        return cluster, wait_for_line(cluster, r"address: (\S+)", 120).group(1)
    except BaseException:
        stop(cluster)
        raise


# Steps after the first checkpoint (step 10): the run is paused (SIGSTOP) as soon as the test has
# seen that checkpoint complete in the store, before the head is killed, so it cannot finish first;
# these only cover the moment between seeing the checkpoint and pausing.
STEPS_PAST_THE_KILL = 40




@ONE_RAY_AT_A_TIME  # its clusters live in /tmp/ray, where Ray's State API looks for the session's
def test_two_nodes_train_together_and_a_lost_head_resumes_on_a_new_cluster(tmp_path, s3):
    """One worker on each node of a 2-node cluster, the run in the S3 server. The head node is
    killed as a crash would once a checkpoint is complete: the driver ends with exit 2 and one
    message naming that checkpoint. The same command on a new cluster, from an empty local
    cache (a fresh KubeRay pod's disk), resumes from it: every step logged once."""
    cfg = tiny_config(tmp_path, *s3.overrides(), "distributed.workers=2", "distributed.placement=STRICT_SPREAD",
                      "distributed.max_failures=0", f"train.max_steps={STEPS_PAST_THE_KILL + 10}", "train.log_every=1",
                      "checkpoint.every_steps=10",
                      "checkpoint.keep=10",  # none pruned: the checkpoint the message names must still be there
                      name="two-nodes")
    config = str(write_config(tmp_path, cfg))
    run = s3.url("runs", "two-nodes")

    cluster, address = start_cluster()
    try:
        driver = start_cli("train", config, "--address", address)
        wait_until(lambda: s3.fs.exists(f"{run}/checkpoints/step-10/COMPLETE"), 300, "a complete checkpoint", driver)
        with paused(train_worker_pids(cluster.pid)):  # the run cannot finish before its head is gone
            cluster.send_signal(signal.SIGUSR1)
            lost = time.monotonic()
            out, _ = driver.communicate(timeout=120)
            told_after = time.monotonic() - lost
    finally:
        stop(cluster)
    assert driver.returncode == 2, out[-4000:]
    message = [x for x in out.splitlines() if x.startswith("ftdist: error: lost the Ray head at")]
    assert len(message) == 1 and "Traceback" not in out, out[-4000:]
    named = re.search(rf"the newest complete checkpoint is {run}/checkpoints/step-(\d+);", message[0])
    assert named and s3.fs.exists(f"{run}/checkpoints/step-{named.group(1)}/COMPLETE"), message[0]
    assert "run the same command on a new Ray cluster" in message[0]
    assert told_after < 45, told_after  # before Ray's own minute of reconnecting
    assert not s3.fs.exists(f"{run}/final")

    # The surviving node's worker may finish a checkpoint more before it notices: the rerun takes the newest.
    newest = max(int(p.rsplit("-", 1)[1]) for p in s3.fs.ls(f"{run}/checkpoints") if s3.fs.exists(f"{p}/COMPLETE"))
    assert newest >= int(named.group(1))
    shutil.rmtree(s3.cache)  # the new cluster's nodes start with nothing on disk
    cluster, address = start_cluster()
    try:
        result = run_cli("train", config, "--address", address, timeout=600)
    finally:
        stop(cluster)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "plan: 2 workers on cpu (gloo), DeepSpeed ZeRO-2, placement STRICT_SPREAD" in result.stdout
    records = [json.loads(x) for x in s3.fs.cat_file(f"{run}/metrics.jsonl").decode().splitlines()]
    starts = [r for r in records if r.get("event") == "start"]
    assert starts and all(r["world_size"] == 2 and r["nodes"] == 2 for r in starts)  # one worker a node
    assert [r["checkpoint"] for r in records if r.get("event") == "resume"] == [f"step-{newest}"]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS_PAST_THE_KILL + 11))  # every step once
    assert s3.fs.exists(f"{run}/final/model.safetensors")


def step_numbers(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


STEPS = 80


@ONE_RAY_AT_A_TIME
def test_sigterm_stops_the_driver_at_a_checkpoint_and_a_killed_worker_restarts_the_group(tmp_path, ray_local):
    """SIGTERM to the driver: the workers stop at their next step boundary with a checkpoint, the
    driver says so in one line (exit 143). The same command resumes from that step; a worker
    killed then restarts the group from the last checkpoint: every step exactly once."""
    # ZeRO-2 with the optimizer offloaded to CPU: the restart also reloads offloaded optimizer states.
    cfg = tiny_config(tmp_path, "distributed.workers=2", "distributed.max_failures=1", "distributed.zero_stage=2",
                      "distributed.offload_optimizer=cpu",
                      f"train.max_steps={STEPS}", "checkpoint.every_steps=10", "train.eval_every=1000",
                      "train.log_every=10", name="killed")
    config = str(write_config(tmp_path, cfg, "killed.yaml"))
    address = ray_local.get_runtime_context().gcs_address
    run_dir = tmp_path / "runs" / "killed"

    def newest_checkpoint() -> int:
        complete = complete_checkpoints(run_dir)
        return int(complete[-1].name.split("-")[1]) if complete else 0

    def past_a_checkpoint(newer_than: int = 0) -> bool:
        """A step logged past a complete checkpoint newer than `newer_than`. A checkpoint completes
        a little after its step (its files written, then COMPLETE): a tiny model may be several
        steps further by then, so no window of steps is asked for, only room left before the end."""
        newest, steps = newest_checkpoint(), step_numbers(run_dir)
        return bool(newest > newer_than and steps and newest < steps[-1] < STEPS - 10)

    driver = start_cli("train", config, "--address", address)
    try:
        wait_until(past_a_checkpoint, 300, "a step past a complete checkpoint", driver)
        signalled_after = step_numbers(run_dir)[-1]
        driver.send_signal(signal.SIGTERM)
        out, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 143, out[-3000:]
    told = [line for line in out.splitlines() if line.startswith("ftdist:")]
    assert len(told) == 1 and told[0].startswith("ftdist: stopped on SIGTERM: the workers stopped"), out[-3000:]
    stopped = step_numbers(run_dir)[-1]
    assert signalled_after <= stopped < STEPS and newest_checkpoint() == stopped, out[-3000:]
    assert not (run_dir / "final").exists()

    driver = start_cli("train", config, "--address", address)
    try:
        wait_until(lambda: past_a_checkpoint(newer_than=stopped), 300, "a step past a checkpoint after the resume",
                   driver)
        workers = train_worker_pids(ray_session_dir())
        with paused(workers):  # nothing steps or checkpoints while the test reads and kills
            killed_after, restart_point = step_numbers(run_dir)[-1], newest_checkpoint()
            os.kill(workers[-1], signal.SIGKILL)
        out, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out[-3000:]
    resumes = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "resume"]
    assert resumes[0] == stopped  # the rerun: from the step SIGTERM stopped at, none lost
    # the restart: from a checkpoint at or before the kill, no older than the newest complete then (one
    # being finished at the kill may complete after it: rank 0 writes COMPLETE once every rank is done)
    assert len(resumes) == 2 and stopped < restart_point <= resumes[1] <= killed_after
    assert step_numbers(run_dir) == list(range(1, STEPS + 1))  # every step exactly once, none missing
    assert (run_dir / "final" / "model.safetensors").is_file()
