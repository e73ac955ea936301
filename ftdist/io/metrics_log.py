"""metrics.jsonl: one JSON object per line, appended by rank 0, read by trackers, reports and
resumes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from ftdist.io import safewrite


class MetricsLog:
    """Appends records; on resume, drops the records of steps after the checkpoint. Each record
    is also handed to `listener` (the run's trackers), which must not block. Never written
    through a link (safewrite): `root` is the run directory the log lies in."""

    def __init__(self, path: Path, enabled: bool = True, listener: Optional[Callable[[dict], None]] = None,
                 root: Optional[Path] = None):
        self.path = path
        self.enabled = enabled
        self.listener = listener
        self.root = root or path.parent

    def append(self, record: dict) -> None:
        if not self.enabled:
            return
        with safewrite.open_file(self.path, self.root, "the metrics log", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.listener is not None:
            self.listener(record)

    def truncate_after(self, step: int) -> None:
        """Keep what happened up to `step`: those steps will be trained again."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")  # layout.STAGING
        safewrite.write_text(tmp, self.root, "the metrics log", "".join(json.dumps(r) + "\n" for r in kept))
        safewrite.rename(tmp, self.path, self.root, "the metrics log")

    def last_step(self) -> Optional[int]:
        """The newest training step logged (None: none, or not this rank's log)."""
        if not self.enabled:
            return None
        return max((r["step"] for r in read_metrics(self.path) if "loss" in r and "step" in r), default=None)

    def reset(self) -> None:
        if self.enabled:
            safewrite.remove(self.path, self.root, "the metrics log")


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():  # a FIFO there would never answer
        return []
    return parse_metrics(path.read_text())


def parse_metrics(text: str) -> list[dict]:
    """The records of a metrics log's text."""
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r and r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]
