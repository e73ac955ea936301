"""What a person reads after a search: the table (printed, results.csv), best.yaml (the best
trial's whole config, for `ftdist train`), tune.json, and plots: eval_curves.png (every
trial's eval loss; stopped trials end early) and metric_vs_params.png (the metric against
each searched key)."""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from ftdist.artifacts.report import _pyplot as pyplot
from ftdist.config.schema import Config
from ftdist.io import safewrite
from ftdist.io.layout import SEARCH_OUTPUTS
from ftdist.tracking.run import settle_trial_runs
from ftdist.tune.experiment import Experiment
from ftdist.tune.space import with_params
from ftdist.tune.trial import FINISHED

FINISHED_STATUS, STOPPED_STATUS = "finished", "stopped early (ASHA)"


@dataclass
class TrialRow:
    trial: str
    status: str  # finished | stopped early (ASHA) | error | not finished
    params: dict[str, Any]
    trainable_params: Optional[int]
    steps: int
    metric: Optional[float]
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, eval loss)
    error: Optional[str] = None


def collect(experiment: Experiment, results) -> list[TrialRow]:
    """One row per trial, best first (by the metric; trials without one last)."""
    t = experiment.cfg.tune
    rows = []
    for result in results:
        last = result.metrics or {}
        history = result.metrics_dataframe
        curve = []
        if history is not None and "eval_loss" in history:
            seen = {int(s): float(v) for s, v in zip(history["step"], history["eval_loss"]) if not _missing(v)}
            curve = sorted(seen.items())
        if result.error is not None:
            status = "error"
        elif last.get(FINISHED):
            status = FINISHED_STATUS
        elif last.get("done"):  # Tune ended it on the scheduler's decision
            status = STOPPED_STATUS if t.scheduler.type == "asha" else "stopped"
        else:
            status = "not finished"
        rows.append(TrialRow(
            trial=result.path.rstrip("/").rsplit("/", 1)[-1], status=status,
            params={k: (result.config or {}).get(k) for k in t.space}, trainable_params=last.get("trainable_params"),
            steps=int(last.get("step", 0) or 0), metric=last.get(t.metric), curve=curve,
            error=str(result.error).strip().splitlines()[-1] if result.error is not None else None))
    sign = 1 if t.mode == "min" else -1
    return sorted(rows, key=lambda r: (r.metric is None, sign * (r.metric or 0.0), r.trial))


def best_row(rows: list[TrialRow]) -> Optional[TrialRow]:
    """The best trial that finished (a stopped trial has no final model to use)."""
    return next((r for r in rows if r.status == FINISHED_STATUS), None)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def columns(cfg: Config) -> list[str]:
    return ["trial", "status", *cfg.tune.space, "trainable_params", "steps", "asha_stopped", cfg.tune.metric]


def table_rows(cfg: Config, rows: list[TrialRow]) -> list[list[Any]]:
    return [[r.trial, r.status, *(r.params[k] for k in cfg.tune.space), r.trainable_params, r.steps,
             "yes" if r.status == STOPPED_STATUS else "no", r.metric] for r in rows]


def format_table(cfg: Config, rows: list[TrialRow]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e-2 else f"{value:.4f}"
        return "-" if value is None else (f"{value:,}" if isinstance(value, int) else str(value))

    header = columns(cfg)
    body = [[cell(v) for v in row] for row in table_rows(cfg, rows)]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def csv_text(cfg: Config, rows: list[TrialRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns(cfg))
    writer.writerows(table_rows(cfg, rows))
    return out.getvalue()


def best_config(experiment: Experiment, best: TrialRow) -> dict:
    """The user's config with the best trial's values: a plain `ftdist train` config."""
    raw = with_params(experiment.raw, best.params)
    raw.pop("tune", None)
    raw["run"] = {**raw["run"], "name": f"{experiment.cfg.tune.name}-best"}
    Config.model_validate(raw)  # what best.yaml says trains as it is
    return raw


def write_report(experiment: Experiment, rows: list[TrialRow]) -> dict:
    """results.csv, best.yaml, tune.json and the plots into the experiment's directory."""
    cfg, store = experiment.cfg, experiment.store
    local = store.local
    local.mkdir(parents=True, exist_ok=True)
    safewrite.write_text(local / "results.csv", local, "the search's results", csv_text(cfg, rows))
    written = ["results.csv", plot_curves(cfg, rows, local), plot_metric_vs_params(cfg, rows, local)]
    best = best_row(rows)
    summary = {
        "name": cfg.tune.name, "metric": cfg.tune.metric, "mode": cfg.tune.mode, "trials": len(rows),
        "by_status": {s: sum(r.status == s for r in rows) for s in sorted({r.status for r in rows})},
        "best": None,
    }
    if best is not None:
        safewrite.write_text(
            local / "best.yaml", local, "the search's best config",
            f"# The best trial of tune {cfg.tune.name} ({best.trial}, {cfg.tune.metric} {best.metric:.4f}).\n"
            f"# Train it again with: ftdist train best.yaml\n"
            + yaml.safe_dump(best_config(experiment, best), sort_keys=False))
        written.append("best.yaml")
        summary["best"] = {"trial": best.trial, "metric": best.metric, "params": best.params,
                           "trainable_params": best.trainable_params, "config": store.path("best.yaml"),
                           "final_model": store.path(f"{best.trial}/final")}
    safewrite.write_text(local / "tune.json", local, "the search's summary", json.dumps(summary, indent=2))
    for rel in [*written, "tune.json"]:
        store.upload(rel)
    return summary


def _pyplot():
    return pyplot()


def plot_curves(cfg: Config, rows: list[TrialRow], out_dir) -> str:
    """eval_curves.png: each trial's eval loss by step; a stopped trial's line ends with an x."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for row in sorted(rows, key=lambda r: r.trial):
        if not row.curve:
            continue
        steps, losses = zip(*row.curve)
        stopped = row.status != FINISHED_STATUS
        line, = ax.plot(steps, losses, "--" if stopped else "-", marker="o", markersize=3,
                        label=f"{row.trial} ({row.status})")
        if stopped:
            ax.plot(steps[-1], losses[-1], "x", color=line.get_color(), markersize=10, markeredgewidth=2)
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss (nats/token)")
    ax.set_title(f"tune {cfg.tune.name}: eval loss per trial (x: stopped early)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    safewrite.save_figure(fig, out_dir / "eval_curves.png")
    plt.close(fig)
    return "eval_curves.png"


def plot_metric_vs_params(cfg: Config, rows: list[TrialRow], out_dir) -> str:
    """metric_vs_params.png: one panel per searched key (e.g. lr, rank, freeze depth)."""
    plt = _pyplot()
    keys = list(cfg.tune.space)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for status, marker in ((FINISHED_STATUS, "o"), (STOPPED_STATUS, "x")):
            points = [(r.params[key], r.metric) for r in rows if r.status == status and r.metric is not None]
            if points:
                xs, ys = zip(*points)
                if not all(isinstance(x, (int, float)) for x in xs):
                    xs = [str(x) for x in xs]
                ax.scatter(xs, ys, marker=marker, label=status)
        spec = cfg.tune.space[key]
        if spec.kind == "loguniform":
            ax.set_xscale("log")
        elif spec.kind == "randint" or all(isinstance(v, int) for v in (spec.choice or [0.5])):
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(key)
        ax.set_ylabel(cfg.tune.metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"tune {cfg.tune.name}: {cfg.tune.metric} ({cfg.tune.mode}) by parameter")
    fig.tight_layout()
    safewrite.save_figure(fig, out_dir / "metric_vs_params.png")
    plt.close(fig)
    return "metric_vs_params.png"


def end_search_tracking(experiment: Experiment, rows: list[TrialRow], summary: dict, interrupted: bool) -> None:
    """The search's own tracker runs: the best metric, the results files as artifacts, then
    ended (KILLED while trials are left: the same command continues them). Trials ASHA
    stopped were ended with their processes, before they could end their tracker runs:
    their MLflow runs are marked KILLED from here; trials that finished as the search was
    interrupted, before they had ended theirs, are finished from here."""
    best = summary["best"]
    if best is not None:
        experiment.tracking.log({"step": 0, f"best_{experiment.cfg.tune.metric}": best["metric"]})
    settle_trial_runs(experiment.cfg, experiment.store, [r.trial for r in rows if r.status == STOPPED_STATUS],
                      [r.trial for r in rows if r.status == FINISHED_STATUS])
    local = experiment.store.local
    experiment.tracking.end("KILLED" if interrupted else "FINISHED", [local / name for name in SEARCH_OUTPUTS])
