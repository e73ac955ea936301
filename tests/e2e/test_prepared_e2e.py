"""The prepared-data cache: compact rows kept by content, read back on a rerun, missed when a
byte of the data changes; `ftdist prepare`; the batched tokenizing equals the per-row one."""

import numpy as np

from ftdist.launch.preflight import check_inputs
from ftdist.data.prepared import prepared_dataset
from tests.unit.test_prepared import (
    config_with_copy,
    on_a_fresh_node,
    tokenizer,  # noqa: F401 (a fixture)
)


def test_runs_on_object_storage_keep_the_rows_in_the_bucket_for_a_fresh_node(tmp_path, tokenizer, s3):
    cfg, _ = config_with_copy(tmp_path, "train.jsonl", *s3.overrides())
    first = prepared_dataset(check_inputs(cfg).cfg, tokenizer)
    copies = s3.fs.find(s3.url("runs", ".prepared"))
    assert any(f.endswith("/stats.json") for f in copies) and any(f.endswith("/train.ids.npy") for f in copies)
    again = prepared_dataset(on_a_fresh_node(cfg, tmp_path, "node2"), tokenizer)
    assert again.stats["prepared"].startswith(f"from the cache, {s3.url('runs', '.prepared')}")
    assert np.array_equal(first.train.flat["ids"], again.train.flat["ids"])
    assert np.array_equal(first.eval.offsets, again.eval.offsets)


def test_a_local_run_of_s3_data_keeps_the_rows_in_the_datas_bucket(tmp_path, tokenizer, s3, capsys):
    _, local_file = config_with_copy(tmp_path)
    cfg, _ = config_with_copy(tmp_path, "train.jsonl", f"data.train={s3.put(local_file, 'sets', 'train.jsonl')}",
                              *s3.overrides()[1:])  # run.output stays local
    first = prepared_dataset(check_inputs(cfg).cfg, tokenizer)
    shared = s3.url(".ftdist-prepared")
    assert any(f.endswith("/stats.json") for f in s3.fs.find(shared))
    again = prepared_dataset(on_a_fresh_node(cfg, tmp_path, "node2"), tokenizer)
    assert again.stats["prepared"].startswith(f"from the cache, {shared}")
    assert np.array_equal(first.train.flat["ids"], again.train.flat["ids"])
    # A copy that cannot be written (no such bucket here; read-only data, say) is one warning: the rows stay local.
    unwritable = cfg.model_copy(update={"storage": cfg.storage.model_copy(
        update={"prepared_url": "s3://no-such-bucket/prepared", "cache_dir": str(tmp_path / "node3")})})
    capsys.readouterr()
    third = prepared_dataset(check_inputs(unwritable).cfg, tokenizer)
    warning = capsys.readouterr().out
    assert "ftdist: warning: the prepared rows are kept in" in warning and "storage.prepared_url" in warning
    assert np.array_equal(first.train.flat["ids"], third.train.flat["ids"])
