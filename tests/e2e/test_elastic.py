"""Training on preemptible nodes, end to end: an elastic run through a preemption notice, a node
lost without one, a node added and a SIGTERM, against local mode's curve (tests/elastic_cases.py;
ZeRO-3 in tests/matrix/test_elastic_matrix.py)."""

import pytest

from tests.conftest import ONE_RAY_AT_A_TIME
from tests.elastic_cases import run_the_chain

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@ONE_RAY_AT_A_TIME
def test_an_elastic_run_keeps_every_step_through_a_notice_a_kill_a_new_node_and_sigterm(tmp_path, s3):
    run_the_chain(tmp_path, s3, stage=2)
