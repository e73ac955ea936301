"""ftdist tune: Ray Tune trials, each a Ray Train run of one CPU worker, against the shared
local Ray.

One search serves most tests (a search costs minutes on two cores): 6 trials with ASHA,
interrupted (SIGINT) once at least one trial has finished, then run again to the end. The
rerun must leave every trial that had ended untouched and finish the others.
"""

import csv
import json
import re
import signal
from pathlib import Path

import pytest
import yaml

from ftdist.io.metrics_log import read_metrics
from tests.conftest import (
    ONE_RAY_AT_A_TIME,
    run_cli,
    start_cli,
    tiny_config,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray, ONE_RAY_AT_A_TIME]

STEPS = 16
SPACE = {
    "lora.rank": {"choice": [2, 4, 8, 16]},
    "train.lr": {"loguniform": [1.0e-4, 3.0e-2]},
    "freeze_layers": {"randint": [0, 4]},
}


def search_config(tmp_path: Path, base: Path, *extra: str, name: str = "search"):
    cfg = tiny_config(
        tmp_path, "method=lora", "model.init=null", f"model.name_or_path={base}", "lora.dropout=0",
        f"train.max_steps={STEPS}", "train.eval_every=4", "train.warmup_steps=2", "checkpoint.every_steps=8",
        "distributed.workers=1", "distributed.zero_stage=2", "distributed.max_failures=0", *extra, name="base")
    raw = cfg.model_dump(mode="json")
    raw["tune"] = {"name": name, "num_samples": 6, "metric": "eval_loss", "mode": "min", "search": "random",
                   "scheduler": {"type": "asha", "grace_period": 4, "reduction_factor": 2, "max_t": STEPS},
                   "max_concurrent_trials": 2, "space": SPACE}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path, raw


def table(text: str) -> dict[str, str]:
    """trial -> status, from the table `ftdist tune` prints."""
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^(trial-\d+)\s+(finished|stopped early \(ASHA\)|"
                                                               r"not finished|error)", text, re.M)}


def read_results(experiment: Path) -> list[dict]:
    with open(experiment / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def search(tmp_path_factory, ray_local, pretrained_base, mlflow_server):
    tmp = tmp_path_factory.mktemp("tune")
    # Every trial reports to MLflow and W&B (offline), under the search's own run.
    config, raw = search_config(tmp, pretrained_base("llama"), f"logging.mlflow.tracking_uri={mlflow_server.url}",
                                "logging.mlflow.experiment=tune", "logging.wandb.project=tune",
                                "logging.wandb.mode=offline")
    experiment = tmp / "runs" / "search"
    address = ray_local.get_runtime_context().gcs_address

    def finished_in_tune() -> bool:  # Tune has the trial's last result (not only its final model)
        return any('"finished": true' in p.read_text() for p in experiment.glob("tuner/trial-*/result.json"))

    first = start_cli("tune", str(config), "--address", address)
    try:
        wait_until(finished_in_tune, 600, "a trial to finish", first)
        first.send_signal(signal.SIGINT)
        first_out, _ = first.communicate(timeout=180)
    finally:
        if first.poll() is None:
            first.kill()
    ended_before = {t: s for t, s in table(first_out).items() if s != "not finished"}
    # Also trials that had saved their final model when the interrupt came: none is trained again.
    done = set(ended_before) | {p.parents[1].name for p in experiment.glob("trial-*/final/ftdist.json")}
    # Files, not links: W&B links each run's debug-core.log to its service's own log, in ~/.cache.
    snapshot = {p: p.read_bytes() for t in done for p in (experiment / t).glob("**/*")
                if p.is_file() and not p.is_symlink() and "ray" not in p.relative_to(experiment / t).parts}
    mtimes = {p: p.stat().st_mtime_ns for p in snapshot}

    second = run_cli("tune", str(config), "--address", address, timeout=900)
    return {"config": config, "raw": raw, "dir": experiment, "first_rc": first.returncode, "first_out": first_out,
            "ended_before": ended_before, "snapshot": snapshot, "mtimes": mtimes, "second": second,
            "address": address}


def test_interrupted_search_continues_with_the_remaining_trials_only(search):
    assert search["first_rc"] == 130, search["first_out"][-3000:]
    assert "run the same command again" in search["first_out"]
    statuses = table(search["first_out"])
    assert "not finished" in statuses.values(), statuses  # the interrupt left work for the rerun
    assert "finished" in search["ended_before"].values()

    second = search["second"]
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "continuing the experiment" in second.stdout
    rows = read_results(search["dir"])
    assert len(rows) == 6 and {r["status"] for r in rows} <= {"finished", "stopped early (ASHA)"}
    # Trials that had ended are not run again: every file they wrote is as it was.
    for path, content in search["snapshot"].items():
        assert path.read_bytes() == content and path.stat().st_mtime_ns == search["mtimes"][path], path
    for trial, status in search["ended_before"].items():
        assert next(r for r in rows if r["trial"] == trial)["status"] == status


def test_each_trial_is_a_child_run_of_the_search_in_mlflow_and_in_its_wandb_group(search, mlflow_server):
    from tests.trackers import wandb_sessions

    client = mlflow_server.client()
    runs = client.search_runs([client.get_experiment_by_name("tune").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_name == "search"
    parent = parents[0]
    assert parent.info.status == "FINISHED"  # interrupted (KILLED), continued, then finished
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"results.csv", "best.yaml", "tune.json"}
    assert parent.data.params["tune.space.lora.rank"] == '{"choice": [2, 4, 8, 16]}'
    rows = {r["trial"]: r for r in read_results(search["dir"])}
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children) == sorted(rows)  # one run per trial, a trial run again continuing its own
    for name, child in children.items():
        assert child.data.params["lora.rank"] == rows[name]["lora.rank"]  # the trial's own searched values
        assert child.data.tags["search"] == "search" and child.data.tags["searched"] == ",".join(sorted(SPACE))
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "eval_loss")]
        logged = [r["step"] for r in read_metrics(search["dir"] / name / "metrics.jsonl") if "eval_loss" in r]
        assert len(steps) == len(set(steps)) and set(steps) <= set(logged), (steps, logged)  # each step once
        if rows[name]["status"] == "finished":
            assert sorted(steps) == logged and child.info.status == "FINISHED"
        else:  # ASHA ends the trial's processes (its last records die with them); the driver ends its run
            assert child.info.status == "KILLED"
    # W&B: each finished trial's runs in the search's group, every step once. (An ASHA-stopped
    # trial's offline files die with W&B's own process, which ends with the trial's.)
    for trial in (t for t, row in rows.items() if row["status"] == "finished"):
        sessions = wandb_sessions(search["dir"] / trial)
        records = [r for session in sessions for r in session]
        header = next(r for r in records if r.get("type") == "run")["run"]
        assert header["run_group"] == "search" and header["job_type"] == "trial"

        def history(records: list[dict]) -> list[int]:
            return [r["history"]["step"]["num"] for r in records
                    if r.get("type") == "history" and "eval_loss" in r["history"]["item"]]

        steps = history(records)
        logged = [r["step"] for r in read_metrics(search["dir"] / trial / "metrics.jsonl") if "eval_loss" in r]
        assert len(steps) == len(set(steps)) and set(steps) <= set(logged), (steps, logged)  # each step once
        last = sessions[-1]
        if not any(r.get("type") == "exit" for r in last):
            # Interrupted while it wrote its final model (it is not trained again): W&B's process
            # died before it had written (and closed) the offline file; metrics.jsonl has every step.
            assert (search["dir"] / trial / "final" / "ftdist.json").is_file()
        elif len(sessions) == 1:
            assert steps == logged
        else:
            # Run again after the interrupt: the killed session's file may be cut short (W&B's process
            # died with the trial's), and the steps it had logged are not sent twice (W&B offline cannot
            # say which it kept). The last session holds every step from where it began.
            mine = history(last)
            assert not mine or mine == [s for s in logged if s >= mine[0]], (mine, logged)


def test_asha_stops_some_trials_early(search):
    rows = read_results(search["dir"])
    stopped = [r for r in rows if r["asha_stopped"] == "yes"]
    finished = [r for r in rows if r["status"] == "finished"]
    assert stopped and finished, rows
    assert all(int(r["steps"]) < STEPS for r in stopped)  # read from what the trials did
    assert all(int(r["steps"]) == STEPS for r in finished)
    for row in stopped:  # a stopped trial has no final model; a finished one has
        assert not (search["dir"] / row["trial"] / "final").exists()
    for row in finished:
        assert (search["dir"] / row["trial"] / "final" / "ftdist.json").is_file()


def test_best_trial_is_the_table_minimum_and_best_yaml_retrains_it(search, tmp_path):
    rows = read_results(search["dir"])
    metrics = [float(r["eval_loss"]) for r in rows]
    assert metrics == sorted(metrics)  # the table is sorted by the metric
    summary = json.loads((search["dir"] / "tune.json").read_text())
    best = summary["best"]
    assert best["metric"] == pytest.approx(min(metrics)) and best["trial"] == rows[0]["trial"]
    assert f"best: {best['trial']}" in search["second"].stdout
    for png in ("eval_curves.png", "metric_vs_params.png"):
        assert (search["dir"] / png).stat().st_size > 10_000

    best_yaml = yaml.safe_load((search["dir"] / "best.yaml").read_text())
    assert "tune" not in best_yaml
    trial_cfg = yaml.safe_load((search["dir"] / best["trial"] / "config.yaml").read_text())
    for key, value in best["params"].items():
        section, _, leaf = key.rpartition(".")
        assert (best_yaml[section][leaf] if section else best_yaml[leaf]) == value
        assert (trial_cfg[section][leaf] if section else trial_cfg[leaf]) == value

    # `ftdist train best.yaml` as it is: the same training, so the same loss (up to float noise).
    # In local mode, which trains the same as one Ray worker (test_distributed) in a third of the time.
    result = run_cli("train", str(search["dir"] / "best.yaml"), "--local", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    retrained = json.loads((Path(best_yaml["run"]["output"]) / best_yaml["run"]["name"] / "summary.json").read_text())
    assert retrained["eval_loss"] == pytest.approx(best["metric"], rel=0.02)


def test_freeze_layers_changes_each_trials_trainable_parameters(search):
    rows = read_results(search["dir"])
    layers = 4
    freezes = {int(r["freeze_layers"]) for r in rows}
    assert len(freezes) >= 2, rows  # the seeded random search samples several depths
    # LoRA on every linear layer of every unfrozen block: trainable = unit x rank x unfrozen blocks
    units = {int(r["trainable_params"]) / (int(r["lora.rank"]) * (layers - int(r["freeze_layers"]))) for r in rows}
    assert len(units) == 1, rows
    by_freeze = {}
    for r in rows:
        by_freeze.setdefault(int(r["lora.rank"]), {})[int(r["freeze_layers"])] = int(r["trainable_params"])
    for counts in by_freeze.values():  # the same rank, deeper freezing: fewer trainable parameters
        ordered = [counts[f] for f in sorted(counts)]
        assert ordered == sorted(ordered, reverse=True) and len(set(ordered)) == len(ordered)


@pytest.mark.parametrize("entry, named", [
    ({"lora.rnk": {"choice": [4, 8]}}, "lora.rnk"),
    ({"lora.rank": {"choice": []}}, "tune.space.lora.rank"),
    ({"train.lr": {"loguniform": [1.0e-3, 1.0e-5]}}, "tune.space.train.lr"),
    ({"freeze_layers": {"randint": [0, 9]}}, "tune.space.freeze_layers"),
    ({"data.max_length": {"choice": [64, 128]}}, "data.max_length"),
])
def test_a_bad_search_space_is_refused_before_any_trial_naming_the_key(tmp_path, pretrained_base, entry, named):
    config, raw = search_config(tmp_path, pretrained_base("llama"))
    raw["tune"]["space"] = {**SPACE, **entry}
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = run_cli("tune", str(config), timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert named in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs" / "search").exists()  # nothing started


