"""Runs written before the rooms refactor (commit fc3eedd, tests/fixtures/before-rooms, made by its
make_*.py) still work: a local run stopped at step 4 resumes to the very curve the same run made
uninterrupted, and the checkpoints Ray workers wrote (DeepSpeed ZeRO-2 adapters, ZeRO-3 full
weights, two ranks) export to the same tensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import DEMO, PREPARED_CACHE, run_cli

BEFORE = Path(__file__).resolve().parents[1] / "fixtures" / "before-rooms"
MADE_WITH_DEMO = "/work/main/data/demo"


def records(path: Path, key: str) -> dict[int, float]:
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return {r["step"]: r[key] for r in lines if key in r}


def test_a_local_run_stopped_before_the_change_resumes_to_the_same_curve(tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(BEFORE / "local-run", runs / "before")
    # Its snapshot names the demo data where the fixture was made (/work/main): here, in this checkout.
    snapshot = runs / "before" / "config.yaml"
    snapshot.write_text(snapshot.read_text().replace(MADE_WITH_DEMO, str(DEMO)))
    config = tmp_path / "before.yaml"
    config.write_text((BEFORE / "local.yaml").read_text().replace("RUNS", str(runs)).replace("DEMO", str(DEMO))
                      + f"storage:\n  cache_dir: {PREPARED_CACHE}\n")
    result = run_cli("train", str(config), "--local")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming from" in result.stdout and "step-4" in result.stdout
    resumed, whole = runs / "before" / "metrics.jsonl", BEFORE / "local-whole-metrics.jsonl"
    for key in ("loss", "eval_loss"):
        assert records(resumed, key) == pytest.approx(records(whole, key), rel=1e-6), key
    assert max(records(resumed, "loss")) == 6


@pytest.mark.parametrize("run", ["ds-lora-z2", "ds-full-z3"])
def test_a_deepspeed_checkpoint_written_before_the_change_exports_the_same_tensors(tmp_path, run):
    shutil.copytree(BEFORE / f"{run}-run", tmp_path / run)
    out = tmp_path / "export"
    result = run_cli("export", str(tmp_path / run / "checkpoints" / "step-2"), "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    name = "adapter_model.safetensors" if "lora" in run else "model.safetensors"
    new, old = load_file(out / name), load_file(BEFORE / f"{run}-export" / name)
    assert sorted(new) == sorted(old)
    for key in old:
        assert new[key].equal(old[key]), key
