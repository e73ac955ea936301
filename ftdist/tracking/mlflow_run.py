"""MLflow: one run per ftdist run (a trial: a child of its search's run), kept across resumes
by the id in the run directory's tracking.json. MLflow appends metric values, so a resumed
run does not send again the steps the server already has, metric by metric (their first values
stand: the steps are retrained from the same data position and RNG state), and gets those up
to its checkpoint that it missed."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

from ftdist.config.redact import redact_url
from ftdist.config.schema import MlflowConfig

# MLflow retries a failed request 7 times with a doubling backoff (minutes) by default: the
# reporter is in the background, but the end of a run waits for it, bounded.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
            "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
BATCH = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's limits per log_batch call


def client(conf: MlflowConfig):
    for key, value in HTTP_ENV.items():
        os.environ.setdefault(key, value)  # a user's own setting wins
    # MLflow prints a link to each ended run on stdout, built from the URI as given: with its
    # credentials.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=conf.tracking_uri)


class MlflowRun:
    name = "mlflow"
    skip_through = -1  # filtered here, per metric: the server says what it holds of each
    catches_up = True

    def __init__(self, conf: MlflowConfig, run_name: str, params: dict[str, Any], tags: dict[str, str],
                 saved: Optional[dict], parent_run_id: Optional[str] = None):
        from mlflow.entities import Param, RunTag

        self.where = redact_url(conf.tracking_uri)
        self.client = client(conf)
        run = self._existing(saved)
        self.resumed = run is not None
        if run is None:
            experiment = self.client.get_experiment_by_name(conf.experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(conf.experiment)
            tags = {**tags, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
            run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
            new_params = params
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
            # Parameters are immutable in MLflow: a resumed run adds the keys it did not have.
            new_params = {k: v for k, v in params.items() if k not in run.data.params}
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        items = [Param(k, str(v)) for k, v in new_params.items()]
        for i in range(0, len(items), BATCH["params"]):
            self.client.log_batch(self.run_id, params=items[i : i + BATCH["params"]])
        if not self.resumed:
            tag_items = [RunTag(k, v) for k, v in tags.items() if not k.startswith("mlflow.")]
            for i in range(0, len(tag_items), BATCH["tags"]):
                self.client.log_batch(self.run_id, tags=tag_items[i : i + BATCH["tags"]])
        self.held = self._held() if self.resumed else {}

    def _existing(self, saved: Optional[dict]):
        if not saved or saved.get("tracking_uri") != self.where:
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(saved["run_id"])
        except MlflowException:  # deleted, or another server's
            return None
        return run if run.info.lifecycle_stage == "active" else None

    def _held(self) -> dict[str, int]:
        """metric -> the last step the server has of it."""
        run = self.client.get_run(self.run_id)
        return {key: max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)
                for key in run.data.metrics}

    def state(self) -> dict:
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": self.where}

    def log(self, points) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for step, values in points for key, value in values.items()
                   if step > self.held.get(key, -1)]
        for i in range(0, len(metrics), BATCH["metrics"]):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + BATCH["metrics"]])

    def artifacts(self, files: list[Path]) -> None:
        for f in files:
            self.client.log_artifact(self.run_id, str(f))

    def sync(self) -> None:
        pass

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)
