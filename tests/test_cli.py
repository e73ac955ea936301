"""The CLI as a user meets it: exit codes, one clear message per user error, no traceback;
resume after a kill; generate and report."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftdist.metrics import read_metrics
from tests.conftest import (DEMO, REPO, complete_checkpoints, foreign_lines, run_cli, run_cli_probed, tiny_config,
                            wait_until, write_config)


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


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    """SIGKILL mid-run, rerun the same command: every step once, the same curve as a run never stopped.
    (Adapter runs resume through the same path: test_loop.py, in-process.)"""
    common = ("method=full", "train.max_steps=80", "checkpoint.every_steps=10", "train.lr=1e-2")
    whole = write_config(tmp_path, tiny_config(tmp_path, *common, name="whole"), "whole.yaml")
    assert run_cli("train", str(whole), "--local").returncode == 0

    cut = write_config(tmp_path, tiny_config(tmp_path, *common, name="cut"), "cut.yaml")
    run_dir = tmp_path / "runs" / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "ftdist", "train", str(cut), "--local"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    # Kill between checkpoints: once one is complete (its commit runs in the background) and
    # steps past it are logged, which must then be redone.
    while time.monotonic() < deadline and proc.poll() is None:
        done = [r["step"] for r in step_records(run_dir)] if (run_dir / "metrics.jsonl").exists() else []
        complete = complete_checkpoints(run_dir)
        if complete and done and max(done) >= int(complete[-1].name.split("-")[1]) + 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(r["step"] for r in step_records(run_dir)) < 80

    result = run_cli("train", str(cut), "--local")
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout
    resumed, uninterrupted = step_records(run_dir), step_records(tmp_path / "runs" / "whole")
    assert [r["step"] for r in resumed] == list(range(1, 81))
    for a, b in zip(resumed, uninterrupted):
        for key in STEP_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (key, a, b)
    assert [r["eval_loss"] for r in eval_records(run_dir)] == pytest.approx(
        [r["eval_loss"] for r in eval_records(tmp_path / "runs" / "whole")], rel=1e-6)


@pytest.mark.slow
def test_rerun_of_a_finished_run_and_restart(tmp_path):
    path = config_file(tmp_path, "train.max_steps=6", "checkpoint.every_steps=3")
    assert run_cli("train", path, "--local").returncode == 0
    again = run_cli("train", path, "--local")
    assert again.returncode == 0 and "already finished" in again.stdout
    changed = run_cli("train", path, "--local", "--set", "train.lr=1e-4")
    assert_user_error(changed, "different config", "train.lr", "--restart")
    restarted = run_cli("train", path, "--local", "--restart", "--set", "train.lr=1e-4")
    assert restarted.returncode == 0 and "resuming" not in restarted.stdout


@pytest.mark.slow
def test_train_generate_report_through_the_cli(tmp_path):
    path = config_file(tmp_path, "train.max_steps=12", f"data.retention={DEMO / 'general.txt'}")
    result, imported = run_cli_probed("train", path, "--local")
    assert result.returncode == 0, result.stderr
    assert "step 10/12" in result.stdout and "forgetting" in result.stdout  # plain lines when not a TTY
    # Local mode: no DeepSpeed, no Ray, and nothing on the terminal but ftdist's own lines.
    assert {"torch", "peft"} <= imported and not imported & {"deepspeed", "ray"}, imported
    assert not foreign_lines(result.stdout, result.stderr), result.stdout + result.stderr
    run_dir = tmp_path / "runs" / "t"
    assert {"config.yaml", "metrics.jsonl", "final", "loss.png", "forgetting.png", "checkpoints"} <= {
        p.name for p in run_dir.iterdir()}
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step-10"] and (run_dir / "checkpoints" / "step-10" / "COMPLETE").exists()

    gen = run_cli("generate", str(run_dir / "final"), "--prompt", "reverse 123 =", "--max-new-tokens", "4")
    assert gen.returncode == 0 and gen.stdout.startswith("reverse 123 =")

    chat = run_cli("generate", str(run_dir / "final"), "--chat", "--prompt", "reverse 123 =", "--max-new-tokens", "4")
    assert chat.returncode == 0 and chat.stdout.startswith("reverse 123 = ->")

    rep = run_cli("report", str(run_dir))
    assert rep.returncode == 0 and "eval_loss" in rep.stdout and "forgetting" in rep.stdout
    for plot in ("loss.png", "forgetting.png", "lr.png", "throughput.png"):
        assert (run_dir / plot).stat().st_size > 1000
    assert json.loads((run_dir / "report.json").read_text())["steps"] == 12


@pytest.mark.slow
def test_ctrl_c_exits_130_with_a_hint_and_keeps_the_checkpoints(tmp_path):
    path = config_file(tmp_path, "train.max_steps=400", "checkpoint.every_steps=5")
    run_dir = tmp_path / "runs" / "t"
    # Ctrl-C's default disposition, as a shell gives it: pytest-xdist's workers ignore SIGINT, and
    # a child started with SIGINT ignored never sees it (Python installs no handler then).
    proc = subprocess.Popen([sys.executable, "-m", "ftdist", "train", path, "--local"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    # Any complete checkpoint: a given one may already be pruned (checkpoint.keep) when looked for.
    while time.monotonic() < deadline and proc.poll() is None and not complete_checkpoints(run_dir):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "run the same command again to resume" in err and "Traceback" not in err
    assert complete_checkpoints(run_dir), "the interrupt lost the complete checkpoints"


@pytest.mark.parametrize("path", sorted((REPO / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    from ftdist.config import load_config

    cfg = load_config(path)
    if not Path(cfg.data.train).is_absolute():  # cluster examples point at the user's shared storage
        assert (REPO / cfg.data.train).is_file()


def test_an_address_where_no_ray_answers_is_one_message_in_seconds(tmp_path):
    import time

    start = time.monotonic()
    result = run_cli("train", config_file(tmp_path), "--address", "127.0.0.1:1", timeout=60)
    assert_user_error(result, "no Ray cluster answers at 127.0.0.1:1", "ray start --head")
    assert time.monotonic() - start < 45  # Ray alone retried for minutes


def test_a_stale_ray_current_cluster_file_is_ignored_for_a_local_ray(tmp_path, monkeypatch, capsys):
    import socket

    from ray._common.utils import get_ray_address_file

    from ftdist.distributed import reachable_address

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
    import time

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")  # a hub that cannot be reached, network or not
    start = time.monotonic()
    result = run_cli("train", config_file(tmp_path, "model.init=null", "model.name_or_path=someorg/somemodel",
                                          "method=lora"), "--local", timeout=60)
    assert_user_error(result, "model.name_or_path someorg/somemodel: not a local path, and the Hugging Face hub "
                              "(http://127.0.0.1:1) cannot be reached", "HF_HUB_OFFLINE=1")
    assert "Retrying" not in result.stderr + result.stdout and len(result.stderr.splitlines()) == 1
    assert time.monotonic() - start < 30


def test_a_full_disk_while_staging_a_checkpoint_stops_the_run_and_keeps_the_complete_ones(tmp_path):
    """A file-size limit (RLIMIT_FSIZE, set on the running process) stands in for a full disk:
    the same EFBIG/ENOSPC path, without a filesystem of its own."""
    import resource

    cfg = write_config(tmp_path, tiny_config(tmp_path, "train.max_steps=200", "checkpoint.every_steps=2",
                                             "checkpoint.keep=3", "train.eval_every=100"))
    run_dir = tmp_path / "runs" / "t"
    proc = subprocess.Popen([sys.executable, "-m", "ftdist", "train", str(cfg), "--local"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: complete_checkpoints(run_dir), 120, "a complete checkpoint", proc)
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    lines = [x for x in err.splitlines() if x.startswith("ftdist: error:")]
    assert len(lines) == 1 and "no room to write it" in lines[0] and "run the same command again" in lines[0], err
    assert "Traceback" not in err
    kept = complete_checkpoints(run_dir)
    assert kept
    from ftdist.checkpoint import damage

    for checkpoint in kept:  # each intact against its manifest
        files = json.loads((checkpoint / "COMPLETE").read_text())["files"]
        assert damage(checkpoint, files, lambda name: True) is None, checkpoint
    assert f"resumes from {kept[-1].name}" in lines[0]
