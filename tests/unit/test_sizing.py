"""`ftdist plan`: every shipped config fits the GPUs its comments name, from the model's
config.json alone; a config that does not fit exits 2 with what would make it fit."""

import re

import pytest
import yaml

from bench.real_task import GGUF_NAME, gguf_file
from ftdist.cli import main
from tests.conftest import REPO, run_cli

SHAPES = REPO / "jobs" / "model-configs"
# Each config that names a hub model, and the shape (jobs/model-configs) standing in for it.
HUB_SHAPES = {"meta-llama/Llama-3.1-8B": SHAPES / "llama-3.1-8b", "meta-llama/Llama-3.2-1B": SHAPES / "llama-3.2-1b"}


def is_ftdist_config(path) -> bool:
    docs = list(yaml.safe_load_all(path.read_text()))
    return len(docs) == 1 and isinstance(docs[0], dict) and "method" in docs[0]


CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml")) + sorted(filter(is_ftdist_config, (REPO / "k8s").rglob("*.yaml")))


def plan(capsys, *args: str) -> tuple[int, str]:
    code = main(["plan", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture(scope="module")
def demo_shape(tmp_path_factory):
    """What tiny-qlora.yaml fine-tunes (the demo's final model), as its config.json alone."""
    from ftdist.config.load import load_config
    from ftdist.model.source import init_model_config

    out = tmp_path_factory.mktemp("tiny-demo-final")
    init_model_config(load_config(REPO / "jobs" / "configs" / "tiny-demo.yaml").model.init).save_pretrained(out)
    return out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_fits_the_gpus_it_names(path, capsys, demo_shape):
    model = yaml.safe_load(path.read_text())["model"].get("name_or_path")
    stand_in = {**HUB_SHAPES, "runs/tiny-demo/final": demo_shape,
                GGUF_NAME: gguf_file()}  # make demo-real names the wheel's file; plan reads its metadata
    shape = ["--set", f"model.name_or_path={stand_in[model]}"] if model else []
    code, out = plan(capsys, path, *shape)  # 80 GB GPUs, the config's own number of workers
    assert code == 0, out
    assert out.splitlines()[-1] == "fits"
    assert re.search(r"memory \(estimate\): weights [\d.]+, gradients [\d.]+, optimizer [\d.]+, (reference [\d.]+, )?"
                     r"activations [\d.]+ = [\d.]+ GiB per device, of 79.1 GiB", out)  # a reference: a frozen copy


def test_the_8b_qlora_run_needs_gradient_checkpointing_and_says_so(capsys):
    config = REPO / "jobs" / "configs" / "llama-8b-qlora.yaml"
    shape = f"model.name_or_path={HUB_SHAPES['meta-llama/Llama-3.1-8B']}"
    code, out = plan(capsys, config, "--set", shape, "--set", "train.gradient_checkpointing=false")
    assert code == 2
    verdict = out.splitlines()[-1]
    assert verdict.startswith("does not fit: about ") and "71.2 GiB usable there (90% of 79.1)" in verdict
    assert verdict.split("79.1); ")[1].startswith("set train.gradient_checkpointing: true")
    # With it (the config as shipped) the activations shrink by more than ten times.
    activations = {}
    for switch in ("false", "true"):
        _, text = plan(capsys, config, "--set", shape, "--set", f"train.gradient_checkpointing={switch}")
        activations[switch] = float(re.search(r"activations ([\d.]+)", text).group(1))
    assert activations["true"] < activations["false"] / 10


def test_workers_and_gpu_memory_from_the_command_line(capsys):
    config = REPO / "jobs" / "configs" / "llama-1b-full-zero3.yaml"
    shape = f"model.name_or_path={HUB_SHAPES['meta-llama/Llama-3.2-1B']}"
    _, four = plan(capsys, config, "--set", shape)
    _, two = plan(capsys, config, "--set", shape, "--workers", "2")
    assert "plan: 2 workers on cuda (nccl), DeepSpeed ZeRO-3" in two
    optimizer = [float(re.search(r"optimizer ([\d.]+)", t).group(1)) for t in (four, two)]
    assert optimizer[1] == pytest.approx(2 * optimizer[0], rel=0.01)  # ZeRO-3 shards it over the workers
    code, small = plan(capsys, config, "--set", shape, "--gpu-memory", "16")
    assert code == 2 and "of 16 GiB" in small and "set train.gradient_checkpointing: true" in small


def test_plan_through_the_cli_needs_no_weights_and_exits_2_on_a_bad_path(tmp_path):
    result = run_cli("plan", "jobs/configs/llama-8b-qlora.yaml", "--set",
                     f"model.name_or_path={HUB_SHAPES['meta-llama/Llama-3.1-8B']}", timeout=120)
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "fits", result.stdout + result.stderr
    assert result.stderr == ""
    missing = run_cli("plan", "jobs/configs/llama-8b-qlora.yaml", "--set", f"model.name_or_path={tmp_path}",
                      timeout=120)
    assert missing.returncode == 2 and "no config.json" in missing.stderr and "Traceback" not in missing.stderr
