"""SIGTERM asks for a stop at the next step boundary (the loop's side: tests/e2e/test_cli_e2e.py
locally, tests/e2e/test_ray_cluster.py through a Ray driver)."""

import os
import signal
import threading

import pytest

from ftdist.training.notice import EXIT_STOPPED, StopNotice, stop_on_sigterm


def test_sigterm_is_noted_then_a_second_one_stops_at_once_and_the_old_handler_returns():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_sigterm(StopNotice()) as notice:
        assert notice.reason is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert notice.reason == "SIGTERM"  # noted; the process goes on to the step boundary
        with pytest.raises(SystemExit) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
        assert stopped.value.code == EXIT_STOPPED == 143
    assert signal.getsignal(signal.SIGTERM) is before


def test_outside_the_main_thread_nothing_is_installed():
    seen = {}

    def in_thread():
        with stop_on_sigterm(StopNotice()) as notice:
            seen["handler"], seen["reason"] = signal.getsignal(signal.SIGTERM), notice.reason

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(timeout=10)
    assert seen == {"handler": before, "reason": None}


def test_the_first_reason_stays():
    notice = StopNotice()
    notice.request("SIGTERM")
    notice.request("preemption")
    assert notice.reason == "SIGTERM"
