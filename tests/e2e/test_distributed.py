"""Ray Train + DeepSpeed on 2 CPU workers against local mode, once per objective and kind of
weights: SFT with QLoRA (ZeRO-2, checkpointing every second block, every tracker; the adapters'
path with a 4-bit base), a classifier (full, top blocks: ZeRO-3, the head gathered), DPO with full
fine-tuning (ZeRO-3: the frozen reference partitioned) resumed by 1 worker. The other stages and cases run in `make test-all`
(tests/matrix/test_distributed_matrix.py); the cases and checks are in tests/distributed_cases.py."""

import pytest

from ftdist.launch.ray_train import train_ray
from ftdist.errors import UserError
from tests.conftest import ONE_RAY_AT_A_TIME, tiny_config
from tests.distributed_cases import (  # noqa: F401 (the shared tests, the fixture and the parametrization)
    check_only_rank_0_reports_to_the_trackers, check_preference_resume_at_another_world_size, pytest_generate_tests, runs,
    test_a_classifier_on_two_workers_matches_local_mode, test_preference_tuning_on_two_workers_matches_local_mode,
    test_two_workers_match_local_mode)

pytestmark = [pytest.mark.slow, pytest.mark.ray, ONE_RAY_AT_A_TIME]

LM_CASES = [("qlora", 2)]
CLASSIFIER_STAGES = (3,)
DPO_CASES = ("full-3",)


def test_only_rank_0_reports_to_the_trackers(runs, mlflow_server):
    check_only_rank_0_reports_to_the_trackers(runs, mlflow_server)


def test_a_preference_run_resumes_at_another_world_size(tmp_path, tmp_path_factory, pretrained_base, runs, ray_local):
    check_preference_resume_at_another_world_size(tmp_path, tmp_path_factory, pretrained_base, runs, ray_local)


def test_preflight_refuses_a_run_that_cannot_fit_before_any_worker(tmp_path, ray_local, capsys):
    huge = ["model.init.hidden_size=8192", "model.init.num_layers=48", "model.init.num_heads=64",
            "model.init.vocab_size=128000", "distributed.zero_stage=0"]
    cfg = tiny_config(tmp_path, *huge, name="huge")
    with pytest.raises(UserError) as refused:
        train_ray(cfg)
    message = str(refused.value)
    assert "per cpu device" in message and "weights" in message and "optimizer" in message
    assert "distributed.zero_stage" in message
    assert "use method: qlora" in message
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_placement_the_cluster_cannot_meet_is_refused(tmp_path, ray_local):
    cfg = tiny_config(tmp_path, "distributed.placement=STRICT_SPREAD", name="spread")
    with pytest.raises(UserError, match="STRICT_SPREAD .* 1 nodes"):
        train_ray(cfg)
    cfg = tiny_config(tmp_path, "distributed.workers=5", name="many")
    with pytest.raises(UserError, match="need 5 CPU but the Ray cluster has 4"):
        train_ray(cfg)
