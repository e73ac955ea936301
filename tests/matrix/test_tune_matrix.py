"""`make test-all`: the searches beyond tests/e2e/test_tune.py's one: TPE (Optuna) over a mixture's
weight with the experiment in the S3 server, a SIGKILLed search driver resumed by the same command,
and searches by a higher-is-better metric (a classifier's accuracy, DPO's reward accuracy)."""

import csv
import json
import signal

import pytest
import yaml

from ftdist.io.metrics_log import read_metrics
from tests.conftest import (
    DEMO,
    ONE_RAY_AT_A_TIME,
    paused,
    ray_session_dir,
    run_cli,
    start_cli,
    tiny_config,
    train_worker_pids,
    wait_until,
)
from tests.e2e.test_tune import SPACE, read_results, search_config

pytestmark = [pytest.mark.slow, pytest.mark.ray, ONE_RAY_AT_A_TIME]


@pytest.mark.s3
def test_optuna_search_on_object_storage_over_a_mixtures_weight(tmp_path, ray_local, pretrained_base, s3):
    """TPE over the learning rate, the second source's weight of a two-source mixture and the
    L2-SP weight, by eval loss plus forgetting, the experiment in the S3 server: each trial
    trains on its own shares of the same prepared rows, pulled to the base by its own weight."""
    config, raw = search_config(tmp_path, pretrained_base("llama"), f"data.retention={DEMO / 'general.txt'}",
                                name="tpe")
    raw["data"]["train"] = [{"path": str(DEMO / "train.jsonl"), "weight": 0.7},
                            {"path": str(DEMO / "text.jsonl"), "weight": 0.3}]
    raw["tune"]["space"] = {"train.lr": SPACE["train.lr"], "data.train.1.weight": {"uniform": [0.1, 0.5]},
                            "regularization.l2sp": {"loguniform": [0.1, 10.0]}}
    raw["tune"].update(metric="eval_loss_plus_forgetting", forgetting_weight=1.0)
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    overrides = [f"--set={o}" for o in s3.overrides()]
    result = run_cli("tune", str(config), "--address", ray_local.get_runtime_context().gcs_address, *overrides,
                     "--set=tune.search=optuna", "--set=tune.num_samples=2", "--set=tune.scheduler.type=none",
                     "--set=train.max_steps=8", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    listing = {p.split("/tpe/", 1)[1] for p in s3.fs.find(s3.url("runs", "tpe"))}
    for name in ("results.csv", "best.yaml", "tune.json", "eval_curves.png", "metric_vs_params.png"):
        assert name in listing
    trials = {p.split("/")[0] for p in listing if p.startswith("trial-")}
    assert len(trials) == 2 and all(f"{t}/final/ftdist.json" in listing for t in trials)
    assert any(p.startswith("tuner/") for p in listing)  # Tune's own state, for a rerun anywhere
    summary = json.loads(s3.fs.cat_file(s3.url("runs", "tpe", "tune.json")))
    assert summary["by_status"] == {"finished": 2} and summary["best"]["final_model"].startswith("s3://")
    rows = list(csv.DictReader(s3.fs.cat_file(s3.url("runs", "tpe", "results.csv")).decode().splitlines()))
    weights = {r["trial"]: float(r["data.train.1.weight"]) for r in rows}
    assert len(set(weights.values())) == 2 and all(0.1 <= w <= 0.5 for w in weights.values())
    for row in rows:  # what each trial trained on: its own weight's share, its own pull to the base
        trial, weight = row["trial"], weights[row["trial"]]
        summary = json.loads(s3.fs.cat_file(s3.url("runs", "tpe", trial, "summary.json")))
        sources = summary["data_sources"]
        assert sources[1]["weight"] == pytest.approx(weight)
        assert sources[1]["share"] == pytest.approx(weight / (0.7 + weight), abs=1e-6)
        trial_cfg = yaml.safe_load(s3.fs.cat_file(s3.url("runs", "tpe", trial, "config.yaml")))
        assert trial_cfg["regularization"]["l2sp"] == pytest.approx(float(row["regularization.l2sp"]))
        log = [json.loads(x) for x in s3.fs.cat_file(s3.url("runs", "tpe", trial, "metrics.jsonl")).decode().splitlines()]
        penalties = [r["penalty"] for r in log if "penalty" in r]
        assert len(penalties) == 8 and penalties[-1] > 0
        assert float(row["eval_loss_plus_forgetting"]) == pytest.approx(summary["eval_loss"] + summary["forgetting"])


def test_a_sigkilled_search_driver_resumes_with_the_same_command(tmp_path, ray_local, pretrained_base):
    """The driver SIGKILLed (no Ctrl-C handler runs: a preempted node, an OOM kill) once one
    trial has finished and the next has a complete checkpoint: the same command again keeps the
    finished trial's files byte for byte and resumes the running one from its checkpoint."""
    steps = 8
    config, raw = search_config(tmp_path, pretrained_base("llama"), f"train.max_steps={steps}",
                                "checkpoint.every_steps=2", name="killed")
    raw["tune"].update(num_samples=2, max_concurrent_trials=1, scheduler={"type": "none"})
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    experiment = tmp_path / "runs" / "killed"
    address = ray_local.get_runtime_context().gcs_address

    def finished_and_checkpointed():
        finals = {p.parents[1].name for p in experiment.glob("trial-*/final/ftdist.json")}
        running = [p.parents[2].name for p in experiment.glob("trial-*/checkpoints/step-*/COMPLETE")
                   if p.parents[2].name not in finals]
        return (finals, running[0]) if finals and running else None

    first = start_cli("tune", str(config), "--address", address)
    try:
        finals, running = wait_until(finished_and_checkpointed, 600, "a finished trial and a checkpointed one", first)
        with paused(train_worker_pids(ray_session_dir())):  # the running trial cannot finish before its driver is gone
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == -signal.SIGKILL
    snapshot = {p: p.read_bytes() for t in finals for p in (experiment / t).glob("**/*") if p.is_file()}

    second = run_cli("tune", str(config), "--address", address, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "continuing the experiment" in second.stdout
    rows = read_results(experiment)
    assert len(rows) == 2 and {r["status"] for r in rows} == {"finished"}
    for path, content in snapshot.items():  # the finished trial: not trained again, not touched
        assert path.read_bytes() == content, path
    records = read_metrics(experiment / running / "metrics.jsonl")
    resumes = [r for r in records if r.get("event") == "resume"]
    assert resumes and resumes[0]["checkpoint"].startswith("step-")  # from its checkpoint, not from step 0
    assert [r["step"] for r in records if "loss" in r] == list(range(1, steps + 1))  # every step once


def search_highest(tmp_path, ray_local, cfg, name: str, metric: str, space: dict) -> list[dict]:
    """A search of 2 trials by a higher-is-better `metric`: its results rows, checked to be
    ranked best first, and the best trial's in tune.json."""
    raw = cfg.model_dump(mode="json")
    raw["tune"] = {"name": name, "num_samples": 2, "metric": metric, "mode": "max", "search": "random",
                   "scheduler": {"type": "none"}, "max_concurrent_trials": 2, "space": space}
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = run_cli("tune", str(config), "--address", ray_local.get_runtime_context().gcs_address, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_results(tmp_path / "runs" / name)
    values = [float(r[metric]) for r in rows]
    assert len(rows) == 2 and values == sorted(values, reverse=True)  # the best first
    best = json.loads((tmp_path / "runs" / name / "tune.json").read_text())["best"]
    assert best["trial"] == rows[0]["trial"] and best["metric"] == pytest.approx(max(values))
    return rows


def test_a_classifier_search_by_eval_accuracy_picks_the_highest(tmp_path, ray_local):
    """tune.metric eval_accuracy, mode max: every trial's head gets the labels preflight read
    from the rows, Tune ranks trials by accuracy, and the best is the highest."""
    from tests.unit.test_classification import topic_rows, write_rows

    train, eval_ = write_rows(tmp_path / "t.jsonl", topic_rows(64, 0)), write_rows(tmp_path / "e.jsonl", topic_rows(16, 1))
    cfg = tiny_config(tmp_path, "task=classification", f"data.train={train}", f"data.eval={eval_}", "data.packing=false",
                      "method=lora", "train.max_steps=8", "train.eval_every=4", "distributed.workers=1",
                      "distributed.max_failures=0", name="base")
    rows = search_highest(tmp_path, ray_local, cfg, "classify", "eval_accuracy",
                          {"train.lr": {"loguniform": [1.0e-3, 3.0e-2]}})
    for row in rows:  # each trial's head over the labels read from the rows
        final = json.loads((tmp_path / "runs" / "classify" / row["trial"] / "final" / "ftdist.json").read_text())
        assert final["classification"]["labels"] == ["digits", "english"]


def test_a_preference_search_by_eval_reward_accuracy_picks_the_highest(tmp_path, ray_local, pretrained_base):
    """tune.metric eval_reward_accuracy, mode max, over dpo.beta and the learning rate: each
    trial a DPO run (adapters off for the reference); Tune ranks trials by reward accuracy."""
    from tests.unit.test_preference import dpo_config

    cfg = dpo_config(tmp_path, pretrained_base("llama"), "method=lora", "train.eval_every=4", "distributed.workers=1",
                     "distributed.max_failures=0", name="base", steps=8)
    rows = search_highest(tmp_path, ray_local, cfg, "prefer", "eval_reward_accuracy",
                          {"train.lr": {"loguniform": [1.0e-4, 2.0e-2]}, "dpo.beta": {"choice": [0.1, 0.5]}})
    assert float(rows[0]["eval_reward_accuracy"]) > 0
    for row in rows:  # each trial's own beta, its rewards logged as it trained
        trial = tmp_path / "runs" / "prefer" / row["trial"]
        snapshot = yaml.safe_load((trial / "config.yaml").read_text())
        assert snapshot["objective"] == "dpo" and snapshot["dpo"]["beta"] == float(row["dpo.beta"])
        assert any("reward_accuracy" in json.loads(line) for line in (trial / "metrics.jsonl").read_text().splitlines())
