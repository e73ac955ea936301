"""Plots and a summary from a run's metrics.jsonl.

  loss.png         training loss per step, eval loss at each evaluation
  forgetting.png   (runs with data.retention) the trade-off: the task's eval loss falling while
                   the loss on general text rises above its value before training
  rewards.png      (objective dpo) the rewards of chosen and rejected responses, and the reward
                   accuracy, per step and at each evaluation
  lr.png, throughput.png (ftdist report)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ftdist.errors import UserError, path_problem
from ftdist.io import safewrite
from ftdist.io.layout import METRICS, REPORT, SNAPSHOT, SUMMARY
from ftdist.io.metrics_log import read_metrics, series
from ftdist.objectives.registry import load, name_of


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: Path) -> list[Path]:
    """The plots a run writes when it finishes: loss.png, forgetting.png with data.retention,
    rewards.png for preference tuning and for learning from rewards (grpo)."""
    return [plot for plot in (plot_loss(run_dir), plot_forgetting(run_dir), plot_rewards(run_dir),
                              plot_sampled_rewards(run_dir)) if plot]


def plot_loss(run_dir: Path) -> Path:
    """loss.png: training loss per step, eval loss at each evaluation."""
    plt = _pyplot()
    records = read_metrics(run_dir / METRICS)
    fig, ax = plt.subplots(figsize=(7, 4))
    train_steps, train_loss = series(records, "loss")
    ax.plot(train_steps, train_loss, label="train loss", linewidth=1)
    eval_steps, eval_loss = series(records, "eval_loss")
    if eval_steps:
        ax.plot(eval_steps, eval_loss, "o-", label="eval loss")
    losses = [v for v in train_loss + eval_loss if v > 0]
    if losses and max(losses) / min(losses) > 20:  # a curve that falls far reads better on a log scale
        ax.set_yscale("log")
    unit = "DPO loss (per pair)" if any("reward_accuracy" in r for r in records) else \
        "GRPO loss (clipped policy gradient)" if any("reward_std" in r for r in records) else "cross-entropy (nats/token)"
    return save_loss_figure(plt, fig, ax, run_dir.name, run_dir / "loss.png", unit)


def plot_rewards(run_dir: Path) -> Optional[Path]:
    """rewards.png: chosen's and rejected's rewards, and the reward accuracy; None for runs
    that are not preference tuning."""
    records = read_metrics(run_dir / METRICS)
    if not any("reward_accuracy" in r for r in records):
        return None
    plt = _pyplot()
    fig, (rewards, accuracy) = plt.subplots(1, 2, figsize=(11, 4))
    for key, color in (("rewards_chosen", "tab:green"), ("rewards_rejected", "tab:red")):
        rewards.plot(*series(records, key), color=color, linewidth=1, label=key.replace("_", " "))
        rewards.plot(*series(records, f"eval_{key}"), "o--", color=color, label=f"eval {key.replace('_', ' ')}")
    rewards.axhline(0, color="gray", linewidth=0.8)
    rewards.set_ylabel("reward: beta x (log-prob - reference's)")
    accuracy.plot(*series(records, "reward_accuracy"), linewidth=1, label="reward accuracy")
    accuracy.plot(*series(records, "eval_reward_accuracy"), "o-", label="eval reward accuracy")
    accuracy.set_ylim(-0.02, 1.02)
    accuracy.set_ylabel("pairs whose chosen reward is higher")
    return save_panels(plt, fig, (rewards, accuracy), f"{run_dir.name}: preference tuning", run_dir / "rewards.png")


def plot_sampled_rewards(run_dir: Path) -> Optional[Path]:
    """rewards.png of a run that learns from rewards (grpo): the sampled completions' mean
    reward per step (with its spread) and the held-out prompts' greedy reward, and their
    accuracy with the KL to the reference; None for other runs."""
    records = read_metrics(run_dir / METRICS)
    if not any("reward_std" in r for r in records):
        return None
    plt = _pyplot()
    fig, (rewards, accuracy) = plt.subplots(1, 2, figsize=(11, 4))
    steps, mean = series(records, "reward")
    _, spread = series(records, "reward_std")
    rewards.plot(steps, mean, linewidth=1, label="sampled: mean reward")
    rewards.fill_between(steps, [m - s for m, s in zip(mean, spread)], [m + s for m, s in zip(mean, spread)],
                         alpha=0.2, label="sampled: +- std")
    rewards.plot(*series(records, "eval_reward"), "o-", label="eval reward (greedy, held-out prompts)")
    rewards.set_ylabel("reward")
    accuracy.plot(*series(records, "eval_accuracy"), "o-", label="eval accuracy")
    accuracy.set_ylim(-0.02, 1.02)
    accuracy.set_ylabel("share of held-out prompts answered right")
    kl_steps, kl = series(records, "kl")
    if kl_steps:
        twin = accuracy.twinx()
        twin.plot(kl_steps, kl, color="tab:gray", linewidth=1, label="KL to the reference")
        twin.set_ylabel("KL to the reference (per token)")
        twin.legend(loc="lower right")
    return save_panels(plt, fig, (rewards, accuracy), f"{run_dir.name}: learning from rewards",
                       run_dir / "rewards.png", legend="upper left")


def save_panels(plt, fig, axes, title: str, out: Path, legend: str = "best") -> Path:
    """A figure of panels over steps, each with its grid and legend, titled, written to `out`."""
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(loc=legend)
    fig.suptitle(title)
    fig.tight_layout()
    safewrite.save_figure(fig, out)
    plt.close(fig)
    return out


def save_loss_figure(plt, fig, ax, title: str, out: Path, unit: str = "cross-entropy (nats/token)") -> Path:
    """Axes, grid and legend of a loss-per-step figure; written to `out`."""
    ax.set_xlabel("step")
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    safewrite.save_figure(fig, out)
    plt.close(fig)
    return out


def retention_curve(records: list[dict]) -> tuple[Optional[float], list[int], list[float]]:
    """(retention loss before training, steps, retention loss at each evaluation after step 0)."""
    start = next((r for r in records if r.get("event") == "start"), {})
    before = start.get("retention_loss_before")
    if before is None:
        return None, [], []
    points = [(r["step"], r.get("retention_loss", before + r["forgetting"])) for r in records
              if r.get("forgetting") is not None]
    return before, [s for s, _ in points], [v for _, v in points]


def plot_forgetting(run_dir: Path) -> Optional[Path]:
    """forgetting.png: what the task gained and what general text lost, per evaluation, in the
    same unit (nats per token); None when the run measured no retention loss."""
    records = read_metrics(run_dir / METRICS)
    before, steps, retention = retention_curve(records)
    if before is None:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    eval_steps, eval_loss = series(records, "eval_loss")
    if eval_steps:
        ax.plot(eval_steps, eval_loss, "o-", color="tab:blue", label="task: eval loss (data.eval)")
    ax.axhline(before, color="tab:red", linestyle="--", linewidth=1, label="general text: before training")
    ax.plot([0, *steps], [before, *retention], "s-", color="tab:red", label="general text: retention loss")
    if steps:
        ax.annotate(f"forgetting {retention[-1] - before:+.2f}", xy=(steps[-1], retention[-1]),
                    xytext=(-10, -14), textcoords="offset points", ha="right", color="tab:red")
    return save_loss_figure(plt, fig, ax, f"{run_dir.name}: the task learned, general text forgotten",
                            run_dir / "forgetting.png")


def plot_series(run_dir: Path, key: str, ylabel: str, filename: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(*series(read_metrics(run_dir / METRICS), key))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    out = run_dir / filename
    fig.tight_layout()
    safewrite.save_figure(fig, out)
    plt.close(fig)
    return out


def run_objective(run_dir: Path):
    """The objective class of the run in `run_dir`, by its config snapshot (sft where there is
    none); a UserError where the snapshot names a class that cannot be imported here."""
    import yaml

    path = run_dir / SNAPSHOT
    snapshot = yaml.safe_load(path.read_text()) if path.is_file() else None
    snapshot = snapshot if isinstance(snapshot, dict) else {}
    try:
        return load(name_of(snapshot.get("task", "causal_lm"), str(snapshot.get("objective", "sft"))))
    except ValueError as e:
        raise UserError(f"{path}: objective: {e}") from None


def summarize(run_dir: Path) -> dict:
    """The run's figures from its log: the objective's metrics at the last evaluation, and
    whether the end is worse than before training by any of its `transfer` metrics."""
    objective = run_objective(run_dir)
    records = read_metrics(run_dir / METRICS)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    start = next((r for r in records if r.get("event") == "start"), {})
    first, last = (evals[0], evals[-1]) if evals else ({}, {})

    def worse(metric: str) -> bool:
        before, after = first.get(metric), last.get(metric)
        if before is None or after is None:
            return False
        return after > before if objective.metrics[metric] == "min" else after < before

    summary = {
        "run": str(run_dir),
        "method": start.get("method"),
        "trainable_params": start.get("trainable_params"),
        "total_params": start.get("total_params"),
        "steps": steps[-1]["step"] if steps else 0,
        "first_loss": steps[0]["loss"] if steps else None,
        "last_loss": steps[-1]["loss"] if steps else None,
        "eval_loss_start": first["eval_loss"] if evals and first["step"] == 0 else None,
        **{metric: last.get(metric) if evals else None for metric in objective.metrics},
        "best_eval_loss": min(r["eval_loss"] for r in evals) if evals else None,
        # The task's eval figures worse at the end than before training: the fine-tune hurt it.
        "negative_transfer": bool(len(evals) > 1 and first["step"] == 0 and any(map(worse, objective.transfer)))
        if evals else None,
        # Median, so that the first (warm-up) steps do not skew throughput.
        "median_tokens_per_s": sorted(r["tokens_per_s"] for r in steps)[len(steps) // 2] if steps else None,
    }
    final = run_dir / SUMMARY
    if final.exists():
        done = json.loads(final.read_text())
        for key in ("retention_loss_before", "retention_loss_after", "forgetting", "final_size_bytes"):
            if key in done:
                summary[key] = done[key]
    return summary


def report(run_dir: Path) -> tuple[dict, list[Path]]:
    if not (run_dir / METRICS).is_file():
        raise UserError(f"{run_dir}: no {METRICS}; give the directory of a run (<run.output>/<run.name>)")
    try:
        plots = [
            *plot_run(run_dir),
            plot_series(run_dir, "lr", "learning rate", "lr.png"),
            plot_series(run_dir, "tokens_per_s", "tokens / s", "throughput.png"),
        ]
        summary = summarize(run_dir)
        safewrite.write_text(run_dir / REPORT, run_dir, "the report", json.dumps(summary, indent=2))
    except OSError as e:  # a run directory this user may only read (or one on a full disk)

        if path_problem(e) is None:
            raise
        raise UserError(f"{run_dir}: cannot write the report's plots and {REPORT} there ({e.strerror}: "
                        f"{e.filename}); make the run directory writable, or copy it (cp -r {run_dir} DIR) and "
                        "run ftdist report DIR") from None
    return summary, plots


def format_summary(summary: dict) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
        if isinstance(v, int) and v > 9999:
            return f"{v:,}"
        return str(v)

    width = max(len(k) for k in summary)
    return "\n".join(f"{k.ljust(width)}  {fmt(v)}" for k, v in summary.items() if v is not None)
