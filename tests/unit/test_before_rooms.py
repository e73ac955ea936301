"""Runs written before the rooms refactor (at commit fc3eedd, by tests/fixtures/make_before_rooms_*.py,
kept as tests/fixtures/before-rooms.tar.gz) still work: a local run stopped at step 4 resumes to the very curve the same run made
uninterrupted, and the checkpoints Ray workers wrote (DeepSpeed ZeRO-2 adapters, ZeRO-3 full
weights, two ranks) export to the same tensors."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import DEMO, PREPARED_CACHE, run_cli

ARCHIVE = Path(__file__).resolve().parents[1] / "fixtures" / "before-rooms.tar.gz"


@pytest.fixture(scope="module")
def before(tmp_path_factory) -> Path:
    """The runs as they were written (an archive: DeepSpeed's own scripts in its checkpoints are
    files the checkpoint's manifest lists, not code of this repository)."""
    where = tmp_path_factory.mktemp("before")
    with tarfile.open(ARCHIVE) as archive:
        archive.extractall(where, filter="data")
    return where / "before-rooms"


def records(path: Path, key: str) -> dict[int, float]:
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return {r["step"]: r[key] for r in lines if key in r}


def test_a_local_run_stopped_before_the_change_resumes_to_the_same_curve(tmp_path, before):
    runs = tmp_path / "runs"
    shutil.copytree(before / "local-run", runs / "before")
    snapshot = runs / "before" / "config.yaml"  # the data where this clone has it (made in /work/main)
    snapshot.write_text(snapshot.read_text().replace("/work/main/data/demo", str(DEMO)))
    config = tmp_path / "before.yaml"
    config.write_text((before / "local.yaml").read_text().replace("RUNS", str(runs)).replace("DEMO", str(DEMO))
                      + f"storage:\n  cache_dir: {PREPARED_CACHE}\n")
    result = run_cli("train", str(config), "--local")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming from" in result.stdout and "step-4" in result.stdout
    resumed, whole = runs / "before" / "metrics.jsonl", before / "local-whole-metrics.jsonl"
    for key in ("loss", "eval_loss"):
        assert records(resumed, key) == pytest.approx(records(whole, key), rel=1e-6), key
    assert max(records(resumed, "loss")) == 6


@pytest.mark.parametrize("run", ["ds-lora-z2", "ds-full-z3"])
def test_a_deepspeed_checkpoint_written_before_the_change_exports_the_same_tensors(tmp_path, before, run):
    shutil.copytree(before / f"{run}-run", tmp_path / run)
    out = tmp_path / "export"
    result = run_cli("export", str(tmp_path / run / "checkpoints" / "step-2"), "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    name = "adapter_model.safetensors" if "lora" in run else "model.safetensors"
    new, old = load_file(out / name), load_file(before / f"{run}-export" / name)
    assert sorted(new) == sorted(old)
    for key in old:
        assert new[key].equal(old[key]), key
