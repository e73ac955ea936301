"""The activation estimate's trace on an empty (meta) model counts what a real forward pass
on the CPU keeps for the backward, block by block."""

import pytest
import torch

from ftdist.sizing.activations import saved_bytes
from ftdist.sizing.memory import run_shell
from ftdist.model.source import build_initial_model, init_model_config
from ftdist.model.build import build_model
from tests.conftest import tiny_config


@pytest.mark.parametrize("method, attention", [("full", "sdpa"), ("lora", "sdpa"), ("full", "eager")])
def test_the_meta_trace_counts_what_a_cpu_forward_keeps(tmp_path, method, attention):
    # lora.dropout 0.1: each adapter keeps its dropped input and mask, which the trace must see.
    cfg = tiny_config(tmp_path, f"method={method}", "lora.dropout=0.1", "freeze_layers=1",
                      "model.init.num_kv_heads=2", f"model.attention={attention}")
    build_initial_model(cfg, tmp_path / "base")
    real = build_model(cfg, str(tmp_path / "base"), torch.device("cpu")).model
    meta = run_shell(cfg, init_model_config(cfg.model.init))
    measured, traced = saved_bytes(real, 2, 48), saved_bytes(meta, 2, 48, attention)
    assert traced.blocks == pytest.approx(measured.blocks, rel=1e-6)
    assert traced.outside == pytest.approx(measured.outside, rel=1e-6)
    # The frozen first block, with nothing trainable below it, keeps nothing for the backward.
    assert len(traced.blocks) == 4 and traced.blocks[0] == 0 and all(b > 0 for b in traced.blocks[1:])
