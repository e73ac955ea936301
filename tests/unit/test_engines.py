"""Engines as a room, fast and without Ray: the registry and the choice by distributed.engine
(in either mode; refused with the fix where a setting would do nothing), both engines against the Engine protocol, the
plain engine's share of master weights for regularizers, each engine's memory terms, and the
plain engine data-parallel over two real gloo processes."""

import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from ftdist.engines import registry as engines
from ftdist.engines.base import Engine, Layout, MasterShare, Sharding
from ftdist.engines.deepspeed import DeepSpeedEngine
from ftdist.engines.plain import PlainEngine
from ftdist.errors import UserError
from ftdist.training.optim import build_optimizer
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def test_the_registry_names_each_engine_and_stays_torch_free():
    assert engines.CHOICES == ("auto", "plain", "deepspeed")
    assert engines.engine_class("plain") is PlainEngine and engines.engine_class("deepspeed") is DeepSpeedEngine
    for name in engines.ENGINES:
        assert engines.engine_class(name).name == name
    # Naming and resolving engines (what config validation does) imports no heavy library.
    probe = ("import sys, ftdist.engines.registry as e; e.resolve('auto', local=True); e.resolve('deepspeed', local=True); "
             "print(sorted(m for m in ('torch', 'deepspeed', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT)}, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("choice, local, chosen", [
    ("auto", True, "plain"), ("auto", False, "deepspeed"),  # today's behaviour
    ("plain", True, "plain"), ("plain", False, "plain"),  # the plain engine data-parallel on Ray workers
    ("deepspeed", False, "deepspeed"), ("deepspeed", True, "deepspeed"),  # DeepSpeed in a world of one process
])
def test_the_engine_is_chosen_by_config_and_mode(choice, local, chosen):
    assert engines.resolve(choice, local) == chosen


def test_config_refuses_an_unknown_engine_and_deepspeed_settings_the_plain_engine_ignores(tmp_path):
    with pytest.raises(UserError, match="distributed.engine 'fsdp' is not one of auto, plain, deepspeed"):
        tiny_config(tmp_path, "distributed.engine=fsdp")
    with pytest.raises(UserError, match="distributed.engine 'fsdp' is not one of auto, plain, deepspeed"):
        engines.resolve("fsdp", local=False)
    assert tiny_config(tmp_path, "distributed.engine=deepspeed", "distributed.workers=0").distributed.engine == \
        "deepspeed"
    with pytest.raises(UserError, match="distributed.engine plain .* offload_optimizer: cpu would do nothing; "
                                        "remove it, or set distributed.engine: deepspeed"):
        tiny_config(tmp_path, "distributed.engine=plain", "distributed.offload_optimizer=cpu")
    with pytest.raises(UserError, match="deepspeed \\(raw keys\\) would do nothing"):
        tiny_config(tmp_path, "distributed.engine=plain", "distributed.deepspeed.steps_per_print=5")
    # Existing configs are unchanged: auto, with every DeepSpeed key, and qlora at ZeRO-3 only under DeepSpeed.
    assert tiny_config(tmp_path).distributed.engine == "auto"
    tiny_config(tmp_path, "distributed.offload_optimizer=cpu", "distributed.deepspeed.steps_per_print=5")
    tiny_config(tmp_path, "method=qlora", "distributed.engine=plain", "distributed.zero_stage=3")
    with pytest.raises(UserError, match="qlora with distributed.zero_stage 3"):
        tiny_config(tmp_path, "method=qlora", "distributed.zero_stage=3")


def protocol_members() -> set[str]:
    return set(typing._get_protocol_attrs(Engine))  # what isinstance() checks of a runtime Protocol


def test_both_engines_satisfy_the_protocol(tmp_path):
    cfg = tiny_config(tmp_path)
    model = torch.nn.Linear(3, 2)
    plain = PlainEngine.build(cfg, model, *build_optimizer(cfg, model, 4), world_size=1, resume=None)
    assert isinstance(plain, Engine)
    # DeepSpeed's instance needs a process group; its class holds every member the protocol
    # names, the instance attributes (set in __init__) aside.
    instance_only = {"model", "forward", "layout"}
    missing = {m for m in protocol_members() - instance_only if not hasattr(DeepSpeedEngine, m)}
    assert not missing
    for cls in (PlainEngine, DeepSpeedEngine):
        assert cls.WEIGHT_FILES and cls.file_rank("rng-0.safetensors") is None and \
            cls.adapter_folder(tmp_path) is None and not cls.holds_weights(tmp_path)


def test_the_plain_engines_share_of_master_weights_is_the_whole_weight_counted_once(tmp_path):
    cfg = tiny_config(tmp_path)
    model = torch.nn.Linear(3, 2)
    engine = PlainEngine.build(cfg, model, *build_optimizer(cfg, model, 4), world_size=1, resume=None)
    params = list(model.named_parameters())
    for rank in (0, 1):
        shares = engine.master_shares(params, rank)
        assert [s.name for s in shares] == ["weight", "bias"] and all(isinstance(s, MasterShare) for s in shares)
        assert [s.counted for s in shares] == [rank == 0] * 2  # every rank holds it: summed on rank 0 only
    weight = engine.master_shares(params, 0)[0]
    torch.testing.assert_close(weight.read(), model.weight.detach().flatten())
    fisher = torch.arange(6.0).view(2, 3)
    torch.testing.assert_close(weight.cut(fisher), fisher.flatten())
    weight.write(torch.full((6,), 0.5))
    assert torch.equal(model.weight.detach(), torch.full((2, 3), 0.5))


def test_each_engine_says_how_its_memory_divides_over_workers(tmp_path):
    cfg = tiny_config(tmp_path, "distributed.offload_optimizer=cpu", "distributed.zero_stage=2")
    assert PlainEngine.sharding(cfg, 4) == Sharding()
    assert DeepSpeedEngine.sharding(cfg, 4) == Sharding(optimizer=True, gradients=True, optimizer_on_host=True)
    assert DeepSpeedEngine.sharding(cfg, 4, stage=3) == Sharding(True, True, True, True, False)
    assert DeepSpeedEngine.sharding(tiny_config(tmp_path, "distributed.zero_stage=0"), 4) == Sharding()

    from ftdist.launch.preflight import model_config_of
    from ftdist.sizing import memory

    stage3 = tiny_config(tmp_path, "distributed.zero_stage=3")
    model_config = model_config_of(stage3)
    one = memory.estimate(stage3, model_config, 1, "plain")
    plain = memory.estimate(stage3, model_config, 4, "plain")  # every state whole on each of 4 workers
    zero3 = memory.estimate(stage3, model_config, 4, "deepspeed")
    assert (plain.weights, plain.gradients, plain.optimizer) == (one.weights, one.gradients, one.optimizer)
    assert (zero3.weights, zero3.gradients, zero3.optimizer) == (one.weights / 4, one.gradients / 4, one.optimizer / 4)
    # Advice follows the engine: raising the ZeRO stage is DeepSpeed's, the plain engine points to it.
    zero0 = tiny_config(tmp_path, "distributed.zero_stage=0")
    est = memory.estimate(zero0, model_config, 4, "deepspeed")
    limit = est.device_total - est.optimizer / 2
    assert "raise distributed.zero_stage to 1" in memory.advice(zero0, model_config, est, 4, torch.float32, limit,
                                                                "deepspeed")
    plain_tips = memory.advice(tiny_config(tmp_path, "distributed.engine=plain"), model_config, est, 4, torch.float32,
                               limit, "plain")
    assert not any("raise distributed.zero_stage" in tip for tip in plain_tips)
    assert "use more distributed.workers with distributed.zero_stage 3 and distributed.engine: deepspeed" in plain_tips


def test_checkpoint_files_and_weights_are_found_through_the_engine_that_wrote_them(tmp_path):
    assert engines.file_rank("zero_pp_rank_1_mp_rank_00_optim_states.pt") == 1
    assert engines.file_rank("model.safetensors") is None
    with pytest.raises(UserError, match="no weights in this checkpoint \\(no model.safetensors, adapter/ or "
                                        "deepspeed/\\)"):
        engines.weights_of(tmp_path, adapters_only=False)
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    assert PlainEngine.holds_weights(tmp_path) and not DeepSpeedEngine.holds_weights(tmp_path)
    assert torch.equal(engines.weights_of(tmp_path, adapters_only=False)["w"], torch.ones(2))


# ---------------------------------------------------------------- data-parallel over two processes


def data_parallel_rank(rank: int, world_size: int, store_path: str, out: str) -> None:
    """One rank of a plain engine on two gloo processes: its own half of each batch (the loss
    normalised for the whole batch and multiplied by world_size, as the loop does; large enough
    that clipping at 0.5 acts)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(store_path, world_size), rank=rank, world_size=world_size)
    try:
        torch.manual_seed(rank)  # different starting weights: the engine broadcasts rank 0's
        model, engine = tiny_engine(world_size)
        norms = []
        for batch in BATCHES:
            half = batch.chunk(world_size)[rank]
            norms.append(engine.step([half], lambda forward, b: forward(b).pow(2).sum() * 4 * world_size / len(batch)))
        torch.save({"norms": norms, "weights": [p.detach() for p in model.parameters()]}, f"{out}-{rank}.pt")
    finally:
        dist.destroy_process_group()


BATCHES = [torch.randn(8, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def tiny_engine(world_size: int):
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, PlainEngine(model, optimizer, scheduler, grad_clip=0.5, world_size=world_size)


def test_the_plain_engine_on_two_processes_takes_one_process_steps(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(data_parallel_rank, args=(2, str(tmp_path / "pg"), str(tmp_path / "rank")), nprocs=2, join=True)
    torch.manual_seed(0)
    model, engine = tiny_engine(1)
    assert engine.layout == Layout("plain", 1, None)
    norms = [engine.step([batch], lambda forward, b: forward(b).pow(2).sum() * 4 / len(b)) for batch in BATCHES]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank-{rank}.pt")
        assert got["norms"] == pytest.approx(norms, rel=1e-5) and norms[0] > 0.5  # the whole batch's norm, clipped
        for ours, theirs in zip(got["weights"], model.parameters()):
            torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=1e-6)


def test_local_mode_opens_a_world_of_one_for_an_engine_that_needs_one_and_closes_it(tmp_path, monkeypatch):
    import torch.distributed as dist

    from ftdist.io.storage import RunStore
    from ftdist.training.context import LocalContext

    monkeypatch.setenv("LOCAL_RANK", "7")  # what was there before comes back
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = LocalContext(store=RunStore(str(tmp_path), tmp_path, tiny_config(tmp_path).storage), device=torch.device("cpu"))
    assert not PlainEngine.needs_process_group and DeepSpeedEngine.needs_process_group
    ctx.open_world()
    try:
        assert dist.is_initialized() and (dist.get_rank(), dist.get_world_size()) == (0, 1)
        assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("0", "0", "1")
        ctx.open_world()  # one already open: kept
    finally:
        ctx.close()
    assert not dist.is_initialized() and os.environ["LOCAL_RANK"] == "7" and "WORLD_SIZE" not in os.environ
