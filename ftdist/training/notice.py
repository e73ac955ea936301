"""A stop on notice. SIGTERM is what Kubernetes, systemd, batch schedulers and spot reclaimers
send before they kill: a run that gets it stops at the next step boundary with a checkpoint,
so the same command resumes with no step lost. A second SIGTERM stops at once (the sender
means it); what is lost then is the steps since the last checkpoint, as with a kill.

The handler only notes the request (Python runs it between bytecodes of the main thread);
the loop asks its context at each step boundary, and under Ray the driver passes the request
to the workers (distributed.py), whose ranks agree on the step before any of them stops.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator, Optional

EXIT_STOPPED = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class StoppedOnNotice(Exception):
    """The run stopped at a step boundary on request, its checkpoint committed. The message
    says where and how to go on."""


class StopNotice:
    """Whether (and why) this process was asked to stop. Set from a signal handler or a
    thread, read by the loop: one attribute, written once."""

    def __init__(self) -> None:
        self.reason: Optional[str] = None

    def request(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason


@contextmanager
def stop_on_sigterm(notice: StopNotice) -> Iterator[StopNotice]:
    """SIGTERM requests a stop at the next step boundary while the block runs (the handler
    that was there before is put back after it). Only the main thread can take signals: in
    another thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield notice
        return

    def on_sigterm(signum, frame) -> None:
        if notice.reason is not None:  # asked twice: stop now
            raise SystemExit(EXIT_STOPPED)
        notice.request("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield notice
    finally:
        signal.signal(signal.SIGTERM, previous)
