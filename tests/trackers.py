"""Real trackers for tests, and their own readers: an `mlflow server` on a free loopback port
(SQLite store, artifacts in a folder), TensorBoard's event reader, and W&B's own reader of an
offline run's transaction log (`wandb leet inspect --json`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tests.s3server import free_port, wait_for_http


class MlflowServer:
    def __init__(self, root: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        root.mkdir(parents=True, exist_ok=True)
        exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
        self.log = (root / "mlflow-server.log").open("w")
        self.proc = subprocess.Popen(
            ["nice", "-n", "10", exe, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "art")],
            stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,  # kill() takes its worker processes too
            # Without its job runner: a dozen background workers of about 200 MB each.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        wait_for_http(self.url + "/health", self.proc, root / "mlflow-server.log", "mlflow server", 90)

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.url)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them (purged steps dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(run_dir: Path) -> list[dict]:
    """Every record of every offline W&B run under <run>/wandb, in order, read by wandb itself."""
    return [r for session in wandb_sessions(run_dir) for r in session]


def wandb_sessions(run_dir: Path) -> list[list[dict]]:
    """The records of each offline W&B session (file) under <run>/wandb, oldest first."""
    exe = shutil.which("wandb", path=str(Path(sys.executable).parent)) or "wandb"
    sessions = []
    for log in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        out = subprocess.run([exe, "leet", "inspect", "--json", str(log)], capture_output=True, text=True,
                             timeout=120, check=True).stdout
        records = []
        for line in out.splitlines():
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        sessions.append(records)
    return sessions


def wandb_history(run_dir: Path, key: str) -> list[tuple[int, float]]:
    return [(r["history"]["step"]["num"], r["history"]["item"][key]) for r in wandb_records(run_dir)
            if r.get("type") == "history" and key in r["history"]["item"]]
