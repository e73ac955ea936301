"""objective grpo on 2 Ray workers beyond the end-to-end tier's ZeRO-3 full run: LoRA under
ZeRO-2 (the reference is the policy with its adapters switched off), against local mode's curve."""

import pytest

from tests.conftest import ONE_RAY_AT_A_TIME
from tests.e2e.test_grpo_e2e import check_two_workers_match_local_mode

pytestmark = [pytest.mark.slow, pytest.mark.ray, ONE_RAY_AT_A_TIME]


def test_two_zero2_lora_workers_sample_and_train_as_local_mode(tmp_path, ray_local):
    check_two_workers_match_local_mode(tmp_path, ray_local, "method=lora", "train.lr=1e-2",
                                       "distributed.zero_stage=2")
