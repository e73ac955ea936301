"""`make test-all`: the real model (SmolLM2-135M-Instruct, tests/e2e/test_real_model.py) on 2 Ray
workers: QLoRA under ZeRO-2 against local mode on real weights."""

from __future__ import annotations

import json

import pytest

from ftdist.io.metrics_log import read_metrics
from ftdist.launch.local import train_local
from tests.conftest import ONE_RAY_AT_A_TIME, foreign_lines, run_cli, write_config
from tests.distributed_cases import REL_TOL, curve
from tests.e2e.test_real_model import eight_rows, real_config, smollm2  # noqa: F401 (the session fixture)

pytestmark = [pytest.mark.slow]


@ONE_RAY_AT_A_TIME
@pytest.mark.ray
def test_qlora_on_two_ray_workers_matches_local_mode_on_the_real_model(tmp_path, smollm2, ray_local):
    """QLoRA (NF4, the 4-bit base on every worker) under ZeRO-2 on 2 Ray workers: local mode's
    per-step losses and eval loss, on a global batch of all 8 rows (so that both modes see the
    same rows at every step), and adapters that load on the 4-bit base and answer."""
    overrides = ("method=qlora", *eight_rows(tmp_path), "distributed.zero_stage=2")
    local = train_local(real_config(tmp_path, smollm2, *overrides, "run.name=local"), show_progress=False)
    cfg = real_config(tmp_path, smollm2, *overrides, "run.name=ray", "distributed.workers=2",
                      "distributed.max_failures=0")
    result = run_cli("train", str(write_config(tmp_path, cfg)), "--address",
                     ray_local.get_runtime_context().gcs_address, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not foreign_lines(result.stdout, result.stderr), result.stdout + result.stderr
    ray_run, local_run = tmp_path / "runs" / "ray", tmp_path / "runs" / "local"
    assert read_metrics(ray_run / "metrics.jsonl")[0]["world_size"] == 2
    for key in ("loss", "eval_loss"):
        ours, theirs = curve(ray_run, key), curve(local_run, key)
        assert len(ours) == len(theirs) >= 2 and ours == pytest.approx(theirs, rel=REL_TOL), key
    assert local["eval_loss"] < curve(local_run, "eval_loss")[0]
    meta = json.loads((ray_run / "final" / "ftdist.json").read_text())
    assert meta["method"] == "qlora"
    result = run_cli("generate", str(ray_run / "final"), "--chat", "--prompt", "Capital card: France",
                     "--max-new-tokens", "16")
    assert result.returncode == 0 and result.stdout.startswith("Capital card: France -> "), result.stderr
