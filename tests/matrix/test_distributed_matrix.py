"""`make test-all`: the rest of the ZeRO stage x method x objective matrix against local mode
(tests/e2e/test_distributed.py runs one case per method and objective), and both elastic
chains: drivers SIGKILLed and resumed from the store with another number of workers."""

import pytest

from tests.conftest import ONE_RAY_AT_A_TIME
from tests.distributed_cases import (
    check_classifier_case,
    check_killed_drivers_resume_from_s3_at_another_world_size,
    check_lm_case,
    check_preference_case,
    start_cases,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray, ONE_RAY_AT_A_TIME]

LM_CASES = [("full", 0), ("lora", 3)]
CLASSIFIER_STAGES = (2,)
DPO_CASES = ("lora-2", "full-2-precomputed", "qlora-0")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_local, pretrained_base, mlflow_server) -> dict:
    return start_cases(tmp_path_factory, ray_local, pretrained_base, mlflow_server, LM_CASES, CLASSIFIER_STAGES,
                       DPO_CASES)


@pytest.mark.parametrize("method, stage", LM_CASES)
def test_two_workers_match_local_mode(tmp_path_factory, pretrained_base, runs, method, stage):
    check_lm_case(tmp_path_factory, pretrained_base, runs, method, stage)


@pytest.mark.parametrize("stage", CLASSIFIER_STAGES)
def test_a_classifier_on_two_workers_matches_local_mode(tmp_path, pretrained_base, runs, stage):
    check_classifier_case(tmp_path, pretrained_base, runs, stage)


@pytest.mark.parametrize("case", DPO_CASES)
def test_preference_tuning_on_two_workers_matches_local_mode(tmp_path_factory, pretrained_base, runs, case):
    check_preference_case(tmp_path_factory, pretrained_base, runs, case)


def test_killed_drivers_resume_from_s3_at_another_world_size(tmp_path, tmp_path_factory, ray_local, s3):
    check_killed_drivers_resume_from_s3_at_another_world_size(tmp_path, tmp_path_factory, ray_local, s3)
