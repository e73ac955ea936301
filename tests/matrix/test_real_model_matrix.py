"""`make test-all`: the real model (SmolLM2-135M-Instruct, tests/e2e/test_real_model.py) on 2 Ray
workers: QLoRA under ZeRO-2 against local mode on real weights."""

from __future__ import annotations

import json

import pytest

from ftdist.io.metrics_log import read_metrics
from ftdist.launch.local import train_local
from tests.conftest import ONE_RAY_AT_A_TIME, foreign_lines, run_cli, write_config
from tests.distributed_cases import REL_TOL, curve
from tests.e2e.test_real_model import eight_rows, real_config, smollm2  # noqa: F401 (the session fixture)

pytestmark = [pytest.mark.slow]


@ONE_RAY_AT_A_TIME
@pytest.mark.ray
def test_qlora_on_two_ray_workers_matches_local_mode_on_the_real_model(tmp_path, smollm2, ray_local):
    """QLoRA (NF4, the 4-bit base on every worker) under ZeRO-2 on 2 Ray workers: local mode's
    per-step losses and eval loss, on a global batch of all 8 rows (so that both modes see the
    same rows at every step), and adapters that load on the 4-bit base and answer."""
    overrides = ("method=qlora", *eight_rows(tmp_path), "distributed.zero_stage=2")
    local = train_local(real_config(tmp_path, smollm2, *overrides, "run.name=local"), show_progress=False)
    cfg = real_config(tmp_path, smollm2, *overrides, "run.name=ray", "distributed.workers=2",
                      "distributed.max_failures=0")
    result = run_cli("train", str(write_config(tmp_path, cfg)), "--address",
                     ray_local.get_runtime_context().gcs_address, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not foreign_lines(result.stdout, result.stderr), result.stdout + result.stderr
    ray_run, local_run = tmp_path / "runs" / "ray", tmp_path / "runs" / "local"
    assert read_metrics(ray_run / "metrics.jsonl")[0]["world_size"] == 2
    for key in ("loss", "eval_loss"):
        ours, theirs = curve(ray_run, key), curve(local_run, key)
        assert len(ours) == len(theirs) >= 2 and ours == pytest.approx(theirs, rel=REL_TOL), key
    assert local["eval_loss"] < curve(local_run, "eval_loss")[0]
    meta = json.loads((ray_run / "final" / "ftdist.json").read_text())
    assert meta["method"] == "qlora"
    result = run_cli("generate", str(ray_run / "final"), "--chat", "--prompt", "Capital card: France",
                     "--max-new-tokens", "16")
    assert result.returncode == 0 and result.stdout.startswith("Capital card: France -> "), result.stderr


def test_grpo_teaches_the_real_model_to_answer_with_the_card_alone(tmp_path, smollm2):
    """Learning from rewards on real weights: asked for a capital card as JSON alone,
    SmolLM2-Instruct wraps it in prose or gets it wrong (no prompt answered exactly, greedy);
    LoRA GRPO with an exact JSON match and partial credit (bench/real_task.py) raises the
    held-out reward and accuracy, and the sampled reward, in 12 steps."""
    from bench.real_task import card_prompts

    files = {}
    for split in ("train", "eval"):
        files[split] = tmp_path / f"cards-{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in card_prompts(split)))
    cfg = {"run": {"name": "real-grpo", "output": str(tmp_path / "runs")},
           "model": {"name_or_path": str(smollm2), "dtype": "float32"}, "method": "lora",
           "lora": {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
           "objective": "grpo",
           "grpo": {"rewards": [{"function": "json", "column": "card"}, {"function": "bench.real_task:card_reward"}],
                    "num_generations": 4, "max_new_tokens": 24, "temperature": 0.7},
           "data": {"train": str(files["train"]), "eval": str(files["eval"]), "format": "prompt", "max_length": 96},
           "train": {"lr": 3e-4, "max_steps": 12, "batch_size": 8, "micro_batch_size": 4, "warmup_steps": 1,
                     "eval_every": 12, "log_every": 1},
           "checkpoint": {"every_steps": 100, "keep": 1}}
    path = tmp_path / "real-grpo.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    result = run_cli("train", str(path), "--local", timeout=1500)
    assert result.returncode == 0, result.stdout + result.stderr
    records = read_metrics(tmp_path / "runs" / "real-grpo" / "metrics.jsonl")
    evals = [r for r in records if "eval_reward" in r]
    assert [r["step"] for r in evals] == [0, 12] and evals[0]["eval_accuracy"] == 0.0
    assert evals[1]["eval_reward"] > evals[0]["eval_reward"] + 0.1 and evals[1]["eval_accuracy"] > 0
    sampled = [r["reward"] for r in records if "reward" in r and "epoch" in r]
    assert sum(sampled[-4:]) > sum(sampled[:4]), sampled
