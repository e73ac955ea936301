"""task: classification: {text, label} rows, a new float32 head on the final hidden states,
from a linear probe on frozen features (feature extraction) to LoRA with the head; accuracy
and macro-F1; final/ loaded by transformers' AutoModelForSequenceClassification (full) or by
PEFT on that class built from the base (adapters and head); `ftdist classify`."""

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ftdist.objectives.classification import scores
from ftdist.data.rows import IGNORE, build_dataset
from ftdist.errors import UserError
from ftdist.data.records import labels_of
from ftdist.data.tokenizer import train_tokenizer
from tests.conftest import DEMO, run_cli, tiny_config


def topic_rows(n: int, seed: int) -> list[dict]:
    """English paragraphs (label "english") against digit-reversal prompts ("digits")."""
    rng = random.Random(seed)
    english = [p.strip() for p in (DEMO / "general.txt").read_text().split("\n\n") if p.strip()]
    digits = [json.loads(x)["prompt"] for x in (DEMO / "train.jsonl").read_text().splitlines()]
    rows = []
    for i in range(n):
        if i % 2:
            sentence = rng.choice(english).split(". ")
            rows.append({"text": rng.choice(sentence)[:160], "label": "english"})
        else:
            rows.append({"text": rng.choice(digits), "label": "digits"})
    return rows


def write_rows(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def classification_config(tmp_path, base, *extra, name):
    train = write_rows(tmp_path / "topics-train.jsonl", topic_rows(160, 0))
    eval_ = write_rows(tmp_path / "topics-eval.jsonl", topic_rows(40, 1))
    return tiny_config(tmp_path, "task=classification", "model.init=null", f"model.name_or_path={base}",
                       f"data.train={train}", f"data.eval={eval_}", "data.packing=false", "train.max_steps=30",
                       "train.eval_every=15", "train.batch_size=16", "checkpoint.every_steps=1000",
                       "lora.dropout=0", *extra, name=name)


# ---------------------------------------------------------------- rows, labels, metrics


def test_the_label_is_the_target_of_each_texts_last_token_only(tmp_path):
    tokenizer = train_tokenizer((DEMO / "general.txt").read_text().split("\n\n"), 384)
    rows = [{"text": "the cat sat", "label": "b"}, {"text": "a dog", "label": "a"}, {"text": "x " * 50, "label": "b"}]
    cfg = tiny_config(tmp_path, "task=classification", f"data.train={write_rows(tmp_path / 'd.jsonl', rows)}",
                      "data.eval=null", "data.eval_fraction=0", "data.packing=false", "data.max_length=16")
    data = build_dataset(cfg.data, tokenizer, 0, labels=["a", "b"])
    by_text = {}
    for ids, targets in zip(data.train.ids, data.train.targets):
        assert (targets[:-1] == IGNORE).all() and targets[-1] != IGNORE  # one target: on the last token
        by_text[tokenizer.decode(ids).replace(" ", "")[:6]] = int(targets[-1])
    assert by_text == {"thecat": 1, "adog": 0, "xxxxxx": 1}
    assert max(len(x) for x in data.train.ids) == 16 and data.stats["truncated"] == 1  # cut to max_length


def test_a_classifiers_retention_text_is_scored_in_chunks_as_whole_logits_would():
    """Forgetting of a classifier goes through its LM head (the task leaves it alone), in
    chunks as an LM run's loss is (no [tokens x vocab] logits at once): the same loss."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ftdist.objectives.classification import ClassifierHead, add_head
    from ftdist.data.rows import collate, pack, tokenize_records
    from ftdist.objectives.tokens import loss_sum

    tokenizer = train_tokenizer((DEMO / "general.txt").read_text().split("\n\n"), 384)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4)).eval()
    head = ClassifierHead(model.get_output_embeddings(), add_head(model, 2, 0), "last")
    texts = [{"text": p} for p in (DEMO / "general.txt").read_text().split("\n\n")[:4]]
    examples, _ = tokenize_records(tokenizer, texts, 64)
    rows = pack(examples, 64, True, tokenizer.pad_token_id)
    batch = collate(rows, list(range(len(rows))), tokenizer.pad_token_id)
    with torch.no_grad():
        whole = loss_sum(model, batch, torch.device("cpu"), None)  # the LM head's own logits
        chunked = loss_sum(model, batch, torch.device("cpu"), head.for_text())
    assert float(chunked) == pytest.approx(float(whole), rel=1e-5)
    assert head.targets is None and not head.text  # the head is back to labels (or logits)


def test_labels_are_read_from_the_rows_numbers_in_numeric_order():
    assert labels_of([{"label": 10}, {"label": 2}, {"label": "2"}]) == ["2", "10"]
    assert labels_of([{"label": "pos"}, {"label": "neg"}]) == ["neg", "pos"]


def test_accuracy_and_macro_f1_from_the_confusion_counts():
    counts = np.array([[3, 1], [0, 4]], float)  # [true, predicted]
    got = scores(counts)
    assert got["accuracy"] == pytest.approx(7 / 8)
    f1_a, f1_b = 2 * 1 * 0.75 / 1.75, 2 * 0.8 * 1 / 1.8
    assert got["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)


@pytest.mark.parametrize("row, problem", [
    ({"text": "fine", "label": "maybe"}, "'maybe' is not one of classification.labels"),
    ({"text": "fine", "label": None}, '"label" must be a label'),
    ({"text": "", "label": "yes"}, '"text" is empty'),
])
def test_a_bad_row_names_the_file_line_and_field(tmp_path, row, problem):
    from ftdist.launch.preflight import check_inputs

    rows = [{"text": "good", "label": "yes"}, {"text": "bad", "label": "no"}, row]
    cfg = tiny_config(tmp_path, "task=classification", 'classification.labels=["yes", "no"]',
                      f"data.train={write_rows(tmp_path / 'd.jsonl', rows)}", "data.eval=null")
    with pytest.raises(UserError, match=f"d.jsonl:3: .*{problem}"):
        check_inputs(cfg)


def test_unquoted_yes_no_labels_are_refused_with_the_fix(tmp_path):
    with pytest.raises(UserError, match=r"classification.labels: .*booleans.*quote them"):
        tiny_config(tmp_path, "task=classification", "classification.labels=[yes, no]")


def test_task_and_row_format_must_agree(tmp_path):
    with pytest.raises(UserError, match="task classification trains on"):
        tiny_config(tmp_path, "task=classification", "data.format=text")
    from ftdist.launch.preflight import check_inputs

    with pytest.raises(UserError, match="rows are prompt_completion.*task: classification needs"):
        check_inputs(tiny_config(tmp_path, "task=classification"))


# ---------------------------------------------------------------- end to end


def base_state(base) -> dict:
    return load_file(str(base / "model.safetensors"))


def exports_as_a_sequence_classifier(tmp_path, run_dir):
    """`ftdist export` of a LoRA classifier: the adapters with the head as they are, and merged
    into the base, a *ForSequenceClassification transformers loads alone, with the same
    probabilities; a checkpoint is refused (head and labels come with the final model)."""
    from transformers import AutoModelForSequenceClassification

    from ftdist.artifacts.classify import load_classifier, predict

    texts = ["reverse 4821 =", "The river ran quietly past the old mill"]
    ours, tokenizer, pooling = load_classifier(run_dir / "final")
    expected = predict(ours, tokenizer, texts, pooling)
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert run_cli("export", str(run_dir), "--out", str(adapter)).returncode == 0
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    result = run_cli("export", str(run_dir), "--out", str(merged), "--merge")
    assert result.returncode == 0, result.stderr
    model = AutoModelForSequenceClassification.from_pretrained(merged)  # transformers alone, no PEFT
    assert model.config.id2label == {0: "digits", 1: "english"} and not any("lora" in n for n, _ in model.named_parameters())
    with torch.no_grad():  # pooled as the run trained (mean here; transformers' own forward takes the last token)
        merged_probs = predict(model.eval(), tokenizer, texts, pooling)
    for theirs, p in zip(merged_probs, expected):
        assert theirs == pytest.approx(p, abs=1e-4)
    refused = run_cli("export", str(run_dir / "checkpoints" / "step-20"), "--out", str(tmp_path / "ckpt"))
    assert refused.returncode == 2 and "export the run once it has finished" in refused.stderr
