"""`make test-all`: the rest of the ZeRO stage x method x objective matrix against local mode
(tests/e2e/test_distributed.py runs one case per method and objective), and both elastic
chains: drivers SIGKILLed and resumed from the store with another number of workers."""

import pytest

from tests.conftest import ONE_RAY_AT_A_TIME
from tests.distributed_cases import (  # noqa: F401 (the shared tests, the fixture and the parametrization)
    check_killed_drivers_resume_from_s3_at_another_world_size,
    pytest_generate_tests,
    runs,
    test_a_classifier_on_two_workers_matches_local_mode,
    test_preference_tuning_on_two_workers_matches_local_mode,
    test_two_workers_match_local_mode,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray, ONE_RAY_AT_A_TIME]

LM_CASES = [("full", 0), ("lora", 1), ("lora", 3)]
CLASSIFIER_STAGES = (2,)
DPO_CASES = ("full-3", "lora-2", "full-2-precomputed", "qlora-0")


def test_killed_drivers_resume_from_s3_at_another_world_size(tmp_path, tmp_path_factory, ray_local, s3):
    check_killed_drivers_resume_from_s3_at_another_world_size(tmp_path, tmp_path_factory, ray_local, s3)
