"""The prepared-data cache: compact rows kept by content, read back on a rerun, missed when a
byte of the data changes; `ftdist prepare`; the batched tokenizing equals the per-row one."""

import json
import shutil

import numpy as np
import pytest

from ftdist.data.rows import Encoded, Rows, encode, encode_all, pack, to_examples
from ftdist.launch.preflight import check_data, check_inputs
from ftdist.data.prepared import data_key, prepared_dataset, validated
from ftdist.data.tokenizer import train_tokenizer
from tests.conftest import DEMO, run_cli, tiny_config, write_config


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer((DEMO / "general.txt").read_text().split("\n\n"), 384)


def config_with_copy(tmp_path, name="train.jsonl", *overrides):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    shutil.copyfile(DEMO / "train.jsonl", data / name)
    # Its own cache, unlike other tests: what is asserted here is whether the rows were cached.
    return tiny_config(tmp_path, f"data.train={data / name}", f"storage.cache_dir={tmp_path / 'cache'}",
                       *overrides), data / name


def test_a_rerun_reads_the_cache_and_one_changed_byte_misses_it(tmp_path, tokenizer):
    cfg, data = config_with_copy(tmp_path)
    first = prepared_dataset(cfg, tokenizer)
    again = prepared_dataset(cfg, tokenizer)
    assert first.stats["prepared"].startswith("tokenized") and again.stats["prepared"].startswith("from the cache")
    for split in ("train", "eval"):
        a, b = getattr(first, split), getattr(again, split)
        assert all(np.array_equal(a.flat[c], b.flat[c]) for c in a.flat) and np.array_equal(a.offsets, b.offsets)
    # Another name for the same bytes: the same rows (the cache is keyed by content).
    renamed, _ = config_with_copy(tmp_path, "renamed.jsonl")
    assert prepared_dataset(renamed, tokenizer).stats["prepared"].startswith("from the cache")
    # One byte of one row changed (a digit of a completion): tokenized again.
    text = data.read_text()
    i = text.index('"completion": "') + len('"completion": "')
    data.write_text(text[:i] + ("1" if text[i] != "1" else "2") + text[i + 1 :])
    assert prepared_dataset(cfg, tokenizer).stats["prepared"].startswith("tokenized")
    # Settings that shape the rows are part of the key; others are not.
    assert data_key(cfg) != data_key(cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_length": 32})}))
    assert data_key(cfg) == data_key(cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr": 0.1})}))


def test_preflight_reads_rows_validated_before_only_once(tmp_path):
    cfg, data = config_with_copy(tmp_path)
    assert validated(cfg) is None
    assert check_data(cfg) == ("prompt_completion", 0, None)
    assert validated(cfg) == ("prompt_completion", 0, None)
    with open(data, "a") as f:
        f.write("{not json\n")  # new bytes: validated again, and the bad row found
    assert validated(cfg) is None


def test_rows_are_compact_int32_arrays(tmp_path, tokenizer):
    cfg, _ = config_with_copy(tmp_path)
    train = prepared_dataset(cfg, tokenizer).train
    assert all(a.dtype == np.int32 for a in train.flat.values())
    # Every column is 4 bytes a token slot, plus one offset a row: no per-row objects.
    assert train.nbytes() == 4 * 4 * len(train.flat["ids"]) + 8 * (len(train) + 1)
    picked = train.take([3, 1])
    assert np.array_equal(picked.ids[0], train.ids[3]) and np.array_equal(picked.targets[1], train.targets[1])
    both = Rows.concat([picked, train.take([0])])
    assert len(both) == 3 and np.array_equal(both.doc[2], train.doc[0])


def test_batched_tokenizing_equals_one_row_at_a_time(tokenizer):
    records = [json.loads(line) for line in (DEMO / "train.jsonl").read_text().splitlines()[:50]]
    records += [{"text": "plain text row"}, {"messages": [{"role": "user", "content": "hi"},
                                                          {"role": "assistant", "content": "yo"}]}]
    tokenizer.chat_template = tokenizer.chat_template or "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    batched = encode_all(tokenizer, records)
    assert [batched.record(i) for i in range(len(records))] == [encode(tokenizer, r) for r in records]
    # Record order kept across kinds (a chat row between prompt/completion rows)
    mixed = records[:3] + records[-1:] + records[3:6] + records[-2:-1]
    assert [encode_all(tokenizer, mixed).record(i) for i in range(len(mixed))] == [encode(tokenizer, r) for r in mixed]


def test_unpacked_rows_keep_one_example_each():
    examples = to_examples(Encoded.of([([1, 2, 3], [True] * 3), ([4, 5], [True] * 2)]), 8)[0]
    rows = pack(examples, 8, packing=False, pad_id=0)
    assert [r.tolist() for r in rows.ids] == [[1, 2, 3], [4, 5]]
    assert [r.tolist() for r in rows.positions] == [[0, 1, 2], [0, 1]]


def test_prepare_command_prints_rows_tokens_and_packing_then_hits_the_cache(tmp_path, capsys):
    cfg, _ = config_with_copy(tmp_path)
    config = write_config(tmp_path, cfg)
    first = run_cli("prepare", str(config))
    assert first.returncode == 0, first.stderr
    assert "train: " in first.stdout and "packing efficiency" in first.stdout and "tokenized, kept in" in first.stdout
    assert first.stderr == ""  # nothing but ftdist's lines
    from ftdist.cli import main

    capsys.readouterr()
    assert main(["prepare", str(config)]) == 0  # again, in this process
    second = capsys.readouterr().out
    assert "from the cache" in second
    assert first.stdout.splitlines()[:3] == second.splitlines()[:3]  # the same rows, counted the same


def on_a_fresh_node(cfg, tmp_path, node: str):
    """The config as preflight hands it on, with an empty local cache (a new node's disk)."""
    storage = cfg.storage.model_copy(update={"cache_dir": str(tmp_path / node)})
    return check_inputs(cfg.model_copy(update={"storage": storage})).cfg


