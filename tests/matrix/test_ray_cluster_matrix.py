"""`make test-all`: two nodes train together (STRICT_SPREAD, one worker a node), and when the head is
lost the driver ends with one message naming the newest complete checkpoint; the same command on
a new cluster resumes from it. Clusters it starts are stopped by it (never `ray stop`, which would
also stop the session's shared Ray)."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import (ONE_RAY_AT_A_TIME, REPO, paused, run_cli, start_cli, tiny_config, train_worker_pids,
                            wait_until, write_config)
from tests.e2e.test_ray_cluster import stop

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
