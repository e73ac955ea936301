"""The cpu-smoke RayJob without a cluster: its entrypoint, with the env its head pod sets, on
a local Ray head, its MinIO replaced by a loopback S3 server (moto). What a KubeRay retry does
(the same command on a new cluster, with an empty disk, resumes from the store) is
test_ray_cluster's lost-head test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import DEMO, ONE_RAY_AT_A_TIME, REPO
from tests.unit.test_k8s import rayjob_entrypoint_and_env

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.s3, ONE_RAY_AT_A_TIME]


def test_the_rayjob_entrypoint_trains_on_a_ray_head_into_the_store(tmp_path, ray_local, s3):
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

    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(x) for x in s3.fs.cat_file(f"{run}/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 21))
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 10, 20]
    assert s3.fs.exists(f"{run}/checkpoints/step-15/COMPLETE") and s3.fs.exists(f"{run}/final/model.safetensors")
    assert pod_env["AWS_SECRET_ACCESS_KEY"] not in result.stdout + result.stderr
