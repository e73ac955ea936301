"""The CLI as a user meets it: exit codes, one clear message per user error, no traceback;
resume after a kill; generate and report."""

import time
from pathlib import Path

import pytest

from ftdist.io.metrics_log import read_metrics
from tests.conftest import (
    DEMO,
    REPO,
    run_cli,
    run_cli_probed,
    tiny_config,
    write_config,
)


def assert_user_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [x for x in result.stderr.splitlines() if x.startswith("ftdist: error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def config_file(tmp_path, *overrides):
    return str(write_config(tmp_path, tiny_config(tmp_path, *overrides)))


def test_help_for_each_command():
    for command in ("train", "generate", "report"):
        result = run_cli(command, "--help")
        assert result.returncode == 0 and "usage: ftdist " + command in result.stdout


def test_typo_in_a_key(tmp_path):
    path = config_file(tmp_path)
    assert_user_error(run_cli("train", path, "--local", "--set", "train.lrr=1e-3"),
                      "train.lrr: unknown key", "did you mean train.lr?")


def test_typo_in_the_yaml_file(tmp_path):
    path = Path(config_file(tmp_path))
    path.write_text(path.read_text().replace("micro_batch_size:", "micro_batchsize:"))
    assert_user_error(run_cli("train", str(path), "--local"), str(path), "train.micro_batchsize: unknown key",
                      "did you mean train.micro_batch_size?")


def test_wrong_type(tmp_path):
    assert_user_error(run_cli("train", config_file(tmp_path), "--local", "--set", "train.batch_size=many"),
                      "train.batch_size", "'many'")


def test_missing_config_and_data_files(tmp_path):
    assert_user_error(run_cli("train", str(tmp_path / "nope.yaml"), "--local"), "config file not found")
    assert_user_error(run_cli("train", config_file(tmp_path, f"data.train={tmp_path / 'nope.jsonl'}"), "--local"),
                      "data.train: not found", "nope.jsonl")


def test_address_with_a_local_run_is_refused(tmp_path):
    assert_user_error(run_cli("train", config_file(tmp_path), "--local", "--address", "127.0.0.1:1"),
                      "--address 127.0.0.1:1 joins a Ray cluster, but --local runs in this process")


def test_malformed_row_names_file_and_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    rows = (DEMO / "train.jsonl").read_text().splitlines()[:200]
    rows[41] = '{"prompt": "reverse 12 ="}'
    data.write_text("\n".join(rows) + "\n")
    assert_user_error(run_cli("train", config_file(tmp_path, f"data.train={data}"), "--local"),
                      f"{data}:42:", '"completion" must be a string', "data.skip_bad_rows")


def test_model_directory_without_config(tmp_path):
    empty = tmp_path / "model"
    empty.mkdir()
    assert_user_error(run_cli("train", config_file(tmp_path, "model.init=null", f"model.name_or_path={empty}"),
                              "--local"), "model.name_or_path", "no config.json")


def test_qlora_float16_on_cpu_is_refused_up_front(tmp_path):
    assert_user_error(run_cli("train", config_file(tmp_path, "method=qlora", "model.dtype=float16"), "--local"),
                      "model.dtype float16 needs a GPU")


def test_model_that_does_not_fit(tmp_path):
    huge = ["model.init.hidden_size=16384", "model.init.num_layers=64", "model.init.num_heads=128",
            "model.init.vocab_size=128000"]
    result = run_cli("train", config_file(tmp_path, *huge), "--local")
    assert_user_error(result, "needs about", "GiB", "per cpu device", "use method: qlora")
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_a_max_length_past_the_models_positions_names_the_key_not_memory(tmp_path):
    result = run_cli("train", config_file(tmp_path, "data.max_length=1000000"), "--local")
    assert_user_error(result, "data.max_length 1000000 is longer than the model's 2048 positions",
                      "model.init.max_position_embeddings", "at most 2048")
    assert "GiB" not in result.stderr


def test_config_path_and_data_mistakes_are_told_before_the_training_stack_loads(tmp_path):
    """Told within the first seconds: before torch, transformers or PEFT is imported."""
    rows = (DEMO / "train.jsonl").read_text().splitlines()[:50]
    rows[7] = '{"prompt": 3, "completion": "x"}'
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text("\n".join(rows) + "\n")
    no_model = tmp_path / "empty-model"
    no_model.mkdir()
    cases = [
        (("--set", "train.lrr=1e-3"), "train.lrr: unknown key"),
        (("--set", f"data.eval={tmp_path / 'nope.jsonl'}"), "data.eval: not found"),
        (("--set", f"data.train={bad_rows}"), f"{bad_rows}:8:"),
        (("--set", "model.init=null", "--set", f"model.name_or_path={no_model}"), "no config.json"),
    ]
    path = config_file(tmp_path)
    for extra, needle in cases:
        result, imported = run_cli_probed("train", path, "--local", *extra)
        assert_user_error(result, needle)
        assert not imported, (needle, imported)
    assert not (tmp_path / "runs").exists()


def test_generate_and_report_errors(tmp_path):
    assert_user_error(run_cli("generate", str(tmp_path / "nope"), "--prompt", "x"), "no such directory")
    assert_user_error(run_cli("report", str(tmp_path)), "no metrics.jsonl")


STEP_KEYS = ("step", "loss", "lr", "grad_norm", "tokens_seen")


def step_records(run_dir: Path) -> list[dict]:
    return [{k: r[k] for k in STEP_KEYS} for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def eval_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r]


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    from ftdist.config.load import load_config

    cfg = load_config(path)
    if not Path(cfg.data.train).is_absolute():  # cluster examples point at the user's shared storage
        assert (REPO / cfg.data.train).is_file()


def test_an_address_where_no_ray_answers_is_one_message_in_seconds(tmp_path):

    start = time.monotonic()
    result = run_cli("train", config_file(tmp_path), "--address", "127.0.0.1:1", timeout=60)
    assert_user_error(result, "no Ray cluster answers at 127.0.0.1:1", "ray start --head")
    assert time.monotonic() - start < 45  # Ray alone retried for minutes


def test_a_stale_ray_current_cluster_file_is_ignored_for_a_local_ray(tmp_path, monkeypatch, capsys):
    import socket

    from ray._common.utils import get_ray_address_file

    from ftdist.launch.ray_train import reachable_address

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    current = Path(get_ray_address_file(None))
    assert str(current).startswith(str(tmp_path))
    current.parent.mkdir(parents=True, exist_ok=True)
    current.write_text("127.0.0.1:1")
    assert reachable_address(None) == "local"
    assert f"ignoring {current}: no Ray answers at 127.0.0.1:1" in capsys.readouterr().out
    with socket.socket() as live:  # a file naming a head that answers: joined, as Ray would
        live.bind(("127.0.0.1", 0))
        live.listen()
        current.write_text(f"127.0.0.1:{live.getsockname()[1]}")
        assert reachable_address(None) is None


def test_a_hub_model_without_network_is_one_message_without_retry_noise(tmp_path, monkeypatch):

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")  # a hub that cannot be reached, network or not
    start = time.monotonic()
    result = run_cli("train", config_file(tmp_path, "model.init=null", "model.name_or_path=someorg/somemodel",
                                          "method=lora"), "--local", timeout=60)
    assert_user_error(result, "model.name_or_path someorg/somemodel: not a local path, and the Hugging Face hub "
                              "(http://127.0.0.1:1) cannot be reached", "HF_HUB_OFFLINE=1")
    assert "Retrying" not in result.stderr + result.stdout and len(result.stderr.splitlines()) == 1
    assert time.monotonic() - start < 30




def test_native_writes_while_ray_tears_down_are_not_shown_and_the_streams_come_back():
    """What native code writes to fds 1 and 2 (gRPC's and abseil's lines as Ray shuts down) goes
    nowhere while dropped; Python's and native writes after restore() are shown again."""
    import subprocess
    import sys

    code = ("import os, sys\nfrom ftdist.cli import drop_native_output\nprint('before', flush=True)\n"
            "restore = drop_native_output()\nos.write(2, b'[mutex.cc : 452] RAW: Lock blocking\\n')\n"
            "os.write(1, b'native out\\n')\nprint('python err', file=sys.stderr)\nrestore()\n"
            "os.write(2, b'after native\\n')\nprint('after', flush=True)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "before\nafter\n"
    assert result.stderr == "after native\n"
