"""The CLI as a user meets it: exit codes, one clear message per user error, no traceback;
resume after a kill; generate and report."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ftdist.io.metrics_log import read_metrics

from tests.conftest import (
    DEMO,
    REPO,
    complete_checkpoints,
    foreign_lines,
    paused,
    run_cli,
    run_cli_probed,
    tiny_config,
    wait_until,
    write_config,
)
from tests.unit.test_cli import (
    STEP_KEYS,
    assert_user_error,
    config_file,
    eval_records,
    step_records,
)


@pytest.mark.slow
def test_killed_or_terminated_run_resumes_to_the_same_metrics(tmp_path):
    """SIGKILL mid-run, rerun the same command: every step once, the same curve as a run never
    stopped. SIGTERM mid-run: a checkpoint at the next step boundary, one line, exit 143, and the
    rerun resumes from that very step. (Adapter runs resume through the same path: test_loop.py.)"""
    common = ("method=full", "train.max_steps=40", "checkpoint.every_steps=10", "train.lr=1e-2")
    whole = write_config(tmp_path, tiny_config(tmp_path, *common, name="whole"), "whole.yaml")
    assert run_cli("train", str(whole), "--local").returncode == 0
    uninterrupted = step_records(tmp_path / "runs" / "whole")

    def past_a_checkpoint(run_dir: Path) -> bool:  # a step logged past a complete checkpoint, not itself one's
        done = [r["step"] for r in step_records(run_dir)] if (run_dir / "metrics.jsonl").exists() else []
        complete = complete_checkpoints(run_dir)
        return bool(complete and done and max(done) > int(complete[-1].name.split("-")[1]) and max(done) % 10)

    def resumes_to_the_same_metrics(config: Path, run_dir: Path, from_step: int) -> None:
        result = run_cli("train", str(config), "--local")
        assert result.returncode == 0, result.stderr
        assert f"(step {from_step})" in result.stdout and "resuming from" in result.stdout
        resumed = step_records(run_dir)
        assert [r["step"] for r in resumed] == list(range(1, 41))
        for a, b in zip(resumed, uninterrupted):
            for key in STEP_KEYS:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (key, a, b)
        assert [r["eval_loss"] for r in eval_records(run_dir)] == pytest.approx(
            [r["eval_loss"] for r in eval_records(tmp_path / "runs" / "whole")], rel=1e-6)

    cut = write_config(tmp_path, tiny_config(tmp_path, *common, name="cut"), "cut.yaml")
    run_dir = tmp_path / "runs" / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "ftdist", "train", str(cut), "--local"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: past_a_checkpoint(run_dir), 240, "a step past a complete checkpoint", proc)
    with paused([proc.pid]):  # between two checkpoints by construction: nothing moves while it is killed
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert max(r["step"] for r in step_records(run_dir)) < 40
    resumes_to_the_same_metrics(cut, run_dir, int(complete_checkpoints(run_dir)[-1].name.split("-")[1]))

    term = write_config(tmp_path, tiny_config(tmp_path, *common, name="term"), "term.yaml")
    run_dir = tmp_path / "runs" / "term"
    proc = subprocess.Popen([sys.executable, "-m", "ftdist", "train", str(term), "--local"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    def early_between_checkpoints() -> bool:  # the steps after it, to the next scheduled checkpoint, are not one
        return past_a_checkpoint(run_dir) and 1 <= max(r["step"] for r in step_records(run_dir)) % 10 <= 7

    signalled_after = None
    while signalled_after is None:  # (bounded: the run has 40 steps)
        wait_until(early_between_checkpoints, 240, "a step early between two checkpoints", proc)
        with paused([proc.pid]):  # the signal finds the step after the one read here running
            if early_between_checkpoints():  # still, now that nothing moves
                signalled_after = max(r["step"] for r in step_records(run_dir))
                proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = [line for line in err.splitlines() if line.startswith("ftdist:")]
    stopped = max(r["step"] for r in step_records(run_dir))  # the step the signal found running, then no other
    assert len(lines) == 1 and lines[0].startswith(f"ftdist: stopped on SIGTERM: after step {stopped} of 40"), err
    assert "Traceback" not in err and "run the same command again" in lines[0]
    # The step the signal found running (or, caught between a step's record and the check after it, that
    # step), with its own checkpoint: not a scheduled one's step.
    assert signalled_after <= stopped <= signalled_after + 1 and stopped % 10
    assert complete_checkpoints(run_dir)[-1].name == f"step-{stopped}" and not (run_dir / "final").exists()
    last = read_metrics(run_dir / "metrics.jsonl")[-1]
    assert {k: last[k] for k in ("step", "event", "reason")} == {"step": stopped, "event": "stopped", "reason": "SIGTERM"}
    assert 0 < last["commit_s"] < 60 and "deadline_left_s" not in last  # SIGTERM gives no deadline
    resumes_to_the_same_metrics(term, run_dir, stopped)


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
    wait_until(lambda: complete_checkpoints(run_dir), 240, "a complete checkpoint", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "run the same command again to resume" in err and "Traceback" not in err
    assert complete_checkpoints(run_dir), "the interrupt lost the complete checkpoints"


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
    from ftdist.training.checkpoint import damage

    for checkpoint in kept:  # each intact against its manifest
        files = json.loads((checkpoint / "COMPLETE").read_text())["files"]
        assert damage(checkpoint, files, lambda name: True) is None, checkpoint
    assert f"resumes from {kept[-1].name}" in lines[0]
