"""Local mode: one process, no Ray. Preflight, the run directory, then the one loop.

Config, paths and data rows are checked before torch is imported, so that a mistake is told
in seconds; neither Ray nor DeepSpeed is ever imported here.
"""

from __future__ import annotations

from typing import Optional

from ftdist.config import Config
from ftdist.notice import StopNotice
from ftdist.preflight import check_dtype, check_fits, check_inputs
from ftdist.rundir import finished_summary, is_finished, prepare_run_dir, read_summary


def train_local(cfg: Config, restart: bool = False, show_progress: bool = True,
                notice: Optional[StopNotice] = None) -> dict:
    checked = check_inputs(cfg)
    from ftdist.context import LocalContext, default_device

    device = default_device()
    check_dtype(cfg, device)
    check_fits(checked.cfg, device)
    store = prepare_run_dir(cfg, restart)  # the snapshot keeps the config as written (s3:// paths)
    if is_finished(store):
        return finished_summary(store)
    from ftdist.loop import train

    train(checked.cfg, LocalContext(store=store, device=device, show_progress=show_progress, notice=notice))
    return read_summary(store)
