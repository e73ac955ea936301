"""regularization: replay, L2-SP and EWC against forgetting, in local mode on the tiny base
pretrained on general text (conftest.pretrained_base), fine-tuned on digit reversal at a high
learning rate: it forgets much of that text, which each regularizer must lessen.

The replay text and the retention text are the two halves of the general text: what is
measured is never what is replayed. Under ZeRO (anchors on partitions, replay across ranks)
they are checked against local mode in test_distributed.
"""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftdist.config.schema import Config
from ftdist.training.context import LocalContext
from ftdist.launch.local import train_local
from ftdist.io.metrics_log import read_metrics
from ftdist.launch.rundir import prepare_run_dir
from tests.conftest import tiny_config
from tests.unit.test_regularize_quick import texts  # noqa: F401 (a fixture)

LR = 3e-3  # high for full fine-tuning: it forgets


def reg_config(tmp_path, base, texts, *extra: str, name: str, steps: int = 30) -> Config:
    return tiny_config(tmp_path, "model.init=null", f"model.name_or_path={base}",
                       f"data.retention={texts['retention']}", f"train.max_steps={steps}", f"train.lr={LR}",
                       "checkpoint.every_steps=1000", *extra, name=name)


def steps(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


REGULARIZED = {
    "none": (),
    "l2sp": ("regularization.l2sp=10",),
    "ewc": ("regularization.ewc.weight=1e6",),
    "replay": ("regularization.replay.fraction=0.25",),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, pretrained_base, texts) -> dict:
    base = pretrained_base("llama")
    out = {}
    for name, extra in REGULARIZED.items():
        tmp = tmp_path_factory.mktemp(name)
        if name == "replay":
            extra = (f"regularization.replay.data={texts['replay']}", *extra)
        out[name] = train_local(reg_config(tmp, base, texts, *extra, name=name), show_progress=False)
    return out


@pytest.mark.parametrize("name", ["l2sp", "ewc", "replay"])
def test_each_regularizer_lowers_forgetting_against_none(runs, name):
    plain, regularized = runs["none"], runs[name]
    assert plain["forgetting"] > 1.0  # the plain run forgets: there is something to counter
    assert regularized["forgetting"] < 0.9 * plain["forgetting"], (regularized["forgetting"], plain["forgetting"])
    assert regularized["eval_loss"] < 1.5 * plain["eval_loss"]  # ... while still learning the task


def test_the_penalty_and_the_replay_loss_are_logged_apart(runs):
    for name in ("l2sp", "ewc"):
        records = steps(Path(runs[name]["run_dir"]))
        assert records[0]["penalty"] == 0.0 and records[0]["anchor_distance"] == 0.0  # at the anchors before step 1
        # Step 1 trains at lr 0 (warmup): from step 2 on the weights have left their anchors.
        assert all(r["penalty"] > 0 for r in records[2:]) and "replay_loss" not in records[0]
    records = steps(Path(runs["replay"]["run_dir"]))
    assert all(math.isfinite(r["replay_loss"]) for r in records) and "penalty" not in records[0]
    assert "replay_loss" not in steps(Path(runs["none"]["run_dir"]))[0]


def test_a_very_large_l2sp_weight_keeps_every_weight_next_to_its_pretrained_value(tmp_path, pretrained_base, texts):
    """The pull is a proximal step before each update: what stays is at most about the last
    update (Adam's steps are about lr per weight), where plain training moves weights far."""
    base = pretrained_base("llama")
    summary = train_local(reg_config(tmp_path, base, texts, "regularization.l2sp=1e7", name="held", steps=12),
                          show_progress=False)
    pretrained = load_file(str(base / "model.safetensors"))
    trained = load_file(str(tmp_path / "runs" / "held" / "final" / "model.safetensors"))
    moved = max(float((trained[k].float() - pretrained[k].float()).abs().max()) for k in pretrained)
    assert moved < 2 * LR, moved
    assert summary["forgetting"] < 0.05


def test_lora_with_a_very_large_l2sp_weight_keeps_a_near_zero_update(tmp_path, pretrained_base, texts):
    """For adapters the anchor is their start, where B = 0: the update B·A stays near zero."""
    base = pretrained_base("llama")
    train_local(reg_config(tmp_path, base, texts, "method=lora", "lora.dropout=0", "train.lr=1e-2",
                           "regularization.l2sp=1e7", name="lora-held", steps=12), show_progress=False)
    adapter = load_file(str(tmp_path / "runs" / "lora-held" / "final" / "adapter_model.safetensors"))
    b = [t for k, t in adapter.items() if "lora_B" in k]
    assert b and max(float(t.abs().max()) for t in b) < 2 * 1e-2


def test_ewc_fisher_is_positive_and_its_anchors_are_the_pretrained_weights(tmp_path, pretrained_base, texts):
    from ftdist.training.loop import build

    base = pretrained_base("llama")
    cfg = reg_config(tmp_path, base, texts, "regularization.ewc.weight=100", "regularization.l2sp=1", name="fisher")
    store = prepare_run_dir(cfg, restart=False)
    run = build(cfg, LocalContext(store=store, device=torch.device("cpu"), show_progress=False), None)
    try:
        shares = run.anchors.shares
        pretrained = load_file(str(base / "model.safetensors"))
        assert {s.name for s in shares} == {n for n, p in run.bundle.model.named_parameters() if p.requires_grad}
        for share in shares:
            assert torch.equal(share.anchor, pretrained[share.name].float().flatten()), share.name
            assert share.fisher.shape == share.anchor.shape and bool((share.fisher >= 0).all())
        assert sum(float(s.fisher.sum()) for s in shares) > 0
        assert run.anchors.pull(LR) == {"penalty": 0.0, "anchor_distance": 0.0}  # zero at step 0
    finally:
        run.uploader.close()
        run.tracking.end("FINISHED")


def test_a_resumed_regularized_run_continues_the_same_curve(tmp_path, pretrained_base, texts):
    """Anchors, Fisher and the replay stream are functions of the base, the data and the step:
    a rerun from a checkpoint continues exactly."""
    import shutil

    base = pretrained_base("llama")
    cfg = reg_config(tmp_path, base, texts, "regularization.l2sp=3", "regularization.ewc.weight=1e5",
                     f"regularization.replay.data={texts['replay']}", "regularization.replay.fraction=0.2",
                     "checkpoint.every_steps=4", "checkpoint.keep=5", name="resumed", steps=8)
    summary = train_local(cfg, show_progress=False)
    run_dir = tmp_path / "runs" / "resumed"
    first = steps(run_dir)
    shutil.rmtree(run_dir / "final")  # as if killed after step 4's checkpoint
    again = train_local(cfg, show_progress=False)
    assert [r["event"] for r in read_metrics(run_dir / "metrics.jsonl") if "event" in r] == ["start", "resume"]
    second = steps(run_dir)
    for key in ("loss", "replay_loss", "penalty"):
        assert [r[key] for r in second] == pytest.approx([r[key] for r in first], rel=1e-6), key
    assert again["forgetting"] == pytest.approx(summary["forgetting"], rel=1e-6)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapters_take_every_regularizer(tmp_path, pretrained_base, texts, method):
    """Replay, L2-SP and EWC on adapters (over a 4-bit base for qlora): the Fisher and anchors
    are the adapters', the penalty grows from zero, the replay loss is logged, the adapter saved."""
    base = pretrained_base("llama")
    summary = train_local(reg_config(tmp_path, base, texts, f"method={method}", "lora.dropout=0", "train.lr=1e-2",
                                     "regularization.l2sp=1", "regularization.ewc.weight=1e4",
                                     "regularization.ewc.samples=8", f"regularization.replay.data={texts['replay']}",
                                     name=method, steps=8), show_progress=False)
    records = steps(Path(summary["run_dir"]))
    assert records[0]["penalty"] == 0.0 and records[-1]["penalty"] > 0
    # 0.1 of the rows at 8 task rows a step: 0.89 replay rows a step, so a step now and then has none.
    replayed = [r["replay_loss"] for r in records if "replay_loss" in r]
    assert len(replayed) == 7 and all(math.isfinite(x) for x in replayed)
    assert (Path(summary["final_dir"]) / "adapter_model.safetensors").is_file()
