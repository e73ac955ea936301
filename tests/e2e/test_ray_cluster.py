"""Ray beyond one process: `ray job submit` (a killed worker, SIGTERM to the driver, nodes lost,
preempted and added: tests/e2e/test_elastic.py; two nodes, a lost head and a killed worker under
ZeRO-2 with its optimizer offloaded: tests/matrix/test_ray_cluster_matrix.py).

Each test bounds its waits; clusters it starts are stopped by it (never `ray stop`, which
would also stop the session's shared Ray).
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cluster.local_cluster import stop
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.ray]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Credentials planted wherever a user puts them: the cluster's environment (what a KubeRay
# Secret gives each pod) and a tracker URL in the config; none may leave ftdist.
PLANTED = {"AWS_ACCESS_KEY_ID": "AKIAPLANTED0000KEY01", "AWS_SECRET_ACCESS_KEY": "planted-aws-secret-Xq81",
           "HF_TOKEN": "hf_plantedtoken000000001", "MLFLOW_TRACKING_USERNAME": "ftdist",
           "MLFLOW_TRACKING_PASSWORD": "planted-mlflow-pw-41", "WANDB_API_KEY": "plantedwandbkey" + "7" * 25}
URL_PASSWORD = "planted-url-pw-77"
SECRETS = [v for k, v in PLANTED.items() if k != "MLFLOW_TRACKING_USERNAME"] + [URL_PASSWORD]


def leaked(text) -> list[str]:
    data = text if isinstance(text, bytes) else str(text).encode()
    return [s for s in SECRETS if s.encode() in data]


# Outside the Ray group, beside the tests that need no Ray: its head keeps its files (and the
# address file `ray start` leaves for later ray.init() calls) in a directory of its own, not
# /tmp/ray, so it never meets the session's Ray or another test's cluster.
def test_ray_job_submit_runs_the_tiny_job_and_no_secret_leaves_ftdist(tmp_path, s3, mlflow_server):
    """`ray job submit` of the example job, on a run in the S3 server tracked by MLflow and W&B
    (offline): it trains, and no planted credential appears in what the user and others see:
    the submit and log output, the dashboard's job metadata, Ray's log files, the store, the
    local cache, the tracker."""
    import tempfile

    import yaml

    from ftdist.config.load import load_config

    port, dashboard = free_port(), free_port()
    # Ray 2.60 protects its dashboard with a token (~/.ray/auth_token); clients send it in token mode.
    ray_logs = Path(tempfile.mkdtemp(prefix="rayjob-", dir="/tmp"))  # short: Ray's socket paths live here
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", RAY_AUTH_MODE="token", RAY_TMPDIR=str(ray_logs),
               **PLANTED)
    tracking_uri = mlflow_server.url.replace("http://", f"http://ftdist:{URL_PASSWORD}@")
    # a third of the example's steps, an evaluation and a checkpoint on the way
    cfg = load_config(REPO / "jobs" / "configs" / "tiny-ray.yaml", [
        *s3.overrides(), "train.max_steps=20", "train.eval_every=10", "checkpoint.every_steps=10",
        f"logging.mlflow.tracking_uri={tracking_uri}", "logging.mlflow.experiment=job",
        "logging.wandb.project=job", "logging.wandb.mode=offline", "logging.tensorboard=true"])
    config = tmp_path / "job.yaml"  # the URL with its password in a file, never on the command line
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             f"--temp-dir={ray_logs}",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dashboard}", "--disable-usage-stats",
                             # free ports, not Ray's fixed defaults: the session's own Ray may hold those
                             f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                             f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                             f"--ray-client-server-port={free_port()}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    api = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{api}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # it answers (401 without the token): up
                break
            except OSError:
                time.sleep(1)
        ray = [str(BIN / "ray"), "job"]
        submit_command = ray + ["submit", "--no-wait", "--address", api, "--working-dir", str(REPO),
                                "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"), "--",
                                "ftdist", "train", str(config)]
        for _ in range(20):  # the dashboard answers a little before its job agent does
            submit = subprocess.run(submit_command, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
            if "No available agent" not in submit.stderr + submit.stdout:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        job_id = re.search(r"(raysubmit_\w+)", submit.stdout + submit.stderr).group(1)
        # --follow streams the job's output until it ends: what a user watches.
        logs = subprocess.run(ray + ["logs", "--follow", "--address", api, job_id],
                              capture_output=True, text=True, timeout=900, env=env).stdout
        status = subprocess.run(ray + ["status", "--address", api, job_id],
                                capture_output=True, text=True, timeout=60, env=env)
        assert "succeeded" in (status.stdout + status.stderr).lower(), status.stdout + status.stderr + logs[-3000:]
        listing = subprocess.run(ray + ["list", "--address", api], capture_output=True, text=True, timeout=60,
                                 env=env)  # the dashboard's job metadata: entrypoint, runtime env, ...
        assert job_id in listing.stdout, listing.stdout + listing.stderr
    finally:
        stop(head)
    assert not Path("/tmp/ray/ray_current_cluster").is_file() or f":{port}" not in \
        Path("/tmp/ray/ray_current_cluster").read_text()  # no address file left where others look
    # Readable progress: the plan, steps with loss, evaluations, where the model went; no Ray noise.
    assert "plan: 2 workers on cpu (gloo)" in logs
    assert re.search(r"step \d+/\d+\s+loss \d", logs) and "eval loss" in logs and "done: model in" in logs
    assert "PlacementGroupCleaner" not in logs and "core_worker.cc" not in logs
    run = s3.url("runs", "tiny-ray")
    assert s3.fs.exists(f"{run}/final/model.safetensors") and s3.fs.exists(f"{run}/loss.png")

    # No credential anywhere.
    assert not leaked(submit.stdout + submit.stderr + logs + status.stdout + listing.stdout)
    stored = [p for p in s3.fs.find(run)]
    assert len(stored) > 20 and not [p for p in stored if leaked(s3.fs.cat_file(p))]
    for root in (s3.cache, ray_logs):  # Ray's logs and session files, less the job's own uploaded code (this file)
        files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and "working_dir_files" not in str(p)]
        assert files and not [p for p in files if leaked(p.read_bytes())], root
    client = mlflow_server.client()
    runs = client.search_runs([client.get_experiment_by_name("job").experiment_id])
    assert len(runs) == 1 and not leaked(json.dumps([runs[0].data.params, runs[0].data.tags]))
    assert runs[0].data.params["logging.mlflow.tracking_uri"] == mlflow_server.url.replace("http://", "http://***@")
    shutil.rmtree(ray_logs, ignore_errors=True)
