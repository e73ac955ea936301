"""bench/gpu.py, the one-call GPU benchmark, at toy shapes on CPU: every row of both cases runs
(ftdist local and in a 1-worker Ray Train + DeepSpeed group, the plain PyTorch loops, the HF
QLoRA loop) and the results are written, so the script works when a GPU is there to run it."""

import importlib.util
import json
import sys

import pytest

from tests.conftest import ONE_RAY_AT_A_TIME, REPO

pytestmark = [pytest.mark.slow, pytest.mark.ray, ONE_RAY_AT_A_TIME]


def test_the_gpu_benchmark_runs_every_row_at_toy_size(tmp_path, ray_local):
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "bench" / "gpu.py")
    gpu = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = gpu  # its dataclasses look their module up
    spec.loader.exec_module(gpu)
    address = ray_local.get_runtime_context().gcs_address
    assert gpu.main(["--tiny", "--out", str(tmp_path), "--address", address]) == 0
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert [(r["case"], r["row"]) for r in result["rows"]] == [
        ("A", "ftdist local"), ("A", "ftdist, 1 Ray Train worker, DeepSpeed ZeRO-2"), ("A", "plain PyTorch"),
        ("A", "plain PyTorch + torch.compile"), ("B", "ftdist local"), ("B", "transformers + PEFT + bitsandbytes")]
    for row in result["rows"]:
        assert row["tokens_per_s"] > 0 and row["peak_gib"] >= 0 and len(row["step_s"]) == 3, row
        assert row["mfu"] is None  # no GPU peak to divide by on a CPU
    assert set(result["ratios"]) == set(result["met"]) == set(gpu.GOALS)
    assert result["ratios"]["full_vs_compiled_torch"] > 0 and result["ratios"]["qlora_vs_hf_tokens"] > 0
    assert "| B | transformers + PEFT + bitsandbytes |" in (tmp_path / "gpu.md").read_text()
