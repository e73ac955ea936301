"""The bad-input battery's fast cases (bench/bad_inputs.py, those marked suite=True: no store,
seconds each), each through the real `ftdist` command in its own process, as the battery runs
them: one `ftdist: error:` line naming the file, key or line and the fix, exit 2, no traceback
(or, where the run can go on, a finished run with its warning). The whole battery (store, Ray
and the slower cases too) is `bench/bad_inputs.py`, its latest output bench/results/bad_inputs.md."""

import pytest

from bench.bad_inputs import CASES, case_env, run_case

SUITE = [c for c in CASES if c.suite]


def test_the_suite_runs_cases_of_every_hostile_family():
    assert len(SUITE) >= 40 and {"links", "writers", "results", "bounds", "lies", "tracebacks"} <= {
        c.family for c in SUITE}, sorted({c.family for c in SUITE})


@pytest.mark.parametrize("case", SUITE, ids=[f"{c.family}: {c.name}" for c in SUITE])
def test_a_bad_input_ends_in_one_clear_message(case, tmp_path):
    result = run_case(case, tmp_path, case_env(tmp_path))
    assert result.passed, f"{result.why}\n{result.message}"
