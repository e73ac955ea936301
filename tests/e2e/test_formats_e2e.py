"""Data formats (alpaca, sharegpt, chat with mappings, preference), chat templates, and file
types (jsonl, json, parquet, csv, shard directories, globs, save_to_disk, s3://)."""

import json
from pathlib import Path

from ftdist.launch.preflight import check_inputs
from ftdist.data.records import RowReader
from tests.conftest import tiny_config
from tests.unit.test_formats import rows_of_demo, write_each_type


def test_s3_directories_and_globs_are_fetched_and_read(tmp_path, s3):
    rows = rows_of_demo(40)
    files = write_each_type(tmp_path / "local", rows)
    s3.put(files["shards"], "data", "shards")
    s3.put(files["save_to_disk"], "data", "saved")
    for source in (s3.url("data", "shards"), s3.url("data", "shards", "part-*.parquet"), s3.url("data", "saved")):
        cfg = tiny_config(tmp_path, f"data.train={source}", "data.eval=null", *s3.overrides())
        checked = check_inputs(cfg)
        assert checked.data_format == "prompt_completion"
        assert RowReader().read(checked.cfg.data.train)[0] == rows, source


def test_alpaca_parquet_shards_train_with_the_llama3_template(tmp_path):
    import pandas as pd

    from ftdist.launch.local import train_local
    from tests.e2e.test_train import assert_learned

    demo = rows_of_demo(400)
    rows = [{"instruction": r["prompt"], "input": "", "output": r["completion"]} for r in demo]
    (tmp_path / "shards").mkdir()
    for i in range(4):
        pd.DataFrame(rows[i::4]).to_parquet(tmp_path / "shards" / f"part-{i}.parquet")
    cfg = tiny_config(tmp_path, f"data.train={tmp_path / 'shards'}", "data.eval=null", "data.eval_fraction=0.1",
                      "data.chat_template=llama3", "data.max_length=256", "train.max_steps=20")
    summary = train_local(cfg, show_progress=False)
    run_dir = Path(summary["run_dir"])
    assert_learned(run_dir)
    start = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert start["format"] == "alpaca"
    saved = json.loads((run_dir / "final" / "tokenizer_config.json").read_text()).get("chat_template") \
        or (run_dir / "final" / "chat_template.jinja").read_text()
    assert "<|start_header_id|>" in saved  # the export speaks the template it trained with
