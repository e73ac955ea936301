"""TensorBoard: event files through torch's SummaryWriter. A resumed run purges the steps past
its checkpoint (TensorBoard's own purge_step), so the steps trained again show once."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional


class TensorBoardLog:
    name = "tensorboard"
    skip_through = -1  # nothing skipped: purged instead
    catches_up = False  # its file may hold them: a step sent again would show twice

    def __init__(self, log_dir: Path, resumed_at: Optional[int], config_text: str,
                 upload: Callable[[], None] = lambda: None):
        from torch.utils.tensorboard import SummaryWriter

        self.where, self.upload = str(log_dir), upload
        # Events at purge_step and after, from earlier sessions, are dropped by TensorBoard's reader.
        self.writer = SummaryWriter(str(log_dir), purge_step=None if resumed_at is None else resumed_at + 1)
        if resumed_at is None:
            self.writer.add_text("config", "    " + config_text.replace("\n", "\n    "), 0)  # a code block

    def log(self, points) -> None:
        for step, metrics in points:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def artifacts(self, files: list[Path]) -> None:
        """Nothing to send: the plots and summary are beside the event files, in the run."""

    def sync(self) -> None:
        self.upload()

    def close(self, status: str) -> None:
        self.writer.close()
        self.upload()
