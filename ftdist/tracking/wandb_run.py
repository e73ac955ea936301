"""Weights & Biases: one W&B run per ftdist run (a trial: in its search's group), resumed by
the id in tracking.json. W&B's files live in <run>/wandb; offline runs are synced from there
with `wandb sync`."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from ftdist.config.schema import WandbConfig

STATUS_EXIT_CODE = {"FINISHED": 0, "KILLED": 130}  # anything else: failed (1)


def own_service() -> None:
    """W&B writes through a service process, found by the WANDB_SERVICE variable its starter
    sets. A Ray worker inherits that variable from whoever started Ray (a driver, a test
    process with W&B open): its runs would then live in a process that dies with that one,
    taking their records. A service of another process is forgotten, so that this one starts
    its own (the token is "<version>-<starter's pid>-...")."""
    token = os.environ.get("WANDB_SERVICE")
    if token and token.split("-")[1:2] != [str(os.getpid())]:
        del os.environ["WANDB_SERVICE"]


class WandbRun:
    name = "wandb"

    def __init__(self, conf: WandbConfig, run_dir: Path, run_name: str, params: dict[str, Any],
                 tags: dict[str, str], saved: Optional[dict], group: Optional[str] = None,
                 job_type: str = "train", upload: Callable[[], None] = lambda: None):
        import wandb

        own_service()
        self.where = f"{conf.entity + '/' if conf.entity else ''}{conf.project} ({conf.mode})"
        self.upload = upload
        same = saved and saved.get("project") == conf.project and saved.get("entity") == conf.entity
        run_id = saved["run_id"] if same else uuid.uuid4().hex[:12]
        # Quiet, and nothing of the machine gathered beyond what ftdist hands over: no git state,
        # code, console capture or command line (which may carry --set values).
        settings = wandb.Settings(console="off", silent=True, disable_git=True, save_code=False,
                                  x_disable_meta=True, x_disable_stats=True)
        self.run = wandb.init(project=conf.project, entity=conf.entity, mode=conf.mode, dir=str(run_dir),
                              id=run_id, resume="allow", name=run_name, group=group, job_type=job_type,
                              config=params, tags=[f"{k}:{v}" for k, v in tags.items()], settings=settings,
                              reinit="create_new")
        self.run_id, self.project, self.entity = run_id, conf.project, conf.entity
        # Online, W&B knows where a continued run stopped; offline it does not (starting_step 0): the
        # local log's last step stands in (the caller's), and nothing is caught up.
        online = conf.mode == "online"
        self.skip_through = int(self.run.starting_step) - 1 if online else None if same else -1
        self.catches_up = online

    def state(self) -> dict:
        return {"run_id": self.run_id, "project": self.project, "entity": self.entity}

    def log(self, points) -> None:
        for step, metrics in points:
            self.run.log(metrics, step=step)

    def artifacts(self, files: list[Path]) -> None:
        # Files in the W&B run's directory are part of the run (uploaded at its end, or by `wandb sync`).
        for f in files:
            shutil.copy2(f, Path(self.run.dir) / f.name)

    def sync(self) -> None:
        pass

    def close(self, status: str) -> None:
        self.run.finish(exit_code=STATUS_EXIT_CODE.get(status, 1))
        self.upload()
