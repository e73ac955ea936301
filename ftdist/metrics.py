"""metrics.jsonl (one JSON object per line) and what a person sees while training runs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable, Optional

from ftdist import safewrite


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

    def reset(self) -> None:
        if self.enabled:
            safewrite.remove(self.path, self.root, "the metrics log")


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():  # a FIFO there would never answer
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r and r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


class Progress:
    """A progress bar on a terminal; plain log lines (every log_every steps) otherwise."""

    def __init__(self, total: int, start: int, log_every: int, enabled: bool = True,
                 stream=None, told: tuple[str, ...] = ()):
        """`told`: the objective's metrics a step's line tells where the step has them."""
        self.total, self.log_every, self.enabled, self.told = total, log_every, enabled, told
        self.stream = stream or sys.stdout
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=self.stream)

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.1e}")
            return
        step = record["step"]
        if step % self.log_every == 0 or step == self.total:
            extra = "".join(f"  {key.replace('_', ' ')} {record[key]:.4f}"
                            for key in ("replay_loss", "penalty", *self.told) if key in record)
            self.write(
                f"step {step}/{self.total}  loss {record['loss']:.4f}{extra}  lr {record['lr']:.2e}  "
                f"grad_norm {record['grad_norm']:.3f}  tokens/s {record['tokens_per_s']:.0f}"
            )

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def perplexity(loss: Optional[float]) -> Optional[float]:
    if loss is None:
        return None
    return math.exp(min(loss, 50.0))
