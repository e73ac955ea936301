"""The loop read as a whole, in-process and in seconds: begin, steps, checkpoints, finish; and a
rerun restores the newest complete checkpoint (a partial one is never used) and continues to
exactly the curve of the run it replaces."""

import json
import shutil

import pytest
import torch

from ftdist.context import LocalContext
from ftdist.loop import TrainState, train
from ftdist.metrics import read_metrics
from ftdist.rundir import prepare_run_dir
from tests.conftest import DEMO, complete_checkpoints, tiny_config


def steps_of(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_rerun_resumes_from_the_newest_complete_checkpoint_to_the_same_curve(tmp_path, method):
    cfg = tiny_config(tmp_path, f"method={method}", "lora.dropout=0.1", "model.init.num_layers=2", "train.max_steps=6", "checkpoint.every_steps=2",
                      "checkpoint.keep=5", "train.eval_every=2", f"data.retention={DEMO / 'general.txt'}")
    store = prepare_run_dir(cfg, restart=False)
    run_dir = store.local

    def context() -> LocalContext:
        return LocalContext(store=store, device=torch.device("cpu"), show_progress=False)

    summary = train(cfg, context())
    curve = steps_of(run_dir)
    assert [s for s, _ in curve] == list(range(1, 7))
    assert [p.name for p in complete_checkpoints(run_dir)] == ["step-2", "step-4"]  # the last step is final/
    saved = json.loads((run_dir / "checkpoints" / "step-4" / "state.json").read_text())
    state = TrainState.of_checkpoint(saved)
    assert state.step == 4 and state.tokens_seen > 0 and state.retention_before is not None
    assert (saved["engine"], saved["world_size"], saved["zero_stage"]) == ("plain", 1, None)
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6] and "forgetting" in evals[-1]
    assert summary["forgetting"] == pytest.approx(evals[-1]["forgetting"])
    assert summary["eval_loss"] == evals[-1]["eval_loss"] and (run_dir / "forgetting.png").is_file()

    # As if killed while saving step 6's model with a step-5 checkpoint half written.
    shutil.rmtree(run_dir / "final")
    partial = run_dir / "checkpoints" / "step-5"
    shutil.copytree(run_dir / "checkpoints" / "step-4", partial)
    (partial / "COMPLETE").unlink()
    again = train(cfg, context())
    resumes = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "resume"]
    assert [r["checkpoint"] for r in resumes] == ["step-4"] and not partial.exists()
    resumed = steps_of(run_dir)
    assert [s for s, _ in resumed] == list(range(1, 7))  # every step once
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in curve], rel=1e-6)
    assert again["eval_loss"] == pytest.approx(summary["eval_loss"], rel=1e-6)
    assert again["forgetting"] == pytest.approx(summary["forgetting"], rel=1e-6)
