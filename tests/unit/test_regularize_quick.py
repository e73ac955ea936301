"""regularization: replay, L2-SP and EWC against forgetting, in local mode on the tiny base
pretrained on general text (conftest.pretrained_base), fine-tuned on digit reversal at a high
learning rate: it forgets much of that text, which each regularizer must lessen.

The replay text and the retention text are the two halves of the general text: what is
measured is never what is replayed. Under ZeRO (anchors on partitions, replay across ranks)
they are checked against local mode in tests/distributed_cases.py. Here: what needs no training."""

import pytest

from ftdist.data.rows import replay_share
from ftdist.errors import UserError
from tests.conftest import DEMO, tiny_config


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("texts")
    paragraphs = [p for p in (DEMO / "general.txt").read_text().split("\n\n") if p.strip()]
    half = len(paragraphs) // 2
    (tmp / "replay.txt").write_text("\n\n".join(paragraphs[:half]))
    (tmp / "retention.txt").write_text("\n\n".join(paragraphs[half:]))
    return {"replay": tmp / "replay.txt", "retention": tmp / "retention.txt"}


def test_replay_takes_its_fraction_of_the_rows_exactly_over_a_run():
    for batch, fraction in ((8, 0.25), (8, 0.1), (32, 0.3), (6, 0.5)):
        drawn = [len(replay_share(step, batch, fraction)) for step in range(1, 201)]
        share = sum(drawn) / (sum(drawn) + 200 * batch)
        assert abs(share - fraction) < 1 / 200, (batch, fraction, share)
        assert max(drawn) - min(drawn) <= 1  # spread evenly over the steps
    ranges = [replay_share(step, 8, 0.3) for step in range(1, 50)]
    assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:]))  # one stream, no row skipped or repeated


def test_bad_combinations_say_which_work(tmp_path, texts):
    with pytest.raises(UserError, match="regularization.ewc estimates its Fisher on data.retention"):
        tiny_config(tmp_path, "regularization.ewc.weight=1")
    with pytest.raises(UserError, match="use regularization.l2sp or regularization.ewc with task classification"):
        tiny_config(tmp_path, "task=classification", "data.format=classification",
                    f"regularization.replay.data={texts['replay']}")
    with pytest.raises(UserError, match="set the replay text as regularization.replay.data"):
        tiny_config(tmp_path, f"data.replay={texts['replay']}")
    with pytest.raises(UserError, match="regularization.replay.fraction"):
        tiny_config(tmp_path, f"regularization.replay.data={texts['replay']}", "regularization.replay.fraction=1")


def test_the_memory_estimate_counts_anchors_and_fisher_on_each_ranks_share(tmp_path, texts):
    from ftdist.launch.preflight import model_config_of
    from ftdist.sizing import memory

    def anchors(*extra, workers=1, stage=0):
        cfg = tiny_config(tmp_path, f"data.retention={texts['retention']}", f"distributed.zero_stage={stage}", *extra)
        return memory.estimate(cfg, model_config_of(cfg), workers, "deepspeed").anchors

    plain = memory.estimate(tiny_config(tmp_path), model_config_of(tiny_config(tmp_path)))
    assert plain.anchors == 0 and "anchors" not in plain.describe()
    assert anchors("regularization.l2sp=1") == plain.trainable_params * 4  # one fp32 anchor per trained weight
    assert anchors("regularization.ewc.weight=1") == plain.trainable_params * 8  # ... and its Fisher value
    assert anchors("regularization.ewc.weight=1", workers=2, stage=2) == plain.trainable_params * 4  # a half each
    assert anchors("regularization.l2sp=1", "distributed.offload_optimizer=cpu", workers=2, stage=2) == 0  # on host
