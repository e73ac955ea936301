"""Local mode: one process, no Ray. Preflight, the run directory, then the one loop.

Config, paths and data rows are checked before torch is imported, so that a mistake is told
in seconds; neither Ray nor DeepSpeed is ever imported here.
"""

from __future__ import annotations

from typing import Optional

from ftdist.config import Config
from ftdist.engines import local_refusal
from ftdist.errors import UserError
from ftdist.notice import StopNotice
from ftdist.preflight import check_dtype, check_fits, check_inputs
from ftdist.rundir import check_free, finished_summary, is_finished, read_summary, writing


def train_local(cfg: Config, restart: bool = False, show_progress: bool = True,
                notice: Optional[StopNotice] = None) -> dict:
    refuse_local_engine(cfg)
    checked = check_inputs(cfg)
    check_free(cfg)  # another writer of this run: told now, not after the model loads
    from ftdist.context import LocalContext, default_device

    device = default_device()
    check_dtype(cfg, device)
    check_fits(checked.cfg, device)
    with writing(cfg, restart) as store:  # the snapshot keeps the config as written (s3:// paths)
        if is_finished(store):
            return finished_summary(store)
        from ftdist.loop import train

        train(checked.cfg, LocalContext(store=store, device=device, show_progress=show_progress, notice=notice))
        return read_summary(store)


def refuse_local_engine(cfg: Config) -> None:
    """distributed.engine must be one that runs in one process (--local with workers > 0 too)."""
    refusal = local_refusal(cfg.distributed.engine)
    if refusal:
        raise UserError(refusal)
