"""Plots and a summary from a run's metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from ftdist.errors import UserError
from ftdist.metrics import read_metrics, series


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(run_dir: Path) -> Path:
    """loss.png: training loss per step, eval loss at its checkpoints."""
    plt = _pyplot()
    records = read_metrics(run_dir / "metrics.jsonl")
    fig, ax = plt.subplots(figsize=(7, 4))
    train_steps, train_loss = series(records, "loss")
    ax.plot(train_steps, train_loss, label="train loss", linewidth=1)
    eval_steps, eval_loss = series(records, "eval_loss")
    if eval_steps:
        ax.plot(eval_steps, eval_loss, "o-", label="eval loss")
    losses = [v for v in train_loss + eval_loss if v > 0]
    if losses and max(losses) / min(losses) > 20:  # a curve that falls far reads better on a log scale
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = run_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_series(run_dir: Path, key: str, ylabel: str, filename: str) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(*series(read_metrics(run_dir / "metrics.jsonl"), key))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    out = run_dir / filename
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def summarize(run_dir: Path) -> dict:
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    start = next((r for r in records if r.get("event") == "start"), {})
    summary = {
        "run": str(run_dir),
        "method": start.get("method"),
        "trainable_params": start.get("trainable_params"),
        "total_params": start.get("total_params"),
        "steps": steps[-1]["step"] if steps else 0,
        "first_loss": steps[0]["loss"] if steps else None,
        "last_loss": steps[-1]["loss"] if steps else None,
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "eval_ppl": evals[-1]["eval_ppl"] if evals else None,
        "best_eval_loss": min(r["eval_loss"] for r in evals) if evals else None,
        # Median, so that the first (warm-up) steps do not skew throughput.
        "median_tokens_per_s": sorted(r["tokens_per_s"] for r in steps)[len(steps) // 2] if steps else None,
    }
    final = run_dir / "summary.json"
    if final.exists():
        done = json.loads(final.read_text())
        for key in ("retention_loss_before", "retention_loss_after", "forgetting", "final_size_bytes"):
            if key in done:
                summary[key] = done[key]
    return summary


def report(run_dir: Path) -> tuple[dict, list[Path]]:
    if not (run_dir / "metrics.jsonl").is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl; give the directory of a run (<run.output>/<run.name>)")
    plots = [
        plot_loss(run_dir),
        plot_series(run_dir, "lr", "learning rate", "lr.png"),
        plot_series(run_dir, "tokens_per_s", "tokens / s", "throughput.png"),
    ]
    summary = summarize(run_dir)
    (run_dir / "report.json").write_text(json.dumps(summary, indent=2))
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
