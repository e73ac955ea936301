"""Objectives as a room (ftdist.objectives): the registry resolves a config to its objective (the
built-ins, or a class of your own by import path), every bad path is one config message, and a
user's own objective (docs/examples/focal.py, the code docs/objectives.md shows) trains through
the real loop, resumes from its checkpoint and is reported like the built-ins."""

import json
import shutil
import sys
from pathlib import Path

import pytest

from ftdist.cli import main
from ftdist.errors import UserError
from ftdist.io.metrics_log import read_metrics
from tests.conftest import run_cli_probed, tiny_config, write_config

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "docs" / "examples" / "focal.py"
DOCS = ROOT / "docs" / "objectives.md"
TINY = ("model.init.hidden_size=32", "model.init.num_layers=2", "train.max_steps=4", "train.eval_every=2",
        "train.warmup_steps=1", "train.log_every=1", "checkpoint.every_steps=2")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The directory ftdist runs from, holding focal.py (as a user's would)."""
    shutil.copy(EXAMPLE, tmp_path / "focal.py")
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("focal", None)  # the next test imports its own copy


def test_the_built_ins_resolve_by_objective_and_task(tmp_path):
    from ftdist.objectives.registry import resolve
    from ftdist.objectives.classification import Classification
    from ftdist.objectives.dpo import Dpo
    from ftdist.objectives.sft import Sft

    assert type(resolve(tiny_config(tmp_path))) is Sft
    dpo = tiny_config(tmp_path, "objective=dpo", "data.format=auto")
    assert type(resolve(dpo)) is Dpo and dpo.row_length == 2 * dpo.data.max_length
    classifier = tiny_config(tmp_path, "task=classification", "data.format=auto")
    assert type(resolve(classifier)) is Classification and classifier.row_shape == "labels"
    # Tune's default metric and mode come from the objective (eval_loss, min for the built-ins).
    raw = tiny_config(tmp_path).model_dump(mode="json", exclude_none=True)
    raw["tune"] = {"name": "s", "space": {"train.lr": {"choice": [1e-3, 2e-3]}}}
    from ftdist.config.load import validate_config

    assert (validate_config(raw).tune.metric, validate_config(raw).tune.mode) == ("eval_loss", "min")


def test_a_class_by_import_path_from_the_working_directory(workdir):
    from ftdist.objectives.registry import resolve

    cfg = tiny_config(workdir, "objective=focal:FocalLoss", "objective_args.gamma=1.5")
    objective = resolve(cfg)
    assert type(objective).__name__ == "FocalLoss" and objective.args.gamma == 1.5
    assert str(workdir) not in sys.path  # on the path only while imported
    raw = cfg.model_dump(mode="json", exclude_none=True)
    raw["tune"] = {"name": "s", "space": {"train.lr": {"choice": [1e-3, 2e-3]}}}
    from ftdist.config.load import validate_config

    # Its first metric, higher is better: what Tune optimises unless tune.metric says otherwise.
    assert (validate_config(raw).tune.metric, validate_config(raw).tune.mode) == ("eval_target_prob", "max")
    raw["tune"]["metric"], raw["tune"]["mode"] = "eval_target_prob", "min"
    with pytest.raises(UserError, match="higher is better, so set tune.mode: max"):
        validate_config(raw)


BROKEN = "import nonexistent_package_for_ftdist\n"
NOT_AN_OBJECTIVE = "class Plain:\n    pass\n"
BAD_METRICS = ("from ftdist.objectives.base import ObjectiveBase\n\n\nclass Sideways(ObjectiveBase):\n"
               "    metrics = {'eval_loss': 'lower'}\n")


@pytest.mark.parametrize("overrides, said", [
    (["objective=sfft"], "objective: 'sfft' is neither a built-in objective (sft, dpo, grpo) nor a class by import path "
                         "(module:Class, e.g. mypkg.losses:MyObjective); did you mean sft?"),
    (["objective=nowhere.losses:Mine"], "objective: no module nowhere.losses in the working directory"),
    (["objective=focal:FocalLos"], "objective: module focal ("),
    (["objective=focal:FocalArgs"], "objective: focal:FocalArgs is not an objective: it lacks name, section"),
    (["objective=plain:Plain"], "objective: plain:Plain is not an objective: it lacks"),
    (["objective=sideways:Sideways"], "each metric is 'min' or 'max' (lower or higher is better), not eval_loss: "
                                      "'lower'"),
    (["objective=broken:Anything"], "objective: importing broken failed: it imports nonexistent_package_for_ftdist, "
                                    "which is not installed"),
    (["objective=focal:FocalLoss", "objective_args.gama=1"], "  objective_args: gama: unknown key; did you mean gamma?"),
    (["objective=focal:FocalLoss", "objective_args.gamma=-1"], "  objective_args: gamma: Input should be greater "
                                                               "than or equal to 0 (got -1)"),
    (["objective_args.gamma=1"], "objective sft takes no objective_args (given gamma); remove objective_args"),
    (["objective=dpo", "data.format=auto", "objective_args.beta=1"], "objective dpo takes no objective_args (given beta): its settings are under dpo:"),
])
def test_each_bad_objective_is_one_config_message_and_exit_2(workdir, capsys, overrides, said):
    (workdir / "broken.py").write_text(BROKEN)
    (workdir / "plain.py").write_text(NOT_AN_OBJECTIVE)
    (workdir / "sideways.py").write_text(BAD_METRICS)
    config = write_config(workdir, tiny_config(workdir))
    args = [arg for item in overrides for arg in ("--set", item)]
    assert main(["train", str(config), "--local", *args]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err, err
    assert "objective" in err
    if overrides == ["objective=focal:FocalLos"]:
        assert "did you mean focal:FocalLoss?" in err


def test_resolving_an_objective_to_refuse_a_config_imports_no_heavy_library(tmp_path):
    """Config validation asks the built-ins (their rows, formats, metrics) without torch."""
    config = write_config(tmp_path, tiny_config(tmp_path, "objective=dpo", "data.format=auto"))
    for bad, said in (("tune={name: s, metric: eval_accuracy, space: {train.lr: {choice: [0.1, 0.2]}}}",
                        "tune.metric eval_accuracy is not a metric of objective dpo (it is one of classification's: "
                        "set task: classification)"),
                       ("data.format=prompt_completion", "objective dpo trains on preference rows"),
                       ("objective=nowhere:Mine", "objective: no module nowhere")):
        result, loaded = run_cli_probed("train", str(config), "--local", "--set", bad)
        assert result.returncode == 2 and said in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert loaded == set(), (bad, loaded)


def run_config(workdir: Path, *more: str):
    return tiny_config(workdir, *TINY, "objective=focal:FocalLoss", "objective_args.gamma=2", *more)


def test_your_own_objective_trains_resumes_and_is_reported(workdir, capsys):
    """focal.py through the real loop: stopped after its first step (a checkpoint there), resumed
    by `ftdist train --local` to the curve of the same run made whole; its metric logged at
    every step and evaluation, in summary.json, the CLI's lines and `ftdist report`."""
    from ftdist.launch.local import train_local
    from ftdist.training.notice import StopNotice, StoppedOnNotice

    train_local(run_config(workdir, "run.name=whole"), show_progress=False)
    whole = read_metrics(workdir / "runs" / "whole" / "metrics.jsonl")

    notice = StopNotice()
    notice.request("a test's stop")
    with pytest.raises(StoppedOnNotice):
        train_local(run_config(workdir, "run.name=stopped"), show_progress=False, notice=notice)
    config = write_config(workdir, run_config(workdir, "run.name=stopped"))
    capsys.readouterr()
    assert main(["train", str(config), "--local"]) == 0
    out = capsys.readouterr().out
    run_dir = workdir / "runs" / "stopped"
    resumed = read_metrics(run_dir / "metrics.jsonl")
    assert any(r.get("event") == "resume" for r in resumed)

    def curve(records, key):
        return [(r["step"], r[key]) for r in records if key in r]

    for key in ("loss", "target_prob", "eval_loss", "eval_target_prob"):
        assert curve(resumed, key) and curve(resumed, key) == pytest.approx(curve(whole, key), rel=1e-5), key
    assert [s for s, _ in curve(resumed, "eval_target_prob")] == [0, 2, 4]
    assert all(0 < v < 1 for _, v in curve(resumed, "target_prob"))
    assert "eval_ppl" not in json.dumps(resumed)  # its metrics, not sft's

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_target_prob"] == curve(resumed, "eval_target_prob")[-1][1]
    assert f"  eval_target_prob: {summary['eval_target_prob']:.4f}" in out
    assert "step 4: eval loss" in out and ", target prob " in out

    assert main(["report", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["eval_target_prob"] == summary["eval_target_prob"]
    assert "eval_target_prob" in capsys.readouterr().out


def test_the_docs_show_the_example_as_it_is():
    """docs/objectives.md shows focal.py whole: the code the tests train cannot drift from it."""
    assert EXAMPLE.read_text().strip() in DOCS.read_text()
