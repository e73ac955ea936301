"""The Ray head as the driver sees it: whether it answers at all, and a watch that ends the
driver with one message when the head is lost mid-run.

Without the watch, a driver whose head dies waits out Ray's own GCS reconnect time (about a
minute) printing Ray's retry lines, then dies with exit 1 and nothing that says what happened
or how to go on. The run itself is safe in its store; the user needs to hear that.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from ftdist.errors import EXIT_USER_ERROR, UserError

# How long the head may be silent before the driver gives up on it: long enough for a busy
# head under load (a TCP connect is answered by the kernel even while the GCS is busy), well
# inside Ray's own reconnect timeout.
HEAD_SILENCE_S = 15.0
PROBE_EVERY_S = 1.0
# How long the message may spend finding the newest complete checkpoint (the store may be gone too).
HINT_TIMEOUT_S = 10.0


def answers(address: str, timeout_s: float = 5.0) -> bool:
    """Whether something accepts a TCP connection at host:port (a Ray head's GCS port)."""
    host, _, port = address.rpartition(":")
    if "://" in address or not port.isdigit():
        return True  # not host:port: left to Ray to judge
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


def head_address() -> Optional[str]:
    """The GCS address of the cluster this driver joined, probed on loopback when the head
    runs on this machine (Ray names it by the machine's interface address)."""
    import ray

    try:
        address = ray.get_runtime_context().gcs_address
    except Exception:  # not connected (ray:// client) or an older runtime context
        return None
    host, _, port = address.rpartition(":")
    return f"127.0.0.1:{port}" if host in local_addresses() else address


def local_addresses() -> set[str]:
    import psutil

    return {a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET}


def lost_message(address: str, resume_hint: Callable[[], str]) -> str:
    return (f"lost the Ray head at {address}: it has not answered for {HEAD_SILENCE_S:.0f} s (its node stopped or "
            f"was preempted); {bounded(resume_hint)}; run the same command on a new Ray cluster (--address or "
            "RAY_ADDRESS) to resume from its newest complete checkpoint")


def bounded(hint: Callable[[], str]) -> str:
    """The hint, or a plainer one when finding it takes too long (the store may be unreachable too)."""
    found: list[str] = []
    worker = threading.Thread(target=lambda: found.append(hint()), daemon=True)
    worker.start()
    worker.join(HINT_TIMEOUT_S)
    return found[0] if found else "its complete checkpoints are kept in its store"


@contextmanager
def watch_head(resume_hint: Callable[[], str]) -> Iterator[None]:
    """While the block runs (the driver waiting on Ray), probe the head every second; after
    HEAD_SILENCE_S of silence print one error line and exit 2. The block's own failure while
    the head is gone is told the same way, as a UserError."""
    address = head_address()
    if address is None:
        yield
        return
    stop = threading.Event()

    def watch() -> None:
        silent_since: Optional[float] = None
        while not stop.wait(PROBE_EVERY_S):
            if answers(address, timeout_s=2.0):
                silent_since = None
                continue
            silent_since = silent_since or time.monotonic()
            if time.monotonic() - silent_since >= HEAD_SILENCE_S and not stop.is_set():
                sys.stdout.flush()
                print(f"ftdist: error: {lost_message(address, resume_hint)}", file=sys.stderr, flush=True)
                # The main thread is blocked inside Ray's wait, which would hold it for a minute more.
                os._exit(EXIT_USER_ERROR)

    watcher = threading.Thread(target=watch, daemon=True, name="ftdist-head-watch")
    watcher.start()
    try:
        yield
    except UserError:
        raise
    except Exception:
        if not answers(address, timeout_s=2.0):
            raise UserError(lost_message(address, resume_hint)) from None
        raise
    finally:
        stop.set()
