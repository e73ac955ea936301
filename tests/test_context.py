"""Contexts and checkpoint fetching, fast: what each mode hands the loop, and which files of a
checkpoint each rank downloads."""

import json

import pytest
import torch

from ftdist.checkpoint import fetch_checkpoint, resume_point, step_dir
from ftdist.context import LocalContext, RayContext
from ftdist.engine import PlainEngine
from ftdist.optim import build_optimizer
from ftdist.storage import RunStore
from tests.conftest import tiny_config


def test_local_context_is_one_rank_with_the_plain_engine(tmp_path):
    cfg = tiny_config(tmp_path)
    store = RunStore(str(tmp_path / "run"), tmp_path / "run", cfg.storage)
    ctx = LocalContext(store=store, device=torch.device("cpu"))
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.run_dir) == (0, 1, True, tmp_path / "run")
    assert ctx.all_reduce_sum(7) == 7 and ctx.topology() == {"world_size": 1, "nodes": 1}
    model = torch.nn.Linear(2, 2)
    engine = ctx.make_engine(cfg, model, *build_optimizer(cfg, model, 10))
    assert isinstance(engine, PlainEngine)
    assert resume_point(ctx) is None  # no checkpoint yet


def test_ray_context_sums_over_the_process_group_exactly(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "pg"), 1), rank=0, world_size=1)
    try:
        ctx = RayContext(store=RunStore(str(tmp_path), tmp_path, tiny_config(tmp_path).storage),
                         device=torch.device("cpu"))
        total = ctx.all_reduce_sum(2**53 - 1)  # float64 on the wire: token counts stay exact
        assert total == 2**53 - 1 and isinstance(total, int)
        assert ctx.all_reduce_sum(0.25) == 0.25
    finally:
        dist.destroy_process_group()


SAVED_BY_TWO = ["state.json", "rng-0.pt", "rng-1.pt", "metrics.jsonl", "deepspeed/mp_rank_00_model_states.pt",
                "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"]


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
