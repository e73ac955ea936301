"""objective grpo end to end: a local run through the CLI learns from a reward of the user's
own (a module in the working directory) and reports rewards, KL, clip fraction and samples;
resumed, it samples and trains exactly what it would have; on 2 Ray workers under ZeRO-3 (the
weights gathered for sampling, the reference a frozen copy partitioned like the policy) it
follows local mode's curve. (The arithmetic against TRL: tests/unit/test_grpo.py; ZeRO-2 LoRA
on Ray: tests/matrix/test_grpo_matrix.py.)"""

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest

from ftdist.io.metrics_log import read_metrics
from tests.conftest import DEMO, ONE_RAY_AT_A_TIME, foreign_lines, run_cli, tiny_config, write_config

# A dense reward a random tiny model can earn: the share of digits in its completion (the
# bundled reversal task's answers are digits). Exact match against the row's answer is the
# accuracy evaluations report.
REWARD = textwrap.dedent("""
    def digits(prompts, completions, **columns):
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
""")
REWARDS = "[{function: '%s:digits'}, {function: exact_match, column: completion}]"
LOGGED = ("loss", "reward", "reward_std", "kl", "clip_fraction", "zero_spread", "completion_length", "grad_norm")


def grpo_run(tmp_path: Path, *extra: str, name: str, steps: int = 12, also: str = "", module: str = "myrewards"):
    """The config, validated where the run's command runs (where its reward module is; each
    test its own module name: Python keeps what it imported)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / f"{module}.py").write_text(REWARD + also)
    here = Path.cwd()
    os.chdir(tmp_path)
    try:
        return tiny_config(tmp_path, "objective=grpo", f"grpo.rewards={REWARDS % module}", "grpo.max_new_tokens=8",
                       "grpo.num_generations=8", "grpo.beta=0.04", "grpo.num_iterations=2",
                       "train.batch_size=8", "train.micro_batch_size=4", f"train.max_steps={steps}",
                       "train.warmup_steps=1", "train.lr=3e-2", "train.eval_every=6", "train.log_every=4",
                       "checkpoint.every_steps=4", "method=full", "lora.dropout=0",
                       f"data.eval={small_eval(tmp_path)}", *extra, name=name)
    finally:
        os.chdir(here)


def small_eval(tmp_path: Path) -> Path:
    path = tmp_path / "eval-prompts.jsonl"
    path.write_text("".join(line for line in (DEMO / "eval.jsonl").read_text().splitlines(True)[:16]))
    return path


def test_a_local_run_learns_from_a_reward_of_yours_and_a_resume_samples_what_it_would_have(tmp_path):
    cfg = grpo_run(tmp_path, name="grpo")
    config = write_config(tmp_path, cfg)
    first = run_cli("train", str(config), "--local", cwd=tmp_path, timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert not foreign_lines(first.stdout, first.stderr), first.stdout + first.stderr
    run_dir = tmp_path / "runs" / "grpo"
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = {r["step"]: r for r in records if "loss" in r}
    assert sorted(steps) == list(range(1, 13))
    for r in steps.values():
        assert set(LOGGED) <= set(r) and r["completion_length"] <= 8 and 0 <= r["zero_spread"] <= 1
        assert {"reward/digits", "reward/exact_match"} <= set(r)
    # Learns: the reward of the last steps well above the first ones', and greedy completions too.
    early = sum(steps[s]["reward"] for s in (1, 2, 3, 4)) / 4
    late = sum(steps[s]["reward"] for s in (9, 10, 11, 12)) / 4
    evals = [r for r in records if "eval_reward" in r]
    assert late > early + 0.1 and evals[-1]["eval_reward"] > evals[0]["eval_reward"], (early, late, evals)
    assert [r["step"] for r in evals] == [0, 6, 12] and all(r["eval_loss"] == -r["eval_reward"] for r in evals)
    # The second update of a batch moves off the policy that sampled: its ratios can clip.
    assert steps[1]["clip_fraction"] == 0.0
    samples = [r for r in records if "samples" in r]
    assert [r["step"] for r in samples] == [4, 8, 12]
    assert all(s["prompt"].startswith("reverse ") and isinstance(s["reward"], float) for r in samples
               for s in r["samples"])
    assert "reward" in first.stdout and "eval_reward:" in first.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_reward"] == evals[-1]["eval_reward"] and "eval_accuracy" in summary
    assert (run_dir / "final" / "model.safetensors").is_file()

    # As if it had died before its final model: it resumes from step 8 and samples, scores and
    # trains steps 9-12 again, to the same numbers.
    shutil.rmtree(run_dir / "final")
    again = run_cli("train", str(config), "--local", cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming from" in again.stdout and "(step 8)" in again.stdout
    redone = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}
    for step in (9, 10, 11, 12):
        for key in LOGGED:
            assert redone[step][key] == pytest.approx(steps[step][key], rel=1e-5, abs=1e-7), (step, key)


def test_a_reward_that_fails_stops_the_run_with_one_message_and_its_checkpoints_kept(tmp_path):
    broken = "def broken(prompts, completions, **columns):\n    return [1.0] * (len(completions) - 1)\n"
    cfg = grpo_run(tmp_path, "grpo.rewards=[{function: 'badrewards:digits'}, {function: 'badrewards:broken'}]",
                   name="broken", steps=4, also=broken, module="badrewards")
    result = run_cli("train", str(write_config(tmp_path, cfg)), "--local", cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in result.stderr
    assert err[0].startswith("ftdist: error: grpo.rewards.1 (badrewards:broken) returned 3 values for 4 completions "
                             "(on the prompt 'reverse "), err


@pytest.mark.slow
@pytest.mark.ray
@ONE_RAY_AT_A_TIME
def test_two_zero3_workers_sample_and_train_as_local_mode(tmp_path, ray_local):
    """Full fine-tuning under ZeRO-3 on 2 workers: each samples for its half of the prompts with
    the weights gathered, the reference is a frozen copy partitioned like the policy. Every
    prompt's completions come from its own seed, so the samples, rewards and curve are local
    mode's (float sums aside: DeepSpeed's all-reduce and partitions)."""
    check_two_workers_match_local_mode(tmp_path, ray_local, "method=full", "distributed.zero_stage=3")


def check_two_workers_match_local_mode(tmp_path: Path, ray_local, *settings: str) -> None:
    address = ray_local.get_runtime_context().gcs_address
    runs = {}
    for mode, extra in (("local", ("--local",)), ("ray", ("--address", address))):
        cfg = grpo_run(tmp_path / mode, "distributed.workers=2", "distributed.max_failures=0", *settings,
                       name=f"grpo-{mode}", steps=6, module=f"rewards{mode}")
        result = run_cli("train", str(write_config(tmp_path / mode, cfg)), *extra, cwd=tmp_path / mode, timeout=900)
        assert result.returncode == 0, result.stdout + result.stderr
        assert not foreign_lines(result.stdout, result.stderr), result.stdout + result.stderr
        runs[mode] = read_metrics(tmp_path / mode / "runs" / f"grpo-{mode}" / "metrics.jsonl")
    for key in ("loss", "reward", "kl", "completion_length", "eval_reward"):
        ours, theirs = ([r[key] for r in runs[m] if key in r] for m in ("ray", "local"))
        assert len(ours) == len(theirs) >= 2 and ours == pytest.approx(theirs, rel=1e-3, abs=1e-4), key
    start = next(r for r in runs["ray"] if r.get("event") == "start")
    assert start["world_size"] == 2
