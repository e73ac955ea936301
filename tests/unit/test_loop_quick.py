"""The one loop in local mode, a few steps of a toy model: what it reports is the model's own loss."""

import math

import pytest

from ftdist.launch.local import train_local
from ftdist.io.metrics_log import read_metrics
from tests.conftest import tiny_config


def test_a_fresh_models_first_losses_are_ln_of_its_vocabulary(tmp_path):
    """At initialization the logits are nearly uniform, so the first step's loss and the evaluation
    before training are ln(vocabulary) within a few percent, as reported by local mode: a loss
    scaled, summed instead of averaged or normalized by the wrong count shows at once."""
    cfg = tiny_config(tmp_path, "train.max_steps=2", "train.warmup_steps=1", "train.eval_every=2",
                      "train.log_every=1", "checkpoint.every_steps=1000", "train.lr=1e-4")
    run_dir = tmp_path / "runs" / "t"
    train_local(cfg, show_progress=False)
    records = read_metrics(run_dir / "metrics.jsonl")
    uniform = math.log(cfg.model.init.vocab_size)
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(losses) == 2 and losses[0] == pytest.approx(uniform, rel=0.03), (losses, uniform)
    assert evals and evals[0] == pytest.approx(uniform, rel=0.03), (evals, uniform)
