"""data.eval and data.retention as lists of sources: each evaluated on its own
(eval_loss/<name>, retention_loss/<name>, forgetting/<name>) and all together, by tokens."""

import json

import numpy as np
import pytest

from ftdist.config.schema import DataConfig
from ftdist.data.rows import build_dataset
from ftdist.errors import UserError
from ftdist.launch.local import train_local
from ftdist.io.metrics_log import read_metrics
from ftdist.data.tokenizer import train_tokenizer
from tests.conftest import DEMO, tiny_config

LINES = (DEMO / "eval.jsonl").read_text().splitlines()
PARAGRAPHS = [p for p in (DEMO / "general.txt").read_text().split("\n\n") if p.strip()]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """One tokenizer for every run here: a fresh one trained per run would learn from its
    retention text, and runs with other retention sources could not be compared."""
    where = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(PARAGRAPHS + [json.loads(line)["prompt"] for line in LINES], 384).save_pretrained(where)
    return where


def files(tmp_path):
    """Two eval files (prompt/completion), two retention sources (plain text, text rows)."""
    math, more = tmp_path / "math.jsonl", tmp_path / "more.jsonl"
    math.write_text("\n".join(LINES[:12]) + "\n")
    more.write_text("\n".join(LINES[12:40]) + "\n")
    prose, rows = tmp_path / "prose.txt", tmp_path / "wiki.jsonl"
    prose.write_text("\n\n".join(PARAGRAPHS[:6]))
    rows.write_text("".join(json.dumps({"text": p}) + "\n" for p in PARAGRAPHS[6:14]))
    return math, more, prose, rows


def test_names_default_to_the_files_and_eval_weights_are_refused():
    data = DataConfig(train="t.jsonl", eval=[{"path": "a/math.jsonl"}, {"path": "b/math.parquet"},
                                             {"path": "c/", "name": "chat"}])
    assert data.eval_names() == ["math-0", "math-1", "chat"]
    assert data.retention_names() == [] and DataConfig(train="t.jsonl", eval="e.jsonl").eval_names() == []
    # Rows held out of a training mixture are evaluated per training source.
    held = DataConfig(train=[{"path": "code.jsonl", "weight": 1}, {"path": "hf:org/chat:train", "weight": 1}])
    assert held.eval_names() == ["code", "chat"]
    assert held.split_sources("retention") == []
    with pytest.raises(ValueError, match=r"data.eval.1.weight: weights mix training rows"):
        DataConfig(train="t.jsonl", eval=[{"path": "a.jsonl"}, {"path": "b.jsonl", "weight": 2}])
    with pytest.raises(ValueError, match=r"data.retention: the name x is given to two sources"):
        DataConfig(train="t.jsonl", retention=[{"path": "a.txt", "name": "x"}, {"path": "b.txt", "name": "x"}])
    with pytest.raises(ValueError, match=r"data.eval: an empty list"):
        DataConfig(train="t.jsonl", eval=[])


def test_each_source_of_a_list_is_packed_on_its_own_and_keeps_its_source(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    math, more, prose, rows = files(tmp_path)
    cfg = tiny_config(tmp_path, f"data.eval=[{{path: {math}}}, {{path: {more}}}]",
                      f"data.retention=[{{path: {prose}}}, {{path: {rows}}}]")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data = build_dataset(cfg.data, tokenizer, 0)
    for split, sizes in (("eval", (12, 28)), ("retention", (6, 8))):
        got = getattr(data, split)
        docs = [int(sum(np.unique(got.row("doc", i)[got.row("doc", i) >= 0]).size for i in got.of_source(s)))
                for s in (0, 1)]
        assert docs == list(sizes), split  # every example of each source, in rows of its own source
    # A training mixture's held-out rows keep their training source's index.
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(LINES[:20]) + "\n")
    b.write_text("\n".join(LINES[20:21]) + "\n")  # one row: nothing to hold out
    held = tiny_config(tmp_path, f"data.train=[{{path: {a}}}, {{path: {b}}}]", "data.eval=null",
                       "data.eval_fraction=0.2")
    data = build_dataset(held.data, tokenizer, 0)
    assert set(data.eval.source.tolist()) == {0} and len(data.train.of_source(1)) == 1


def test_a_bad_row_of_a_listed_source_names_its_key(tmp_path):
    from ftdist.launch.preflight import check_inputs

    math, more, prose, rows = files(tmp_path)
    with more.open("a") as f:
        f.write('{"prompt": "x"}\n')
    cfg = tiny_config(tmp_path, f"data.eval=[{{path: {math}}}, {{path: {more}}}]")
    with pytest.raises(UserError, match=rf"{more}:29: \"completion\" must be a string"):
        check_inputs(cfg)
    missing = tiny_config(tmp_path, f"data.retention=[{{path: {prose}}}, {{path: {tmp_path / 'gone.txt'}}}]")
    with pytest.raises(UserError, match=r"data.retention.1: not found"):
        check_inputs(missing)


def run(tmp_path, name, eval_, retention):
    cfg = tiny_config(tmp_path, f"model.tokenizer={tmp_path.parent / 'tok'}", f"data.eval={eval_}",
                      f"data.retention={retention}", "train.max_steps=4", "train.eval_every=2",
                      "checkpoint.every_steps=100", name=name)
    train_local(cfg)
    run_dir = tmp_path / "runs" / name
    return read_metrics(run_dir / "metrics.jsonl"), json.loads((run_dir / "summary.json").read_text()), cfg


def curve(records, key):
    return [r[key] for r in records if key in r]


