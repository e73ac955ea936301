"""The fine-tuning spectrum in one picture: the task's eval loss against forgetting, one point a run.

A small Llama is pretrained here, from scratch, on general English text (data/demo/general.txt
and data/demo/replay.txt).
It is then fine-tuned on a narrow task (the demo's digit reversal) in every way ftdist offers:
feature extraction (freeze_layers: all), the top blocks (freeze_layers: 2), full fine-tuning at a
high and at a low learning rate, LoRA, QLoRA, and full fine-tuning at the high rate with each
regularizer against forgetting (replay, L2-SP, EWC). Forgetting is the rise of the loss on
general text (after − before, nats per token) on general.txt, which replay never sees (it
draws from replay.txt).

Goal (issue 18): at least one regularized run forgets at most half of what plain full
fine-tuning (the high rate) forgets, at a task eval loss within 10% of it.

Run: .venv/bin/python bench/spectrum.py [--steps N]. Writes bench/results/spectrum.{json,md,png}.
Every run is `train_local` of a config built as `ftdist train --local` builds it (load_config).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
DEMO = ROOT / "data" / "demo"
GOAL = {"forgetting_ratio": 0.5, "eval_loss_ratio": 1.1}
HIGH_LR, LOW_LR, ADAPTER_LR = 3e-3, 3e-4, 3e-3
PLAIN = "full, high lr"


def runs(texts: dict) -> dict[str, list[str]]:
    """Each point of the picture: its --set overrides over the fine-tuning config."""
    return {
        "feature extraction": ["method=full", "freeze_layers=all", f"train.lr={HIGH_LR}"],
        "top 2 blocks": ["method=full", "freeze_layers=2", f"train.lr={HIGH_LR}"],
        PLAIN: ["method=full", f"train.lr={HIGH_LR}"],
        "full, low lr": ["method=full", f"train.lr={LOW_LR}"],
        "lora r8": ["method=lora", f"train.lr={ADAPTER_LR}"],
        "qlora r8": ["method=qlora", f"train.lr={ADAPTER_LR}"],
        "full + replay 0.2": ["method=full", f"train.lr={HIGH_LR}", f"regularization.replay.data={texts['replay']}",
                              "regularization.replay.fraction=0.2"],
        "full + l2sp 10": ["method=full", f"train.lr={HIGH_LR}", "regularization.l2sp=10"],
        "full + ewc 1e8": ["method=full", f"train.lr={HIGH_LR}", "regularization.ewc.weight=1e8"],
    }


def write_config(path: Path, raw: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def pretrain(tmp: Path) -> Path:
    """The base: a Llama of hidden 128, 4 blocks, trained on the general text for 200 steps."""
    from ftdist.config.load import load_config
    from ftdist.launch.local import train_local

    paragraphs = [p for name in ("general.txt", "replay.txt")
                  for p in (DEMO / name).read_text().split("\n\n") if p.strip()]
    corpus = tmp / "general.jsonl"
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs * 8))
    config = write_config(tmp / "pretrain.yaml", {
        "run": {"name": "base", "output": str(tmp)},
        "model": {"init": {"arch": "llama", "hidden_size": 128, "num_layers": 4, "num_heads": 4, "vocab_size": 512}},
        "method": "full",
        "data": {"train": str(corpus), "eval_fraction": 0, "max_length": 128},
        "train": {"lr": 3e-3, "max_steps": 200, "batch_size": 8, "micro_batch_size": 8, "warmup_steps": 10},
        "checkpoint": {"every_steps": 1000},
    })
    return Path(train_local(load_config(config), show_progress=False)["final_dir"])


def fine_tune(tmp: Path, base: Path, texts: dict, name: str, overrides: list[str], steps: int) -> dict:
    from ftdist.config.load import load_config
    from ftdist.launch.local import train_local

    config = write_config(tmp / "task.yaml", {
        "run": {"name": "task", "output": str(tmp / "runs")},
        "model": {"name_or_path": str(base)},
        "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(DEMO / "train.jsonl"), "eval": str(DEMO / "eval.jsonl"),
                 "retention": str(texts["retention"]), "max_length": 64},
        "train": {"max_steps": steps, "batch_size": 8, "micro_batch_size": 8, "warmup_steps": 5,
                  "eval_every": steps},
        "checkpoint": {"every_steps": 10_000},
    })
    cfg = load_config(config, [f"run.name={re.sub(r'[^A-Za-z0-9._-]+', '_', name)}", *overrides])
    started = time.perf_counter()
    summary = train_local(cfg, show_progress=False)
    return {"name": name, "set": overrides, "eval_loss": summary["eval_loss"], "forgetting": summary["forgetting"],
            "trainable_params": summary["trainable_params"], "seconds": round(time.perf_counter() - started, 1)}


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for p in points:
        regularized = "+" in p["name"]
        ax.scatter(p["eval_loss"], p["forgetting"], s=40, marker="D" if regularized else "o",
                   color="tab:green" if regularized else "tab:blue")
        ax.annotate(p["name"], (p["eval_loss"], p["forgetting"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set_xlabel("task eval loss (lower: learned the task)")
    ax.set_ylabel("forgetting on general text, nats/token (lower: kept more)")
    ax.set_title("fine-tuning spectrum: the task against forgetting")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    from ftdist.io.quiet import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="ftdist-spectrum-") as tmp_dir:
        tmp = Path(tmp_dir)
        base = pretrain(tmp)
        texts = {"replay": DEMO / "replay.txt", "retention": DEMO / "general.txt"}
        points = []
        for name, overrides in runs(texts).items():
            points.append(fine_tune(tmp, base, texts, name, overrides, args.steps))
            print(json.dumps(points[-1]), flush=True)
    plain = next(p for p in points if p["name"] == PLAIN)
    for p in points:
        p["forgetting_ratio"] = p["forgetting"] / plain["forgetting"]
        p["eval_loss_ratio"] = p["eval_loss"] / plain["eval_loss"]
        p["meets_goal"] = ("+" in p["name"] and p["forgetting_ratio"] <= GOAL["forgetting_ratio"]
                           and p["eval_loss_ratio"] <= GOAL["eval_loss_ratio"])
    met = [p["name"] for p in points if p["meets_goal"]]
    RESULTS.mkdir(exist_ok=True)
    plot(points, RESULTS / "spectrum.png")
    result = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "steps": args.steps, "goal": GOAL, "points": points, "goal_met_by": met}
    (RESULTS / "spectrum.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# The fine-tuning spectrum ({result['date']}, CPU, {args.steps} steps each)", "",
             "A Llama of hidden 128, 4 blocks, pretrained here on general text, then fine-tuned on digit "
             "reversal. Forgetting: the loss on held-out general text after less before (nats per token). "
             f"Ratios against `{PLAIN}`. Goal: a regularized run with forgetting at most "
             f"{GOAL['forgetting_ratio']}x at an eval loss at most {GOAL['eval_loss_ratio']}x.", "",
             "| run | `--set` | trainable | task eval loss | forgetting | eval loss ratio | forgetting ratio | goal |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in points:
        shown = " ".join(s for s in p["set"] if not s.startswith("regularization.replay.data"))
        lines.append(f"| {p['name']} | `{shown}` | {p['trainable_params']:,} | {p['eval_loss']:.4f} | "
                     f"{p['forgetting']:+.4f} | {p['eval_loss_ratio']:.2f} | {p['forgetting_ratio']:.2f} | "
                     f"{'met' if p['meets_goal'] else ''} |")
    lines += ["", f"Goal met by: {', '.join(met) or 'none'}.", "", "![spectrum](spectrum.png)", ""]
    (RESULTS / "spectrum.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
