"""`make test-all`: a tracking server killed mid-run costs one warning, not the run (the other
trackers unharmed, every step in metrics.jsonl). The rest of the trackers' tests: tests/e2e/test_tracking.py."""

import json

from ftdist.io.metrics_log import read_metrics
from tests.conftest import start_cli, tiny_config, wait_until, write_config
from tests.e2e.test_tracking import steps
from tests.trackers import (
    MlflowServer,
    tensorboard_scalars,
)


def test_a_tracking_server_killed_mid_run_costs_one_warning_not_the_run(tmp_path):
    server = MlflowServer(tmp_path / "mlflow")
    cfg = tiny_config(tmp_path, "model.init.num_layers=2", "train.max_steps=120", "train.eval_every=20",
                      "checkpoint.every_steps=1000", "train.log_every=10", f"logging.mlflow.tracking_uri={server.url}",
                      "logging.tensorboard=true", name="outage")
    run_dir = tmp_path / "runs" / "outage"
    proc = start_cli("train", str(write_config(tmp_path, cfg)), "--local")
    try:
        def training() -> bool:
            metrics = run_dir / "metrics.jsonl"
            return metrics.is_file() and any(r.get("step", 0) >= 2 and "loss" in r for r in read_metrics(metrics))

        wait_until(training, 240, "the run's second step", proc)
        server.kill()
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    warnings = [x for x in out.splitlines() if "warning" in x]
    assert len(warnings) == 1 and warnings[0].startswith("ftdist: warning: mlflow at http://127.0.0.1:"), out
    assert "metrics.jsonl" in warnings[0] and "Traceback" not in out
    losses = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    assert losses == list(range(1, 121))  # everything is in the log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tracking_unsent"]["mlflow"] > 0
    assert steps(tensorboard_scalars(run_dir / "tensorboard")["loss"]) == losses  # the other tracker unharmed
