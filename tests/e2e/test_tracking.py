"""Trackers, against the real thing: a local run reports to TensorBoard, a real `mlflow server`
and W&B (offline), read back with each one's own reader; a resume from an earlier checkpoint
shows each step once in all three (a server killed mid-run: tests/matrix/test_tracking_matrix.py); a
tracker that is missing or unreachable at the start is one message, exit 2; no credential
reaches the run directory, the trackers or the terminal."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ftdist.config.redact import redact_url, redacted
from ftdist.io.metrics_log import read_metrics
from ftdist.launch.preflight import check_inputs
from ftdist.launch.rundir import prepare_run_dir
from ftdist.tracking.params import flat_params, record_metrics
from ftdist.tracking.preflight import check_tracking
from ftdist.training.context import LocalContext
from ftdist.training.loop import train
from tests.conftest import REPO, tiny_config, write_config
from tests.trackers import (
    tensorboard_scalars,
    wandb_history,
    wandb_records,
)

PASSWORD = "trk-pw-7Qz9"  # planted wherever a user puts tracker credentials
API_KEY = "wandbkey" + "0" * 32


def test_urls_lose_their_credentials_and_params_are_flat_and_redacted(tmp_path):
    assert redact_url("http://alice:s3cr3t@mlflow.internal:5000/x") == "http://***@mlflow.internal:5000/x"
    # Every query value, whatever its key is named (issue 35: ?apikey=... is a secret too).
    assert redact_url("https://h/p?token=abc&run=1&apikey=k") == "https://h/p?token=***&run=***&apikey=***"
    assert redact_url("runs/a@b") == "runs/a@b"  # not a URL
    assert redacted({"storage": {"endpoint_url": "http://k:s@127.0.0.1:9000"}}) == \
        {"storage": {"endpoint_url": "http://***@127.0.0.1:9000"}}
    cfg = tiny_config(tmp_path, f"logging.mlflow.tracking_uri=http://bob:{PASSWORD}@127.0.0.1:5000",
                      "lora.target_modules=[q_proj, v_proj]")
    params = flat_params(cfg)
    assert params["train.lr"] == cfg.train.lr and params["lora.rank"] == 8
    assert params["lora.target_modules"] == '["q_proj", "v_proj"]'
    assert params["logging.mlflow.tracking_uri"] == "http://***@127.0.0.1:5000"
    assert not any(k.startswith("tune") for k in params) and PASSWORD not in json.dumps(params)
    assert record_metrics({"step": 3, "event": "checkpoint", "bytes": 10}) is None
    assert record_metrics({"step": 3, "loss": 1.5, "lr": 1e-3, "flag": True, "eval_ppl": None}) == \
        (3, {"loss": 1.5, "lr": 1e-3})


def steps(points) -> list[int]:
    return [s for s, _ in points]


def test_a_local_run_reports_to_all_three_and_a_resume_shows_each_step_once(tmp_path, mlflow_server, monkeypatch,
                                                                           capfd):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    uri = mlflow_server.url.replace("http://", f"http://ftdist:{PASSWORD}@")
    cfg = tiny_config(tmp_path, "model.init.num_layers=2", "train.max_steps=6", "checkpoint.every_steps=2",
                      "checkpoint.keep=5", "train.eval_every=2", "logging.tensorboard=true",
                      f"logging.mlflow.tracking_uri={uri}", "logging.mlflow.experiment=local-run",
                      "logging.wandb.project=ftdist-test", "logging.wandb.mode=offline", name="tracked")
    cfg = check_inputs(cfg).cfg
    store = prepare_run_dir(cfg, restart=False)
    run_dir = store.local

    def context() -> LocalContext:
        return LocalContext(store=store, device=torch.device("cpu"), show_progress=False)

    train(cfg, context())
    first = {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}
    # As if the run had died after step 6 but before its final model: it resumes from step 4
    # and trains steps 5 and 6 again, which every tracker has already seen once.
    shutil.rmtree(run_dir / "final")
    train(cfg, context())
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["checkpoint"] for r in records if r.get("event") == "resume"] == ["step-4"]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    state = json.loads((run_dir / "tracking.json").read_text())

    # TensorBoard: the steps past the checkpoint purged and written again; one value per step.
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    assert steps(scalars["loss"]) == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in scalars["loss"]] == pytest.approx([losses[s] for s in range(1, 7)], rel=1e-6)
    assert steps(scalars["eval_loss"]) == [0, 2, 4, 6] and {"lr", "grad_norm", "tokens_per_s"} <= set(scalars)

    # MLflow: one run, continued; each step once (steps 5-6 kept from the first pass, which the
    # resume retrains to the same values).
    client = mlflow_server.client()
    experiment = client.get_experiment_by_name("local-run")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [state["mlflow"]["run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert steps(history) == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in history] == pytest.approx([first[s] for s in range(1, 7)], rel=1e-6)
    assert [v for _, v in history] == pytest.approx([losses[s] for s in range(1, 7)], rel=1e-5)
    assert steps(sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval_loss"))) == \
        sorted(evals)
    params, tags = run.data.params, run.data.tags
    assert params["train.max_steps"] == "6" and params["method"] == "full" and params["logging.wandb.mode"] == "offline"
    assert params["logging.mlflow.tracking_uri"] == mlflow_server.url.replace("http://", "http://***@")
    assert (tags["method"], tags["freeze_layers"], tags["workers"], tags["zero_stage"]) == ("full", "0", "1", "none")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"summary.json", "loss.png"}

    # W&B: two offline sessions of one run id; each step once in the history W&B itself reads back.
    sessions = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2 and all(p.name.endswith(state["wandb"]["run_id"]) for p in sessions)
    assert steps(wandb_history(run_dir, "loss")) == [1, 2, 3, 4, 5, 6]
    assert steps(wandb_history(run_dir, "eval_loss")) == [0, 2, 4, 6]
    header = next(r for r in wandb_records(run_dir) if r.get("type") == "run")["run"]
    assert header["project"] == "ftdist-test" and "method:full" in header["tags"]
    assert header["config"]["update"]["train.lr"] == cfg.train.lr
    assert any((p / "files" / "summary.json").is_file() for p in sessions)

    # No credential anywhere: run directory (tracker files included), the trackers, the terminal.
    out = capfd.readouterr()
    for path in run_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert PASSWORD.encode() not in data and API_KEY.encode() not in data, path
    assert PASSWORD not in json.dumps([params, tags]) and PASSWORD not in out.out + out.err
    assert "warning" not in out.err, out.err


def test_steps_a_tracker_missed_before_the_checkpoint_reach_it_when_the_run_resumes(tmp_path, mlflow_server, capfd):
    # The first session's MLflow is unreachable (as a tracker whose records were still queued when
    # the process was killed): it gets nothing; the log reaches step 6, the checkpoint step 4.
    def reporting_to(uri: str):  # the same run, its MLflow elsewhere (checked inputs: the server is not asked)
        logging = tiny_config(tmp_path, f"logging.mlflow.tracking_uri={uri}", "logging.mlflow.experiment=caught-up")
        return checked.model_copy(update={"logging": logging.logging})

    checked = check_inputs(tiny_config(tmp_path, "model.init.num_layers=2", "train.max_steps=6",
                                       "checkpoint.every_steps=4", "train.eval_every=2", name="lagging")).cfg
    away = reporting_to("http://127.0.0.1:1")
    store = prepare_run_dir(away, restart=False)
    train(away, LocalContext(store=store, device=torch.device("cpu"), show_progress=False))
    assert "mlflow at http://127.0.0.1:1: cannot open a run" in capfd.readouterr().err
    shutil.rmtree(store.local / "final")  # died before its final model: resumes from step 4
    train(reporting_to(mlflow_server.url), LocalContext(store=store, device=torch.device("cpu"), show_progress=False))
    records = read_metrics(store.local / "metrics.jsonl")
    assert [r["checkpoint"] for r in records if r.get("event") == "resume"] == ["step-4"]
    client = mlflow_server.client()
    run = client.search_runs([client.get_experiment_by_name("caught-up").experiment_id])[0]
    for key in ("loss", "eval_loss", "lr"):  # steps 1-4 from the log, 5-6 trained again: each once
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        logged = sorted((r["step"], r[key]) for r in records if key in r)
        assert steps(history) == steps(logged), key
        assert [v for _, v in history] == pytest.approx([v for _, v in logged], rel=1e-6), key


@pytest.mark.parametrize("setting, env, expected", [
    (["logging.mlflow.tracking_uri=http://ftdist:" + PASSWORD + "@127.0.0.1:1"], {},
     ["logging.mlflow: cannot reach the MLflow server at http://***@127.0.0.1:1", "logging.mlflow.optional: true"]),
    (["logging.wandb.project=p", "logging.wandb.mode=online"], {"WANDB_API_KEY": ""},
     ["logging.wandb: cannot log in to W&B", "WANDB_API_KEY", "mode: offline"]),
    (["logging.wandb.project=p"], {"SHADOW": "wandb"},
     ["logging.wandb needs the wandb package", "pip install 'ftdist[wandb]'"]),
])
def test_a_tracker_that_cannot_be_used_at_the_start_is_one_message(tmp_path, setting, env, expected):
    cfg = tiny_config(tmp_path, *setting, name="refused")
    environ = {**os.environ, "HOME": str(tmp_path), **env}
    if environ.pop("SHADOW", None):  # the package missing: an import of it fails, as when not installed
        shadow = tmp_path / "shadow"
        shadow.mkdir()
        (shadow / "wandb.py").write_text("raise ImportError(\"No module named 'wandb'\")\n")
        environ["PYTHONPATH"] = f"{shadow}{os.pathsep}{REPO}"
    result = subprocess.run([sys.executable, "-m", "ftdist", "train", str(write_config(tmp_path, cfg)), "--local"],
                            cwd=REPO, capture_output=True, text=True, timeout=120, env=environ)
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr.strip()
    assert err.startswith("ftdist: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err
    assert PASSWORD not in result.stdout + result.stderr
    assert not (tmp_path / "runs" / "refused").exists()  # nothing written for a run that cannot start


def test_an_optional_tracker_that_cannot_be_reached_is_a_warning(tmp_path):
    cfg = tiny_config(tmp_path, "logging.mlflow.tracking_uri=http://127.0.0.1:1", "logging.mlflow.optional=true",
                      "logging.tensorboard=true")
    said = []
    checked = check_tracking(cfg, warn=said.append)
    assert checked.logging.mlflow is None and checked.logging.tensorboard is True
    assert len(said) == 1 and "training without it (logging.mlflow.optional)" in said[0]


def test_a_trial_that_finished_as_its_search_was_interrupted_gets_its_mlflow_run_finished(tmp_path, mlflow_server):
    """A trial killed while it wrote its final model is done (not run again) but left its MLflow
    run RUNNING and short of its last steps: the search, as it ends, sends what the run lacks
    from the trial's metrics.jsonl and marks it FINISHED."""
    from ftdist.io.storage import open_run_store
    from ftdist.tracking.mlflow_run import MlflowRun
    from ftdist.tracking.run import settle_trial_runs

    cfg = tiny_config(tmp_path, f"logging.mlflow.tracking_uri={mlflow_server.url}", "logging.mlflow.experiment=cut",
                      name="search")
    search = open_run_store(cfg)
    trial = search.local / "trial-00000"
    trial.mkdir(parents=True)
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 9)] + [{"step": 8, "eval_loss": 0.5}]
    (trial / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 9, "lo')
    run = MlflowRun(cfg.logging.mlflow, "trial-00000", {}, {}, None)
    run.log([(s, {"loss": 1.0 / s}) for s in range(1, 5)])  # the rest was still queued when it was killed
    (trial / "tracking.json").write_text(json.dumps({"mlflow": run.state()}))
    settle_trial_runs(cfg, search, [], ["trial-00000"])
    client = mlflow_server.client()
    assert client.get_run(run.run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.run_id, "loss")) == list(range(1, 9))
    assert [m.step for m in client.get_metric_history(run.run_id, "eval_loss")] == [8]
    settle_trial_runs(cfg, search, [], ["trial-00000"])  # once finished, left alone
    assert len(client.get_metric_history(run.run_id, "loss")) == 8
