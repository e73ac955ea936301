"""Mixtures: data.train as a list of sources, each with its own format and mapping, rows
drawn by weight, reproducibly, and told per source at the start and in the summary."""

import json

import numpy as np
import pytest

from ftdist.data.rows import build_dataset, train_order
from ftdist.errors import UserError
from ftdist.launch.preflight import check_inputs
from ftdist.data.tokenizer import train_tokenizer
from tests.conftest import DEMO, tiny_config

LINES = (DEMO / "train.jsonl").read_text().splitlines()


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_tokenizer((DEMO / "general.txt").read_text().split("\n\n"), 384)
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    return tok


def two_sources(tmp_path, n_a=500, n_b=500):
    """Source a: prompt/completion rows; source b: the same task as alpaca rows under other key names."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(LINES[:n_a]) + "\n")
    b.write_text("".join(json.dumps({"task": r["prompt"], "answer": r["completion"]}) + "\n"
                         for r in map(json.loads, LINES[n_a : n_a + n_b])))
    return a, b


def mixture(tmp_path, a, b, wa=None, wb=None, *overrides):
    weight = lambda w: "" if w is None else f", weight: {w}"  # noqa: E731
    return tiny_config(tmp_path, f"data.train=[{{path: {a}{weight(wa)}}}, {{path: {b}, format: alpaca{weight(wb)}, "
                                 "columns: {instruction: task, output: answer}}]", "data.packing=false", *overrides)


def test_weights_give_each_source_its_share_of_the_drawn_rows(tmp_path, tokenizer):
    a, b = two_sources(tmp_path)
    cfg = mixture(tmp_path, a, b, 0.8, 0.2)
    data = build_dataset(cfg.data, tokenizer, 0)
    assert data.format == "prompt_completion+alpaca" and len(data.train) == 1000
    order = train_order(data.train, cfg.data.weights, 0, 0)
    shares = np.bincount(data.train.source[order[:1000]], minlength=2) / 1000
    assert abs(shares[0] - 0.8) <= 0.02 and abs(shares[1] - 0.2) <= 0.02
    # Reproducible from the seed (so a resume draws the very same rows), new each epoch.
    assert np.array_equal(order, train_order(data.train, cfg.data.weights, 0, 0))
    assert not np.array_equal(order, train_order(data.train, cfg.data.weights, 0, 1))
    assert [s["share"] for s in data.stats["sources"]] == [0.8, 0.2]
    assert [s["rows"] for s in data.stats["sources"]] == [500, 500]


def test_a_small_source_with_a_large_weight_is_gone_through_again_before_any_row_repeats_twice(tmp_path, tokenizer):
    a, b = two_sources(tmp_path, 900, 100)
    cfg = mixture(tmp_path, a, b, 1, 1)
    data = build_dataset(cfg.data, tokenizer, 0)
    order = train_order(data.train, cfg.data.weights, 0, 0)
    small = order[data.train.source[order] == 1]
    counts = np.bincount(small, minlength=len(data.train))[data.train.of_source(1)]
    assert len(small) == 500 and counts.min() == counts.max() == 5  # every row 5 times, none more
    big = order[data.train.source[order] == 0]
    assert len(big) == len(set(big.tolist())) == 500  # 500 of 900, none twice


def test_without_weights_a_mixture_is_every_row_once(tmp_path, tokenizer):
    a, b = two_sources(tmp_path, 300, 100)
    cfg = mixture(tmp_path, a, b)
    data = build_dataset(cfg.data, tokenizer, 0)
    order = train_order(data.train, cfg.data.weights, 0, 0)
    assert sorted(order.tolist()) == list(range(400))
    assert [round(s["share"], 2) for s in data.stats["sources"]] == [0.75, 0.25]


def test_each_source_keeps_its_own_format_and_mapping_and_bad_input_names_the_source(tmp_path):
    a, b = two_sources(tmp_path, 20, 20)
    checked = check_inputs(mixture(tmp_path, a, b, 1, 1))
    assert checked.data_format == "prompt_completion+alpaca"
    with pytest.raises(UserError, match=r"data.train.1: no weight, where other sources have one"):
        mixture(tmp_path, a, b, 1, None)
    with pytest.raises(UserError, match=r"data.train.1: not found: .*nope.jsonl"):
        check_inputs(mixture(tmp_path, a, tmp_path / "nope.jsonl", 1, 1))
    with pytest.raises(UserError, match=r"data.train.1.columns: unknown key 'task'"):
        tiny_config(tmp_path, f"data.train=[{{path: {a}}}, {{path: {b}, columns: {{task: instruction}}}}]")
    b.write_text(b.read_text() + '{"task": "x"}\n')
    with pytest.raises(UserError, match=r'b.jsonl:21: "answer" must be a string'):
        check_inputs(mixture(tmp_path, a, b, 1, 1))


def search_raw(tmp_path, a, b, space):
    raw = mixture(tmp_path, a, b, 0.5, 0.5).model_dump(mode="json")
    raw["tune"] = {"name": "s", "space": space}
    return raw


def test_a_sources_weight_is_searchable_and_set_by_index(tmp_path):
    from ftdist.config.load import apply_override, validate_config
    from ftdist.tune.space import check_space, with_params

    a, b = two_sources(tmp_path, 20, 20)
    raw = search_raw(tmp_path, a, b, {"data.train.1.weight": {"uniform": [0.1, 0.5]}})
    cfg = validate_config(raw)
    check_space(raw, cfg, num_layers=4)  # every candidate gives a valid config
    trial = validate_config(with_params(raw, {"data.train.1.weight": 0.25}))
    assert trial.data.weights == pytest.approx([0.5 / 0.75, 0.25 / 0.75])
    apply_override(raw, "data.train.0.weight=3")
    assert validate_config(raw).data.weights == pytest.approx([3 / 3.5, 0.5 / 3.5])
    with pytest.raises(UserError, match=r"data.train.2.weight names no weighted source; data.train has 2"):
        validate_config(search_raw(tmp_path, a, b, {"data.train.2.weight": {"choice": [1, 2]}}))
    with pytest.raises(UserError, match=r"--set 'data.train.7.weight=1': 7 is not an index of that list \(it has 2 items"):
        apply_override(raw, "data.train.7.weight=1")
