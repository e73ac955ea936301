"""Mixtures: data.train as a list of sources, each with its own format and mapping, rows
drawn by weight, reproducibly, and told per source at the start and in the summary."""

import json

from tests.unit.test_mixtures import mixture, two_sources


def test_a_mixture_trains_and_tells_each_source_at_the_start_and_in_the_summary(tmp_path, capsys):
    from ftdist.launch.local import train_local

    a, b = two_sources(tmp_path, 200, 50)
    cfg = mixture(tmp_path, a, b, 0.5, 0.5, "train.max_steps=4", "train.eval_every=4", "checkpoint.every_steps=2",
                  "data.chat_template=chatml")
    train_local(cfg)
    out = capsys.readouterr().out
    assert f"data: {a}: 200 rows" in out and "50.0% of each epoch's rows (weight 0.5)" in out
    summary = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())
    assert [s["rows"] for s in summary["data_sources"]] == [200, 50]
    start = json.loads((tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["format"] == "prompt_completion+alpaca"
