"""One trial: the experiment's config with the trial's parameters, run as one Ray Train job
(Train V2: this function builds and fits a TorchTrainer) in <run.output>/<tune.name>/<trial>/.

Each evaluation of the loop reaches Tune through `ReportEvaluations`, which adds the search
metric; ASHA stops a trial by ending this function's actor, which takes its Train run with
it. A trial that runs again (the experiment was interrupted) resumes from its own newest
complete checkpoint, as `ftdist train` does.
"""

from __future__ import annotations

from typing import Any, Optional

from ray.tune.integration.ray_train import TuneReportCallback

from ftdist.config.schema import Config
from ftdist.io.quiet import quiet_libraries
from ftdist.launch.ray_train import fit, worker_config
from ftdist.launch.rundir import is_finished, prepare_run_dir, read_summary
from ftdist.tune.space import with_params

FINISHED = "finished"  # in the trial's last result: its Train run ended by itself, with a final model


class ReportEvaluations(TuneReportCallback):
    """Forwards the evaluations (not other reports) to Tune, with the search metric added."""

    def __init__(self, metric: str, forgetting_weight: float):
        super().__init__()
        self.metric, self.forgetting_weight = metric, forgetting_weight

    def after_report(self, run_context, metrics: list[dict], checkpoint=None) -> None:
        result = dict(metrics[0])
        if "eval_loss" not in result or result.get("step", 0) == 0:
            return  # the baseline at step 0 is the same for every trial: not a result
        if result["step"] >= result.get("total_steps", float("inf")):
            # The last evaluation reaches Tune once, as the trial's final result (after its final
            # model is saved): ASHA's top rung can never cut a trial that has trained every step.
            return
        super().after_report(run_context, [with_metric(result, self.metric, self.forgetting_weight)], None)


def with_metric(result: dict, metric: str, forgetting_weight: float) -> dict:
    if metric == "eval_loss_plus_forgetting":
        result = {**result, metric: result["eval_loss"] + forgetting_weight * result.get("forgetting", 0.0)}
    return result


def trial_config(experiment: dict, params: dict[str, Any], trial_name: str) -> Config:
    """The config this trial trains: the experiment's, its parameters, its own run directory,
    and the experiment's shared base model."""
    raw = with_params(experiment["raw_config"], params)
    raw["run"] = {"name": trial_name, "output": experiment["tune_url"]}
    raw["model"] = {**raw["model"], **experiment["model_source"]}
    if experiment.get("classification_labels"):
        raw["classification"] = {**raw.get("classification", {}), "labels": experiment["classification_labels"]}
    raw.pop("tune", None)
    return Config.model_validate(raw)


def run_trial(params: dict[str, Any], experiment: Optional[dict] = None, datasets: Optional[dict] = None) -> dict:
    """The Tune trainable (through tune.with_parameters, which ships `experiment` and the
    shared datasets once)."""
    from ray import tune

    quiet_libraries()
    cfg = trial_config(experiment, params, tune.get_context().get_trial_name())
    # The trial's directory: resumed if it exists; written under the search's lock.
    store = prepare_run_dir(cfg, restart=False, trial=True)
    t = experiment["tune"]
    if not is_finished(store):
        group = {**experiment["tracking_group"], "searched": params}  # its tracker runs join the search's
        fit(cfg, store, worker_config(cfg, store, experiment["data_stats"], experiment["split_in_workers"],
                                      show_progress=False, tracking_group=group),
            datasets, experiment["use_gpu"], callbacks=[ReportEvaluations(t["metric"], t["forgetting_weight"])])
    # The last result: the final evaluation again, marked finished (ASHA-stopped trials never get here).
    summary = read_summary(store)
    final = {"step": summary["steps"], "tokens_seen": summary["tokens_seen"],
             "trainable_params": summary["trainable_params"], FINISHED: True}
    # Every final evaluation figure a search may rank by: eval_loss, a classifier's accuracy and
    # macro-F1, preference pairs' reward accuracy and margin; and the forgetting.
    final.update({k: v for k, v in summary.items() if (k.startswith("eval_") or k == "forgetting")
                  and isinstance(v, (int, float)) and not isinstance(v, bool)})
    return with_metric(final, t["metric"], t["forgetting_weight"])
