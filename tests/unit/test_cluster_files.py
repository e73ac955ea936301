"""cluster/ and jobs/ files: valid for the tools that read them, without a cluster."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from ftdist.cli import build_parser
from ftdist.config.load import load_config
from tests.conftest import REPO


def test_gpu_cluster_config_matches_the_autoscaler_schema():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster" / "gpu-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))  # Ray's own check, as `ray up` runs it: defaults filled in
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1 and config["head_node_type"] in config["available_node_types"]
    assert any("ftdist" in c for c in config["setup_commands"])


def test_an_invalid_cluster_config_is_caught():
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((REPO / "cluster" / "gpu-cluster.yaml").read_text())
    config["max_workers"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


def test_runtime_env_is_one_ray_accepts():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # raises on unknown fields or wrong types
    assert "runs/" in env["excludes"]


@pytest.mark.parametrize("name", ["tiny-ray.yaml", "llama-8b-qlora.yaml", "llama-1b-full-zero3.yaml"])
def test_job_configs_are_distributed_and_parse_with_the_cli(name):
    cfg = load_config(REPO / "jobs" / "configs" / name)
    assert cfg.distributed.workers >= 2
    args = build_parser().parse_args(["train", f"jobs/configs/{name}"])
    assert args.command == "train" and not args.local
    submit = (REPO / "jobs" / "submit.sh").read_text()
    assert "ray job submit" in submit and "--runtime-env cluster/runtime_env.yaml" in submit
