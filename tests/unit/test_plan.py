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


def test_an_elastic_range_keeps_the_global_batch_at_every_size_or_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, "distributed.workers=[1,3]", "train.batch_size=12", "train.micro_batch_size=2")
    d = cfg.distributed
    assert d.elastic and (d.min_workers, d.max_workers, list(d.sizes)) == (1, 3, [1, 2, 3])
    assert [accumulation_steps(cfg.train, n) * n * 2 for n in d.sizes] == [12, 12, 12]
    fixed = tiny_config(tmp_path, "distributed.workers=[2,2]")  # a range of one size is a fixed size
    assert not fixed.distributed.elastic and fixed.distributed.workers == 2
    with pytest.raises(UserError) as error:  # 16 rows do not split into micro-batches of 4 on 3 workers
        tiny_config(tmp_path, "distributed.workers=[2,4]", "train.batch_size=16", "train.micro_batch_size=4")
    message = str(error.value)
    assert "distributed.workers [2, 4]" in message and "at 3 worker(s)" in message
    assert "a multiple of 48 (e.g. 48)" in message  # the smallest batch every size splits
    for bad in ("[0,2]", "[3,2]", "[1,2,3]", "two"):
        with pytest.raises(UserError, match="distributed.workers"):
            tiny_config(tmp_path, f"distributed.workers={bad}")


def test_a_batch_is_the_same_rows_at_every_world_size_when_every_rank_holds_every_row():
    import numpy as np

    from ftdist.data.rows import rank_rows

    order = np.random.default_rng(0).permutation(60)
    for index in range(5):
        world = {n: sorted(sum((rank_rows(order, index, 12, r, n, shared=True) for r in range(n)), []))
                 for n in (1, 2, 3, 4)}
        assert world[1] == world[2] == world[3] == world[4] == sorted(order[index * 12:(index + 1) * 12].tolist())
    # Ray Data's shards: each rank's next rows of its own order.
    assert rank_rows(order, 1, 12, 1, 3, shared=False) == order[4:8].tolist()
