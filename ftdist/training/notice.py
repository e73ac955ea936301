"""A stop on notice. SIGTERM is what Kubernetes, systemd, batch schedulers and spot reclaimers
send before they kill: a run that gets it stops at the next step boundary with a checkpoint,
so the same command resumes with no step lost. A second SIGTERM stops at once (the sender
means it); what is lost then is the steps since the last checkpoint, as with a kill.

The handler only notes the request (Python runs it between bytecodes of the main thread);
the loop asks its context at each step boundary, and under Ray the driver passes the request
to the workers (launch/restarts.py), whose ranks agree on the step before any of them stops.
Under Ray the same path takes a node's preemption notice and a resize of an elastic run:
a checkpoint at the step, then Ray Train restarts the workers instead of the run ending.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

EXIT_STOPPED = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


@dataclass(frozen=True)
class Notice:
    """A stop at this step boundary, as every rank agreed it."""

    reason: str
    # The workers are restarted by Ray Train (a node's preemption, a resize) rather than the run ended.
    restarts: bool = False
    deadline: Optional[float] = None  # time.time() by which the checkpoint should be committed
    nodes: tuple[str, ...] = ()  # the Ray nodes being preempted (their ids)


class StoppedOnNotice(Exception):
    """The run stopped at a step boundary on request, its checkpoint committed. The message
    says where and how to go on."""

    def __init__(self, message: str, notice: Optional[Notice] = None) -> None:
        super().__init__(message)
        self.notice = notice or Notice(message)


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
    another thread this does nothing.

    Python runs a signal's handler in the main thread between bytecodes, and a Ray driver's
    main thread sits in Ray's C++ waits for a second or more at a time: the request would
    reach the workers that much later (dozens of steps of a small model). So the C-level
    handler's wake-up byte (signal.set_wakeup_fd) is read by a thread of our own, which notes
    the request the moment the signal lands; the Python handler, when it runs, only counts
    (a second SIGTERM stops at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield notice
        return
    received = [0]

    def on_sigterm(signum, frame) -> None:
        received[0] += 1
        if received[0] > 1:  # asked twice: stop now
            raise SystemExit(EXIT_STOPPED)
        notice.request("SIGTERM")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def watch() -> None:
        while True:
            try:
                got = os.read(read_end, 64)
            except OSError:
                return
            if not got:  # the write end closed: the block is over
                return
            if signal.SIGTERM in got:
                notice.request("SIGTERM")

    watcher = threading.Thread(target=watch, name="ftdist-sigterm", daemon=True)
    watcher.start()
    try:
        yield notice
    finally:
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGTERM, previous)
        os.close(write_end)
        watcher.join(timeout=5)
        os.close(read_end)
