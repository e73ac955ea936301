"""The loop read as a whole, in-process and in seconds: begin, steps, checkpoints, finish; and a
rerun restores the newest complete checkpoint (a partial one is never used) and continues to
exactly the curve of the run it replaces."""

import json
import shutil

import pytest
import torch

from ftdist.training.context import LocalContext
from ftdist.training.loop import TrainState, train
from ftdist.io.metrics_log import read_metrics
from ftdist.launch.rundir import prepare_run_dir
from tests.conftest import DEMO, complete_checkpoints, tiny_config


def steps_of(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("method, freeze", [("full", 0), ("lora", 0), ("full", 1)])
def test_a_rerun_resumes_from_the_newest_complete_checkpoint_to_the_same_curve(tmp_path, method, freeze):
    cfg = tiny_config(tmp_path, f"method={method}", f"freeze_layers={freeze}", "lora.dropout=0.1",
                      "model.init.num_layers=2", "train.max_steps=6", "checkpoint.every_steps=2",
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
    if method == "full":  # a checkpoint holds the trained weights; frozen ones are the base's, loaded again
        from safetensors.torch import load_file

        kept = set(load_file(str(run_dir / "checkpoints" / "step-4" / "model.safetensors")))
        assert any(k.startswith("model.layers.1.") for k in kept)
        assert any(k.startswith("model.layers.0.") for k in kept) == (freeze == 0)
        if freeze:  # exported whole: the frozen weights from the base, the trained ones from the checkpoint
            from ftdist.artifacts.export import export

            export(str(run_dir / "checkpoints" / "step-4"), str(tmp_path / "exported"))
            exported = load_file(str(tmp_path / "exported" / "model.safetensors"))
            base = load_file(str(run_dir / "base" / "model.safetensors"))
            trained = load_file(str(run_dir / "checkpoints" / "step-4" / "model.safetensors"))
            for key, tensor in exported.items():
                assert torch.equal(tensor, trained[key] if key in trained else base[key]), key
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


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, named", [
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000]),
     "model.safetensors has 1000 bytes"),
    (lambda d: flip_a_byte(d / "optimizer.pt"), "optimizer.pt does not match its checksum"),
    (lambda d: (d / "state.json").write_text("{garbage"), "state.json has 8 bytes"),
])
def test_a_damaged_checkpoint_is_named_and_skipped_for_the_one_before(tmp_path, capsys, damage, named):
    from ftdist.errors import UserError

    cfg = tiny_config(tmp_path, "model.init.num_layers=2", "train.max_steps=6", "checkpoint.every_steps=2",
                      "checkpoint.keep=5", "train.eval_every=2")
    store = prepare_run_dir(cfg, restart=False)
    run_dir, checkpoints = store.local, store.local / "checkpoints"

    def context() -> LocalContext:
        return LocalContext(store=store, device=torch.device("cpu"), show_progress=False)

    train(cfg, context())
    curve = steps_of(run_dir)
    manifest = json.loads((checkpoints / "step-4" / "COMPLETE").read_text())["files"]
    assert {"model.safetensors", "optimizer.pt", "state.json", "rng-0.safetensors"} <= set(manifest)

    shutil.rmtree(run_dir / "final")
    damage(checkpoints / "step-4")
    train(cfg, context())
    assert f"step-4 is damaged ({named}" in capsys.readouterr().err
    resumes = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("event") == "resume"]
    assert [r["checkpoint"] for r in resumes] == ["step-2"]
    assert [loss for _, loss in steps_of(run_dir)] == pytest.approx([loss for _, loss in curve], rel=1e-6)

    # The only checkpoint left, damaged: the run stops, and the checkpoint stays for repair.
    shutil.rmtree(run_dir / "final")
    shutil.rmtree(checkpoints / "step-2")
    damage(checkpoints / "step-4")
    with pytest.raises(UserError, match=r"step-4 is damaged .* only checkpoint left; restore the file, or rerun "
                                         r"with --restart"):
        train(cfg, context())
    assert (checkpoints / "step-4" / "COMPLETE").is_file()


def test_a_damaged_checkpoint_in_the_bucket_is_skipped_for_the_one_before(tmp_path, s3, capsys):
    cfg = tiny_config(tmp_path, "model.init.num_layers=2", "train.max_steps=6", "checkpoint.every_steps=2",
                      "checkpoint.keep=5", "train.eval_every=2", *s3.overrides())
    store = prepare_run_dir(cfg, restart=False)

    def context() -> LocalContext:
        return LocalContext(store=store, device=torch.device("cpu"), show_progress=False)

    train(cfg, context())
    run = s3.url("runs", "t")
    s3.fs.rm(f"{run}/final", recursive=True)
    s3.fs.pipe_file(f"{run}/checkpoints/step-4/rng-0.safetensors", b"not the rng state")
    train(cfg, context())
    assert "step-4 is damaged (rng-0.safetensors has 17 bytes" in capsys.readouterr().err
    resumes = [r for r in read_metrics(store.local / "metrics.jsonl") if r.get("event") == "resume"]
    assert [r["checkpoint"] for r in resumes] == ["step-2"]
    assert s3.fs.exists(f"{run}/checkpoints/step-4/COMPLETE")  # saved again, whole


def test_negative_transfer_is_told_with_the_two_numbers(tmp_path, capsys):
    """A fine-tune that leaves the task worse than the base model did (here: a learning rate
    far too high) says so in the summary and the end-of-run lines; a good one does not."""
    from ftdist.cli import main
    from tests.conftest import write_config

    bad = tiny_config(tmp_path, "model.init.num_layers=2", "train.lr=3.0", "train.grad_clip=null", "train.warmup_steps=0",
                      "train.schedule=constant", "train.max_steps=6", "train.eval_every=3", name="too-high")
    assert main(["train", str(write_config(tmp_path, bad, "bad.yaml")), "--local"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "runs" / "too-high" / "summary.json").read_text())
    worse = summary["negative_transfer"]
    evals = [r["eval_loss"] for r in read_metrics(tmp_path / "runs" / "too-high" / "metrics.jsonl") if "eval_loss" in r]
    assert (worse["eval_loss_start"], worse["eval_loss_end"]) == (evals[0], evals[-1]) and evals[-1] > evals[0]
    assert (f"negative transfer: the task's eval loss rose from {evals[0]:.4f} before training to {evals[-1]:.4f}"
            in out) and "lower train.lr" in out

    # A classifier's accuracy counts too: lower at the end than before training is told, with its two numbers.
    from ftdist.training.loop import negative_transfer
    from ftdist.objectives.classification import Classification

    start = {"eval_loss": 0.69, "eval_accuracy": 0.62}
    assert negative_transfer(TrainState(eval_start=start, eval_loss=0.65, eval_metrics={"eval_accuracy": 0.55}),
                             Classification) == {"eval_accuracy_start": 0.62, "eval_accuracy_end": 0.55}
    assert negative_transfer(TrainState(eval_start=start, eval_loss=0.65, eval_metrics={"eval_accuracy": 0.8}),
                             Classification) == {}
    # A checkpoint written before objectives (its two fields) resumes with the same figures to compare.
    assert TrainState.of_checkpoint({"eval_loss_start": 0.69, "eval_accuracy_start": 0.62}).eval_start == start

    good = tiny_config(tmp_path, "model.init.num_layers=2", "train.max_steps=6", "train.eval_every=3", name="fine")
    assert main(["train", str(write_config(tmp_path, good, "good.yaml")), "--local"]) == 0
    assert "negative transfer" not in capsys.readouterr().out
    assert "negative_transfer" not in json.loads((tmp_path / "runs" / "fine" / "summary.json").read_text())
