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

`--base real` (issue 37): the same question on a real pretrained model, SmolLM2-135M-Instruct
(bench/real_task.py's `real_base()`), fine-tuned on capital cards (data/smollm2/train.jsonl, eval
on eval.jsonl: held-out countries; chat format, max_length 96, no packing; the demo config's
schedule) for 30 steps of batch 8: full fine-tuning at 1e-4 (which learns the task and forgets
nothing measurable) and at 1e-3 (which forgets: the plain run of the ratios), the latter with
replay (of data/smollm2/replay.txt, other paragraphs of the same documentation as general.txt),
L2-SP and EWC, and LoRA r16 (3e-4, the demo's) for reference. Forgetting is measured on data/smollm2/general.txt, Python
documentation prose the base read in pretraining, one row per paragraph. Each final model is also scored by greedy
generation on the held-out countries (`card_scores`: exact accuracy and the card format). The
strengths are scaled to the real model: the proximal pull takes a share lr·c of a weight's
distance to its anchor each step, so what counts over a run is about lr·c·steps: 1.8 for the
random-weight run's L2-SP (10 at 3e-3, 60 steps), 3 here for L2-SP 100 (1e-3, 30 steps); EWC's
weight 1e8 gives a mean c (weight x the mean Fisher, about 1.2e-6 on general.txt) about L2-SP's.
About 12 minutes a full run on 2 busy cores (11 s a step); --cache keeps finished points. Writes bench/results/spectrum-real.{json,md,png}.
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
REAL_LOW_LR, REAL_LR, REAL_ADAPTER_LR, REAL_STEPS = 1e-4, 1e-3, 3e-4, 30
REAL_PLAIN = "full, 1e-3"
REAL_EWC_SAMPLES = 16  # each Fisher row is a forward and backward of 135M weights (~5 s on this CPU)


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


def real_runs(texts: dict) -> dict[str, list[str]]:
    """The real base's points: full fine-tuning at a low rate (which forgets nothing measurable here) and at
    a rate that forgets, each regularizer over the latter, LoRA for reference."""
    return {
        "full, 1e-4": ["method=full", f"train.lr={REAL_LOW_LR}"],
        REAL_PLAIN: ["method=full", f"train.lr={REAL_LR}"],
        "full 1e-3 + ewc 1e8": ["method=full", f"train.lr={REAL_LR}", "regularization.ewc.weight=1e8",
                                f"regularization.ewc.samples={REAL_EWC_SAMPLES}"],
        "full 1e-3 + replay 0.2": ["method=full", f"train.lr={REAL_LR}",
                                   f"regularization.replay.data={texts['replay']}", "regularization.replay.fraction=0.2"],
        "full 1e-3 + l2sp 100": ["method=full", f"train.lr={REAL_LR}", "regularization.l2sp=100"],
        "lora r16": ["method=lora", f"train.lr={REAL_ADAPTER_LR}"],
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


def fine_tune_real(tmp: Path, base: Path, texts: dict, name: str, overrides: list[str], steps: int) -> dict:
    """One run on the real base (the demo config's data and schedule), its final model scored by generation."""
    import yaml

    from ftdist.config.load import load_config
    from ftdist.launch.local import train_local

    raw = yaml.safe_load((ROOT / "jobs" / "configs" / "smollm2-demo.yaml").read_text())
    raw["run"] = {"name": "task", "output": str(tmp / "runs")}
    raw["model"] = {"name_or_path": str(base)}
    raw["data"].update({key: str(ROOT / raw["data"][key]) for key in ("train", "eval")})
    raw["data"]["retention"] = str(texts["retention"])
    raw["train"].update({"max_steps": steps, "warmup_steps": 3, "eval_every": steps, "log_every": 10})
    raw["checkpoint"] = {"every_steps": 10_000}
    config = write_config(tmp / "task.yaml", raw)
    cfg = load_config(config, [f"run.name={re.sub(r'[^A-Za-z0-9._-]+', '_', name)}", *overrides])
    started = time.perf_counter()
    summary = train_local(cfg, show_progress=False)
    seconds = round(time.perf_counter() - started, 1)
    return {"name": name, "set": overrides, "eval_loss": summary["eval_loss"], "forgetting": summary["forgetting"],
            "trainable_params": summary["trainable_params"], "seconds": seconds,
            **generation_scores(Path(summary["final_dir"]))}


def generation_scores(model_dir: Path) -> dict:
    """A model or adapter directory (the base itself, before fine-tuning) loaded as `ftdist generate`
    loads it, scored by greedy generation on the held-out countries."""
    import torch
    from real_task import card_scores

    from ftdist.artifacts.generate import load_trained

    cards = card_scores(*load_trained(model_dir, torch.device("cpu")))
    return {"accuracy": cards["accuracy"], "format": cards["format"], "replies": cards["replies"][:3]}


def plot(points: list[dict], path: Path, title: str = "fine-tuning spectrum: the task against forgetting") -> None:
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
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def with_ratios(points: list[dict], plain_name: str) -> list[str]:
    """Each point's ratios to the plain run and whether it meets the goal; the names that do."""
    plain = next(p for p in points if p["name"] == plain_name)
    for p in points:
        p["forgetting_ratio"] = p["forgetting"] / plain["forgetting"]
        p["eval_loss_ratio"] = p["eval_loss"] / plain["eval_loss"]
        p["meets_goal"] = ("+" in p["name"] and p["forgetting_ratio"] <= GOAL["forgetting_ratio"]
                           and p["eval_loss_ratio"] <= GOAL["eval_loss_ratio"])
    return [p["name"] for p in points if p["meets_goal"]]


# The real base's extra columns: each final model's greedy scores and its run's seconds.
REAL_COLUMNS = (("accuracy", lambda p: f"{p['accuracy']:.2f}"), ("format", lambda p: f"{p['format']:.2f}"),
                ("seconds", lambda p: f"{p['seconds']:.0f}"))


def table(points: list[dict], extra: tuple = ()) -> list[str]:
    """The Markdown table of the points: name, overrides, the task's eval loss and forgetting with their
    ratios, `extra` columns ((header, cell of a point)), and the goal."""
    heads = ["run", "`--set`", "trainable", "task eval loss", "forgetting", "eval loss ratio", "forgetting ratio",
             *(head for head, _ in extra), "goal"]
    lines = ["| " + " | ".join(heads) + " |", "|" + " --- |" * len(heads)]
    for p in points:
        shown = " ".join(s for s in p["set"] if not s.startswith("regularization.replay.data"))
        cells = [p["name"], f"`{shown}`", f"{p['trainable_params']:,}", f"{p['eval_loss']:.4f}",
                 f"{p['forgetting']:+.4f}", f"{p['eval_loss_ratio']:.2f}", f"{p['forgetting_ratio']:.2f}",
                 *(cell(p) for _, cell in extra), "met" if p["meets_goal"] else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main_real(args) -> None:
    """--base real: the spectrum's regularizers on SmolLM2-135M-Instruct (see the module's docstring)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from real_task import DATA, real_base

    steps = args.steps or REAL_STEPS
    cache = Path(args.cache) if args.cache else None  # finished points, kept across an interrupted run
    done = {p["name"]: p for p in json.loads(cache.read_text())} if cache and cache.is_file() else {}
    base = real_base()
    with tempfile.TemporaryDirectory(prefix="ftdist-spectrum-real-") as tmp_dir:
        tmp = Path(tmp_dir)
        texts = {"replay": DATA / "replay.txt", "retention": DATA / "general.txt"}
        points = []
        for name, overrides in real_runs(texts).items():
            if args.only and name not in args.only:
                continue
            point = done.get(name) or fine_tune_real(tmp, base, texts, name, overrides, steps)
            points.append(point)
            if cache:
                done[name] = point
                cache.write_text(json.dumps(list(done.values()), indent=1))
            print(json.dumps(point), flush=True)
    before = done.get("base") or generation_scores(base)
    if cache:
        done["base"] = {"name": "base", **before}
        cache.write_text(json.dumps(list(done.values()), indent=1))
    met = with_ratios(points, REAL_PLAIN)
    RESULTS.mkdir(exist_ok=True)
    plot(points, RESULTS / "spectrum-real.png",
         "fine-tuning spectrum on SmolLM2-135M-Instruct: capital cards against forgetting")
    result = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "base": "SmolLM2-135M-Instruct (bench/real_task.py real_base(), float32)", "steps": steps,
              "batch_size": 8, "goal": GOAL, "base_scores": before, "points": points, "goal_met_by": met}
    (RESULTS / "spectrum-real.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# The fine-tuning spectrum on a real model ({result['date']}, CPU, {steps} steps of batch 8 each)", "",
             "SmolLM2-135M-Instruct, fine-tuned on capital cards (`data/smollm2/train.jsonl`, eval on 32 held-out "
             "countries; chat, max_length 96, no packing; 3 warm-up steps then cosine, grad clip 1). Forgetting: "
             "the loss on `data/smollm2/general.txt` (Python documentation prose the base read in pretraining, one "
             "row per paragraph) after less before (nats per token); replay draws from `data/smollm2/replay.txt`, "
             "other paragraphs of the same documentation. Accuracy and format: greedy answers of the final model on "
             f"the held-out countries (`card_scores`; the base before fine-tuning: accuracy {before['accuracy']:.2f}, "
             f"format {before['format']:.2f}). Ratios against `{REAL_PLAIN}`. Goal: a regularized run with "
             f"forgetting at most {GOAL['forgetting_ratio']}x at an eval loss at most {GOAL['eval_loss_ratio']}x.", "",
             *table(points, REAL_COLUMNS)]
    verdict = (f"Goal met by: {', '.join(met) or 'none'}." if any("+" in p["name"] for p in points)
               else "Goal: no regularized run measured yet.")
    lines += ["", verdict, "", "![spectrum](spectrum-real.png)", ""]
    if args.notes and Path(args.notes).is_file():
        lines += [Path(args.notes).read_text().strip(), ""]
    (RESULTS / "spectrum-real.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", choices=["random", "real"], default="random",
                        help="random: a tiny Llama pretrained here (spectrum.*); real: SmolLM2-135M-Instruct "
                             "(spectrum-real.*)")
    parser.add_argument("--steps", type=int, default=None, help=f"default 60, with --base real {REAL_STEPS}")
    parser.add_argument("--cache", help="--base real: a JSON file of finished points, reused if the run is cut")
    parser.add_argument("--only", nargs="*", help="--base real: only these points")
    parser.add_argument("--notes", default=str(ROOT / "bench" / "spectrum-real-notes.md"),
                        help="--base real: a Markdown file appended to spectrum-real.md (the verdicts; "
                             "default bench/spectrum-real-notes.md)")
    args = parser.parse_args()
    from ftdist.io.quiet import quiet_libraries

    quiet_libraries()
    if args.base == "real":
        main_real(args)
        return
    args.steps = args.steps or 60
    with tempfile.TemporaryDirectory(prefix="ftdist-spectrum-") as tmp_dir:
        tmp = Path(tmp_dir)
        base = pretrain(tmp)
        texts = {"replay": DEMO / "replay.txt", "retention": DEMO / "general.txt"}
        points = []
        for name, overrides in runs(texts).items():
            points.append(fine_tune(tmp, base, texts, name, overrides, args.steps))
            print(json.dumps(points[-1]), flush=True)
    met = with_ratios(points, PLAIN)
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
             *table(points)]
    lines += ["", f"Goal met by: {', '.join(met) or 'none'}.", "", "![spectrum](spectrum.png)", ""]
    (RESULTS / "spectrum.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
