"""The engines' contract, fast and without Ray: one step accumulates, clips and updates; a
checkpoint round trip restores everything; layouts decide how a checkpoint loads."""

import copy

import pytest
import torch

from ftdist.engines.base import Layout, refuse_other_engine
from ftdist.engines.deepspeed import DeepSpeedEngine, needs_universal, skip_inference_comm_op
from ftdist.engines.plain import PlainEngine
from ftdist.errors import UserError
from ftdist.training.optim import build_optimizer
from tests.conftest import tiny_config


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


BATCHES = [torch.randn(4, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def squared(forward, batch) -> torch.Tensor:
    return forward(batch).pow(2).sum() * 4  # large enough that clipping at 0.5 acts


def engine_for(tmp_path, model, steps: int = 10, clip: float = 0.5):  # noqa: D103
    cfg = tiny_config(tmp_path, f"train.grad_clip={clip}", "train.warmup_steps=2", "train.lr=0.1")
    optimizer, scheduler = build_optimizer(cfg, model, steps)
    return PlainEngine(model, optimizer, scheduler, cfg.train.grad_clip)


def test_a_step_accumulates_every_micro_batch_clips_and_updates(tmp_path):
    model, reference = Tiny(), Tiny()
    engine = engine_for(tmp_path, model)
    norm = engine.step(BATCHES, squared)
    # By hand: the same gradients summed over the micro-batches, clipped to 0.5, one AdamW step.
    ref_engine = engine_for(tmp_path, reference)
    sum(squared(reference, b) for b in BATCHES).backward()
    expected = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5))
    ref_engine.optimizer.step()
    assert norm == pytest.approx(expected) and norm > 0.5  # clipped: the raw norm is reported
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs)
        assert ours.grad is None  # gradients cleared for the next step
    assert engine.lr == pytest.approx(0.05)  # the schedule moved on: half way through a 2-step warm-up
    assert engine.layout == Layout("plain", 1, None)


def test_save_and_load_restore_weights_optimizer_and_schedule(tmp_path):
    engine = engine_for(tmp_path, Tiny())
    engine.step(BATCHES, squared)
    (tmp_path / "ckpt").mkdir()
    write = engine.save(tmp_path / "ckpt", is_main=True)
    snapshot = copy.deepcopy(engine.model.state_dict())
    engine.step(BATCHES, squared)  # training goes on while the staged copy is written
    write()
    continued = [p.detach().clone() for p in engine.model.parameters()]

    restored = engine_for(tmp_path, Tiny())
    restored.load(tmp_path / "ckpt", {"engine": "plain"})
    assert all(torch.equal(restored.model.state_dict()[k], v) for k, v in snapshot.items())
    restored.step(BATCHES, squared)
    assert all(torch.equal(a, b) for a, b in zip(restored.model.parameters(), continued))
    assert restored.lr == engine.lr
    assert engine.save(tmp_path / "other", is_main=False) is None  # only rank 0 writes local-mode files


def test_checkpoints_of_the_other_mode_are_refused_with_what_to_do(tmp_path):
    with pytest.raises(UserError, match="written by the deepspeed engine, this run's is plain .*; resume it with "
                                        "distributed.engine: deepspeed"):
        refuse_other_engine(tmp_path, {"engine": "deepspeed"}, "plain")
    with pytest.raises(UserError, match="written by the plain engine, this run's is deepspeed .*; resume it with "
                                        "distributed.engine: plain"):
        refuse_other_engine(tmp_path, {"engine": "plain"}, "deepspeed")
    refuse_other_engine(tmp_path, {}, "plain")  # checkpoints before engines were named: local mode's


@pytest.mark.parametrize("saved, current, universal", [
    (("plain", 1, None), ("deepspeed", 2, 2), False),
    (("deepspeed", 2, 2), ("deepspeed", 2, 2), False),
    (("deepspeed", 2, 2), ("deepspeed", 1, 2), True),  # another world size re-partitions
    (("deepspeed", 2, 1), ("deepspeed", 2, 2), True),  # ZeRO 1 <-> 2
    (("deepspeed", 1, 0), ("deepspeed", 4, 0), False),  # stage 0 partitions nothing
    (("deepspeed", 1, 3), ("deepspeed", 2, 3), True),
])
def test_which_checkpoints_need_the_universal_conversion(saved, current, universal):
    assert needs_universal(Layout(*saved), Layout(*current)) is universal


def test_a_checkpoint_of_another_zero_family_is_refused():
    with pytest.raises(UserError, match="saved with distributed.zero_stage 2; resume it with ZeRO stages 1-2"):
        needs_universal(Layout("deepspeed", 2, 2), Layout("deepspeed", 2, 3), step=40)
    assert Layout.of_checkpoint({"engine": "deepspeed", "world_size": 2, "zero_stage": 3, "step": 4}) == \
        Layout("deepspeed", 2, 3)


def test_deepspeed_files_are_known_by_rank():
    assert DeepSpeedEngine.file_rank("zero_pp_rank_3_mp_rank_00_optim_states.pt") == 3
    assert DeepSpeedEngine.file_rank("mp_rank_00_model_states.pt") is None


def test_deepspeed_never_compiles_its_inference_all_reduce_op():
    # A fresh node would otherwise spend most of a minute compiling C++ at the first ZeRO engine.
    from deepspeed.comm.torch import build_shm_op

    skip_inference_comm_op()
    assert build_shm_op() is None
