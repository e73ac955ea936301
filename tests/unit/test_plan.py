"""The batch plan and the DeepSpeed config built from it: the arithmetic every mode shares."""

import pytest

from ftdist.config.plan import accumulation_steps, make_plan
from ftdist.engines.deepspeed import deepspeed_config
from ftdist.errors import UserError
from tests.conftest import tiny_config


def test_a_global_batch_splits_into_ranks_and_micro_batches(tmp_path):
    cfg = tiny_config(tmp_path, "train.batch_size=32", "train.micro_batch_size=4", "train.max_steps=null",
                      "train.epochs=3")
    plan = make_plan(cfg, n_rows=100, world_size=2)
    assert (plan.batches_per_epoch, plan.total_steps, plan.accumulation_steps) == (3, 9, 4)
    assert [plan.position(s) for s in (1, 3, 4, 9)] == [(0, 0), (0, 2), (1, 0), (2, 2)]
    assert make_plan(tiny_config(tmp_path, "train.max_steps=5"), 100, 1).total_steps == 5  # max_steps wins
    assert "32 = 2 x 4 micro-batches of 4; 9 steps" in plan.describe(cfg)


def test_impossible_plans_are_user_errors_that_say_what_to_change(tmp_path):
    cfg = tiny_config(tmp_path, "train.batch_size=8", "train.micro_batch_size=4")
    with pytest.raises(UserError, match="not a multiple of train.micro_batch_size 4 x 3 workers"):
        make_plan(cfg, 100, world_size=3)
    with pytest.raises(UserError, match="gives 7 rows .* fewer than train.batch_size 8"):
        make_plan(cfg, 7, world_size=1)


def test_the_deepspeed_config_follows_the_plan_and_the_distributed_section(tmp_path):
    cfg = tiny_config(tmp_path, "train.batch_size=32", "train.micro_batch_size=2", "distributed.zero_stage=3",
                      "distributed.offload_optimizer=cpu", "distributed.offload_params=cpu",
                      "distributed.deepspeed={zero_optimization: {overlap_comm: true}, bf16: {enabled: false}}")
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["gradient_accumulation_steps"] == accumulation_steps(cfg.train, 4) == 4
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]) == (32, 2)
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                       "offload_param": {"device": "cpu"}, "overlap_comm": True}
    assert ds["bf16"] == {"enabled": False}  # the user's raw keys are merged last
