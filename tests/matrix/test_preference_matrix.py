"""`make test-all`: DPO from a full fine-tune's final/ (every weight trained by SFT), as
tests/e2e/test_preference_e2e.py checks it from LoRA's."""

from tests.e2e.test_preference_e2e import starts_from_an_sft_runs_final


def test_a_dpo_run_starts_from_a_full_sft_runs_final_and_resumes_and_exports_as_sft_does(tmp_path, pretrained_base):
    starts_from_an_sft_runs_final(tmp_path, pretrained_base, "full")
