"""The Ray Data path gives the loop the same rows local mode builds in-process."""

import json
from pathlib import Path

import pytest

from ftdist.data.rows import build_dataset
from ftdist.errors import UserError
from ftdist.model.source import load_tokenizer
from ftdist.training.base import resolve_base
from ftdist.launch.preflight import check_data
from ftdist.data.raydata import ray_datasets, rows_of
from ftdist.io.storage import RunStore
from tests.conftest import DEMO, ONE_RAY_AT_A_TIME, tiny_config

pytestmark = [pytest.mark.ray, ONE_RAY_AT_A_TIME]


def prepared(tmp_path: Path, *overrides: str):
    cfg = tiny_config(tmp_path, *overrides)
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    base = resolve_base(cfg, RunStore(str(run_dir), run_dir, cfg.storage))
    check_data(cfg)
    datasets, _ = ray_datasets(cfg, load_tokenizer(cfg, base))
    datasets = {k: v.materialize() for k, v in datasets.items()}
    return cfg, base, datasets


def as_list(rows) -> list[tuple]:
    return [(tuple(i.tolist()), tuple(t.tolist())) for i, t in zip(rows.ids, rows.targets)]


def as_set(rows) -> set[tuple]:
    return set(as_list(rows))


def test_rows_through_ray_data_equal_local_rows(tmp_path, ray_local):
    cfg, base, datasets = prepared(tmp_path, "data.packing=false")
    local = build_dataset(cfg.data, load_tokenizer(cfg, base), cfg.train.seed)
    train = rows_of(datasets["train"].iterator())
    evaluation = rows_of(datasets["eval"].iterator())
    assert as_set(train) == as_set(local.train) and len(train) == len(local.train)
    assert as_set(evaluation) == as_set(local.eval)


def test_packed_rows_hold_every_target_token(tmp_path, ray_local):
    cfg, base, datasets = prepared(tmp_path)  # packing on
    local = build_dataset(cfg.data, load_tokenizer(cfg, base), cfg.train.seed)
    train = rows_of(datasets["train"].iterator())
    assert train.target_tokens() == local.train.target_tokens()  # packed differently, nothing lost
    assert all(len(ids) == cfg.data.max_length for ids in train.ids)


def test_eval_fraction_holds_out_part_of_train(tmp_path, ray_local):
    from collections import Counter

    cfg, base, datasets = prepared(tmp_path, "data.eval=null", "data.eval_fraction=0.1", "data.packing=false")
    train = rows_of(datasets["train"].iterator())
    held_out = rows_of(datasets["eval"].iterator())
    every = build_dataset(cfg.data.model_copy(update={"eval_fraction": 0.0}), load_tokenizer(cfg, base), 0).train
    assert abs(len(held_out) - len(every) * 0.1) <= 1
    # Together exactly every example once (the demo data has repeated rows: count them).
    assert Counter(as_list(train)) + Counter(as_list(held_out)) == Counter(as_list(every))


def test_bad_rows_are_skipped_with_skip_bad_rows_and_named_by_line_without(tmp_path, ray_local):
    lines = (DEMO / "train.jsonl").read_text().splitlines()[:40]
    data = tmp_path / "bad.jsonl"
    bad = [json.dumps({"prompt": 1, "completion": "x"}), "{not json", json.dumps({"text": "other format"})]
    data.write_text("\n".join(lines[:10] + bad + lines[10:]) + "\n")
    cfg, _, datasets = prepared(tmp_path, f"data.train={data}", "data.skip_bad_rows=true", "data.packing=false")
    train = rows_of(datasets["train"].iterator())
    assert len(train) == 40  # the bad rows are gone, every good one is there
    with pytest.raises(UserError, match=r"bad.jsonl:11: \"prompt\" must be a string"):
        check_data(tiny_config(tmp_path, f"data.train={data}"))


def test_a_user_error_inside_a_worker_reaches_the_user_as_one_message():
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from ftdist.launch.ray_train import find_user_error

    raised_in_worker = RayTaskError("train_fn", "Traceback ...", UserError("data.train: no rows")).as_instanceof_cause()
    wrapped = WorkerGroupError("worker 1 failed", {1: raised_in_worker})
    found = find_user_error(wrapped)
    assert isinstance(found, UserError) and str(found) == "data.train: no rows"
    assert find_user_error(WorkerGroupError("x", {0: RuntimeError("boom")})) is None


def test_alpaca_parquet_shards_through_ray_data_equal_local_rows(tmp_path, ray_local):
    import pandas as pd

    lines = (DEMO / "train.jsonl").read_text().splitlines()[:60]
    rows = [{"instruction": r["prompt"], "output": r["completion"]} for r in map(json.loads, lines)]
    (tmp_path / "shards").mkdir()
    for i in range(3):
        pd.DataFrame(rows[i::3]).to_parquet(tmp_path / "shards" / f"part-{i}.parquet")
    cfg, base, datasets = prepared(tmp_path, f"data.train={tmp_path / 'shards'}", "data.eval=null",
                                   "data.eval_fraction=0", "data.packing=false", "data.max_length=128")
    local = build_dataset(cfg.data, load_tokenizer(cfg, base), cfg.train.seed)
    train = rows_of(datasets["train"].iterator())
    assert local.format == "alpaca" and len(train) == len(local.train) == 60
    assert as_set(train) == as_set(local.train)


def test_a_mixtures_rows_reach_the_workers_knowing_their_source(tmp_path, ray_local):
    import numpy as np

    lines = (DEMO / "train.jsonl").read_text().splitlines()
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:60]) + "\n")
    (tmp_path / "b.jsonl").write_text("\n".join(lines[60:80]) + "\n")
    (tmp_path / "c.jsonl").write_text("\n".join(lines[80:90]) + "\n")  # evaluated: a list of two sources
    cfg, base, datasets = prepared(tmp_path, f"data.train=[{{path: {tmp_path / 'a.jsonl'}, weight: 1}}, "
                                             f"{{path: {tmp_path / 'b.jsonl'}, weight: 3}}]", "data.packing=false",
                                   f"data.eval=[{{path: {tmp_path / 'b.jsonl'}}}, {{path: {tmp_path / 'c.jsonl'}}}]")
    local = build_dataset(cfg.data, load_tokenizer(cfg, base), cfg.train.seed)
    train, eval_rows = rows_of(datasets["train"].iterator()), rows_of(datasets["eval"].iterator())
    assert np.array_equal(train.source, local.train.source) and np.bincount(train.source).tolist() == [60, 20]
    assert as_list(train) == as_list(local.train)
    assert np.bincount(eval_rows.source).tolist() == [20, 10] and as_list(eval_rows) == as_list(local.eval)
