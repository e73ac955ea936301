"""Tracking: rank 0's reporters behind one bounded queue and one background thread, so that a
slow or vanished tracker never holds up a step. What a tracker could not take stays in
metrics.jsonl; its first failure is one warning, and it is tried again with later records
(a server that comes back gets the rest)."""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Optional, Protocol

from ftdist.config.redact import redact_url
from ftdist.tracking.params import record_metrics

FLUSH_S = 30.0  # at the end: how long the trackers may take to send what is left
SYNC_S = 60.0  # how often a reporter that copies files to the store (TensorBoard on s3://) does so
MAX_PENDING = 10_000  # records waiting for the thread; past this, new ones are counted as not sent

Point = tuple[int, dict[str, float]]  # (step, metrics)


class Reporter(Protocol):
    name: str  # "mlflow", in messages
    where: str  # where it reports, credentials redacted, in messages
    # Steps up to here are already in the tracker (a resumed run's steps past its checkpoint):
    # they are not sent again, so that no step shows two values. -1: none (TensorBoard purges
    # instead, MLflow filters per metric); None: the tracker cannot tell (W&B offline), and the
    # steps the local log had reached stand in.
    skip_through: Optional[int]
    # Whether a resumed run sends it the records up to its checkpoint that it may have missed
    # (the process stopped before the background thread sent them): only trackers that know
    # what they hold, so that nothing shows twice.
    catches_up: bool

    def log(self, points: list[Point]) -> None: ...
    def artifacts(self, files: list[Path]) -> None: ...
    def sync(self) -> None: ...
    def close(self, status: str) -> None: ...


def warn_line(line: str) -> None:
    print(redact_url(line), file=sys.stderr, flush=True)  # a URL's credentials never reach the terminal


class Tracking:
    """Fan-out from the metrics log to the reporters; `log` only enqueues."""

    def __init__(self, reporters: list[Reporter], warn=None):
        self.reporters = reporters
        self.warn = warn or warn_line
        self.unsent: Counter = Counter()
        self.warned: set[str] = set()
        self.ended = False
        self.queue: queue.Queue = queue.Queue(maxsize=MAX_PENDING)
        self.thread: Optional[threading.Thread] = None
        if reporters:
            self.thread = threading.Thread(target=self._run, name="ftdist-tracking", daemon=True)
            self.thread.start()

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.reporters]

    def log(self, record: dict) -> None:
        """A metrics-log record: its numbers go to every reporter (events are not metrics)."""
        point = record_metrics(record) if self.thread is not None else None
        if point is None or self.ended:
            return
        try:
            self.queue.put_nowait(("log", point))
        except queue.Full:
            for r in self.reporters:
                self.unsent[r.name] += 1

    def catch_up(self, records: list[dict]) -> None:
        """A resumed run's log up to its checkpoint, for the trackers that may have missed some of
        it (each takes only what it lacks). Before any new record."""
        points = [p for p in map(record_metrics, records) if p is not None]
        if points and self.thread is not None and not self.ended:
            self.queue.put(("catch_up", points))

    def end(self, status: str, files: list[Path] = ()) -> dict[str, int]:
        """Send what is queued and `files` as artifacts, mark the tracker runs `status` (FINISHED,
        FAILED, KILLED), within FLUSH_S. Returns {reporter: records not sent}. Once only."""
        if self.ended or self.thread is None:
            self.ended = True
            return dict(self.unsent)
        self.ended = True
        self.queue.put(("files", [Path(f) for f in files if Path(f).is_file()]))
        self.queue.put(("close", status))
        self.thread.join(FLUSH_S)
        if self.thread.is_alive():  # a tracker that does not answer: its thread is left behind (a daemon)
            self.warn(f"ftdist: warning: {', '.join(self.names)} did not finish within {FLUSH_S:.0f} s; "
                      "what they miss is in metrics.jsonl")
        return dict(self.unsent)

    # -- the background thread

    def _run(self) -> None:
        last_sync = time.monotonic()
        while True:
            try:
                items = [self.queue.get(timeout=SYNC_S)]
            except queue.Empty:
                items = []
            while len(items) < 1000:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            points: list[Point] = []
            for kind, payload in items:
                if kind == "log":
                    points.append(payload)
                    continue
                self._send(points)
                points = []
                if kind == "catch_up":
                    self._send(payload, [r for r in self.reporters if r.catches_up])
                elif kind == "files":
                    for r in self.reporters:
                        self._call(r, lambda r=r: r.artifacts(payload))
                elif kind == "close":
                    for r in self.reporters:
                        self._call(r, lambda r=r: r.close(payload))
                    return
            self._send(points)
            if time.monotonic() - last_sync > SYNC_S:
                for r in self.reporters:
                    self._call(r, r.sync)
                last_sync = time.monotonic()

    def _send(self, points: list[Point], reporters: Optional[list[Reporter]] = None) -> None:
        for r in self.reporters if reporters is None else reporters:
            mine = [p for p in points if p[0] > r.skip_through]
            if mine and not self._call(r, lambda r=r, mine=mine: r.log(mine)):
                self.unsent[r.name] += len(mine)

    def _call(self, reporter: Reporter, action) -> bool:
        try:
            action()
        except Exception as e:  # whatever a tracker's client raises: the run goes on
            reason = redact_url(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")[:300]
            if reporter.name not in self.warned:
                self.warned.add(reporter.name)
                self.warn(f"ftdist: warning: {reporter.name} at {reporter.where} failed ({reason}); training "
                          "goes on, every record is in metrics.jsonl, and later records are tried again")
            return False
        return True
