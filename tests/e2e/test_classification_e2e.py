"""task: classification: {text, label} rows, a new float32 head on the final hidden states,
from a linear probe on frozen features (feature extraction) to LoRA with the head; accuracy
and macro-F1; final/ loaded by transformers' AutoModelForSequenceClassification (full) or by
PEFT on that class built from the base (adapters and head); `ftdist classify`."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ftdist.launch.local import train_local
from tests.conftest import run_cli
from tests.unit.test_classification import (
    base_state,
    classification_config,
    exports_as_a_sequence_classifier,
)


def test_a_linear_probe_on_frozen_features_learns_and_leaves_every_base_weight_as_it_was(tmp_path, pretrained_base):
    from transformers import AutoModelForSequenceClassification

    from ftdist.artifacts.classify import load_classifier, predict

    base = pretrained_base("llama")
    cfg = classification_config(tmp_path, base, "method=full", "freeze_layers=all", "train.lr=3e-2", name="probe")
    summary = train_local(cfg, show_progress=False)
    assert summary["trainable_params"] == 64 * 2  # the head alone: hidden x labels
    assert summary["eval_accuracy"] >= 0.9 and summary["eval_macro_f1"] >= 0.9, summary
    final = tmp_path / "runs" / "probe" / "final"
    trained, pretrained = load_file(str(final / "model.safetensors")), base_state(base)
    assert set(trained) - set(pretrained) == {"score.weight"}  # the backbone's keys and the head; no LM head
    for key in set(trained) & set(pretrained):
        assert torch.equal(trained[key], pretrained[key]), key  # bit for bit

    model = AutoModelForSequenceClassification.from_pretrained(final)  # transformers alone
    assert model.config.id2label == {0: "digits", 1: "english"}
    ours, tokenizer, pooling = load_classifier(final)
    texts = ["reverse 4821 =", "The river ran quietly past the old mill"]
    probs = predict(ours, tokenizer, texts, pooling)
    assert [max(p, key=p.get) for p in probs] == ["digits", "english"]
    with torch.no_grad():  # transformers' own pooling (the last token) gives the same answer
        for text, p in zip(texts, probs):
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0]
            assert logits.softmax(-1).tolist() == pytest.approx([p["digits"], p["english"]], abs=1e-5)


# LoRA here; QLoRA and the top two blocks with the head in `make test-all` (tests/matrix/test_classification_matrix.py).
@pytest.mark.parametrize("method, extra", [("lora", ("train.lr=1e-2",))])
def test_adapters_or_top_blocks_learn_with_the_head(tmp_path, pretrained_base, method, extra):
    learns_with_the_head(tmp_path, pretrained_base, method, extra)


def learns_with_the_head(tmp_path, pretrained_base, method: str, extra: tuple) -> None:
    """The head with adapters or top blocks: learns, resumes from step 20 to the same curve,
    classifies through `ftdist classify`, and (LoRA) exports as a sequence classifier."""
    base = pretrained_base("llama")
    cfg = classification_config(tmp_path, base, f"method={method}", *extra, "classification.pooling=mean",
                                "checkpoint.every_steps=10", name=method)
    summary = train_local(cfg, show_progress=False)
    # Checkpoints hold the head with the adapters (or the weights): resumed from step 20, the same curve.
    run_dir = tmp_path / "runs" / method
    first = (run_dir / "metrics.jsonl").read_text()
    shutil.rmtree(run_dir / "final")
    assert train_local(cfg, show_progress=False)["eval_accuracy"] == summary["eval_accuracy"]
    resumed = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["checkpoint"] for r in resumed if r.get("event") == "resume"] == ["step-20"]
    before = {r["step"]: r["loss"] for r in map(json.loads, first.splitlines()) if "loss" in r}
    assert {r["step"]: r["loss"] for r in resumed if "loss" in r} == pytest.approx(before, rel=1e-5)
    assert summary["eval_accuracy"] >= 0.9, summary
    records = [r for r in map(json.loads, (tmp_path / "runs" / method / "metrics.jsonl").read_text().splitlines())
               if "eval_accuracy" in r]
    assert [r["step"] for r in records] == [0, 15, 30] and records[-1]["eval_loss"] < records[0]["eval_loss"]
    final = tmp_path / "runs" / method / "final"
    result = run_cli("classify", str(final), "--text", "reverse 903 =", "--text", "It was a cold morning in town")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("digits ") and lines[1].startswith("english "), result.stdout
    assert "(digits " in lines[0] and "english " in lines[0]  # every label's probability
    if method == "lora":
        exports_as_a_sequence_classifier(tmp_path, run_dir)
