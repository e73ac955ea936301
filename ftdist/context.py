"""What differs between the modes the one loop runs in: rank, world, device, where to write.

Local mode is one process; Ray workers get a context of their own (same interface), so
the loop never asks "am I under Ray?".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class LocalContext:
    run_dir: Path
    device: torch.device
    rank: int = 0
    world_size: int = 1
    show_progress: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, value: float) -> float:
        return value

    def report(self, metrics: dict) -> None:
        """Hand metrics to the orchestrator (nothing to do in one process)."""


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
