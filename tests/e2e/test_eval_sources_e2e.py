"""data.eval and data.retention as lists of sources: each evaluated on its own
(eval_loss/<name>, retention_loss/<name>, forgetting/<name>) and all together, by tokens."""

import pytest

from ftdist.data.rows import IGNORE, build_dataset
from tests.unit.test_eval_sources import (
    curve,
    files,
    run,
    tokenizer_dir,  # noqa: F401 (a fixture)
)


def test_listed_sources_are_each_what_a_run_on_that_source_alone_reports(tmp_path, tokenizer_dir, capsys):
    """The oracle: runs with one eval file and one retention source each. Training is the same
    in all three (same data, seed and tokenizer), so each source's figures must be the lone
    run's, and the figures together the token-weighted mean of the sources'."""
    import shutil

    shutil.copytree(tokenizer_dir, tmp_path.parent / "tok", dirs_exist_ok=True)
    math, more, prose, rows = files(tmp_path)
    both, summary, cfg = run(tmp_path, "both", f"[{{path: {math}}}, {{path: {more}, name: extra}}]",
                             f"[{{path: {prose}}}, {{path: {rows}}}]")
    out = capsys.readouterr().out
    assert "step 2: eval loss" in out and "(math " in out and ", extra " in out and ", wiki +" in out
    alone = {"math": run(tmp_path, "math", str(math), str(prose))[0],
             "extra": run(tmp_path, "extra", str(more), str(rows))[0]}
    assert len(curve(both, "eval_loss/math")) == 3 and curve(both, "eval_loss/math") != curve(both, "eval_loss/extra")
    retention_of = {"math": "prose", "extra": "wiki"}
    for name, records in alone.items():
        assert curve(both, f"eval_loss/{name}") == pytest.approx(curve(records, "eval_loss"), rel=1e-5), name
        ret = retention_of[name]
        assert curve(both, f"retention_loss/{ret}") == pytest.approx(curve(records, "retention_loss"), rel=1e-5)
        assert curve(both, f"forgetting/{ret}") == pytest.approx(curve(records, "forgetting"), rel=1e-4, abs=1e-6)
        assert both[0][f"retention_loss_before/{ret}"] == pytest.approx(records[0]["retention_loss_before"], rel=1e-5)
    # Together: by target tokens.
    from transformers import AutoTokenizer

    data = build_dataset(cfg.data, AutoTokenizer.from_pretrained(tokenizer_dir), 0)
    tokens = [int((data.eval.take(data.eval.of_source(s)).flat["targets"] != IGNORE).sum()) for s in (0, 1)]
    for together, a, b in zip(curve(both, "eval_loss"), curve(both, "eval_loss/math"), curve(both, "eval_loss/extra")):
        assert together == pytest.approx((a * tokens[0] + b * tokens[1]) / sum(tokens), rel=1e-6)
    assert summary["eval_loss_by_source"] == {k: pytest.approx(curve(both, f"eval_loss/{k}")[-1])
                                              for k in ("math", "extra")}
    assert set(summary["retention_by_source"]) == {"prose", "wiki"}
    assert summary["retention_by_source"]["wiki"]["forgetting"] == pytest.approx(curve(both, "forgetting/wiki")[-1])
