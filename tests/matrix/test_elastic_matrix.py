"""`make test-all`: the elastic chain of tests/e2e/test_elastic.py under ZeRO-3 (each rank's
partition of every weight and optimizer state reshaped at each resize)."""

import pytest

from tests.conftest import ONE_RAY_AT_A_TIME
from tests.elastic_cases import run_the_chain

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@ONE_RAY_AT_A_TIME
def test_an_elastic_zero3_run_keeps_every_step_through_a_notice_a_kill_a_new_node_and_sigterm(tmp_path, s3):
    run_the_chain(tmp_path, s3, stage=3)
