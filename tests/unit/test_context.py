"""Contexts and checkpoint fetching, fast: what each mode hands the loop, and which files of a
checkpoint each rank downloads."""


import torch

from ftdist.engines.plain import PlainEngine
from ftdist.io.storage import RunStore
from ftdist.training.checkpoint import resume_point
from ftdist.training.context import LocalContext, RayContext
from ftdist.training.optim import build_optimizer
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


