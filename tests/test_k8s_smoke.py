"""The cpu-smoke RayJob without a cluster: its entrypoint, with the env its head pod sets, on
a local Ray head, its MinIO replaced by a loopback S3 server (moto). Killed once, then run
again as KubeRay's retry would run it: the same command, and the run resumes from the store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ONE_RAY_AT_A_TIME, DEMO, REPO, wait_until
from tests.test_k8s import rayjob_entrypoint_and_env

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.s3, ONE_RAY_AT_A_TIME]


def test_the_rayjob_entrypoint_runs_on_a_ray_head_and_a_retry_resumes(tmp_path, ray_local, s3):
    argv, pod_env, config_text = rayjob_entrypoint_and_env("cpu-smoke")
    output = yaml.safe_load(config_text)["run"]["output"]
    bucket = output.removeprefix("s3://").split("/")[0]
    s3.fs.mkdir(bucket)  # what the overlay's bucket Job does
    config = tmp_path / "config" / "train.yaml"  # where the ConfigMap is mounted in the pod
    config.parent.mkdir()
    config.write_text(config_text)
    command = [str(Path(sys.executable).parent / argv[0]), *(str(config) if a == "/config/train.yaml" else a
                                                             for a in argv[1:])]
    # What differs from the pod: the image's data directory, the MinIO Service (the relay to
    # moto here), the cache's place; and fewer steps, to keep the test short.
    for override in (f"data.train={DEMO / 'train.jsonl'}", f"data.eval={DEMO / 'eval.jsonl'}",
                     f"storage.endpoint_url={s3.relay.url}", f"storage.cache_dir={tmp_path / 'cache'}",
                     "train.max_steps=20", "checkpoint.every_steps=5", "train.eval_every=10"):
        command += ["--set", override]
    env = {**os.environ, **pod_env, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    run = f"{output}/{yaml.safe_load(config_text)['run']['name']}"

    def complete() -> list[str]:
        root = f"{run}/checkpoints"
        return [p for p in (s3.fs.ls(root) if s3.fs.exists(root) else []) if s3.fs.exists(f"{p}/COMPLETE")]

    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(complete, 300, "a complete checkpoint in the store", first)
    first.send_signal(signal.SIGKILL)  # the pod is gone; KubeRay retries the job
    first.wait(timeout=30)

    retry = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert "resuming from s3://" in retry.stdout
    records = [json.loads(x) for x in s3.fs.cat_file(f"{run}/metrics.jsonl").decode().splitlines()]
    assert len([r for r in records if r.get("event") == "resume"]) == 1
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 21))  # nothing lost, nothing twice
    assert s3.fs.exists(f"{run}/final/model.safetensors")
    assert pod_env["AWS_SECRET_ACCESS_KEY"] not in retry.stdout + retry.stderr
