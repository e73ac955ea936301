"""Local mode: one process, no Ray. Preflight, the run directory, then the one loop.

Config, paths and data rows are checked before torch is imported, so that a mistake is told
in seconds; Ray is never imported here, nor DeepSpeed unless distributed.engine names it (a
world of one process).
"""

from __future__ import annotations

from typing import Optional

from ftdist.config.schema import Config
from ftdist.engines.registry import resolve
from ftdist.launch.preflight import check_dtype, check_fits, check_inputs
from ftdist.launch.rundir import check_free, finished_summary, is_finished, read_summary, writing
from ftdist.training.notice import StopNotice


def train_local(cfg: Config, restart: bool = False, show_progress: bool = True,
                notice: Optional[StopNotice] = None) -> dict:
    checked = check_inputs(cfg)
    check_free(cfg)  # another writer of this run: told now, not after the model loads
    from ftdist.model.build import default_device
    from ftdist.training.context import LocalContext

    device = default_device()
    check_dtype(cfg, device)
    check_fits(checked.cfg, device, 1, resolve(cfg.distributed.engine, local=True))
    with writing(cfg, restart) as store:  # the snapshot keeps the config as written (s3:// paths)
        if is_finished(store):
            return finished_summary(store)
        from ftdist.training.loop import train

        ctx = LocalContext(store=store, device=device, show_progress=show_progress, notice=notice)
        try:
            train(checked.cfg, ctx)
        finally:
            ctx.close()
        return read_summary(store)
