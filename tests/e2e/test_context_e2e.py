"""Contexts and checkpoint fetching, fast: what each mode hands the loop, and which files of a
checkpoint each rank downloads."""

import json

import pytest

from ftdist.io.checkpoints import step_dir
from ftdist.io.storage import RunStore
from ftdist.training.checkpoint import fetch_checkpoint
from tests.conftest import tiny_config
from tests.unit.test_context import SAVED_BY_TWO


@pytest.mark.s3
@pytest.mark.parametrize("rank, world_size, expected", [
    (1, 2, {"state.json", "rng-1.pt", "metrics.jsonl", "deepspeed/mp_rank_00_model_states.pt",
            "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"}),
    (0, 1, set(SAVED_BY_TWO)),  # another world size: DeepSpeed's conversion reads every rank's files
])
def test_each_rank_fetches_its_own_partition_or_all_of_them(tmp_path, s3, rank, world_size, expected):
    cfg = tiny_config(tmp_path, *s3.overrides())
    rel = step_dir(4)
    for name in SAVED_BY_TWO:
        s3.fs.pipe_file(s3.url("runs", "t", rel, name), b"x")
    s3.fs.pipe_file(s3.url("runs", "t", rel, "COMPLETE"), json.dumps({"world_size": 2}).encode())
    store = RunStore(s3.url("runs", "t"), tmp_path / "cache", cfg.storage, rank)
    local = fetch_checkpoint(store, 4, rank, world_size)
    assert {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()} == expected | {"COMPLETE"}
