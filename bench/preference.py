"""Preference tuning (objective: dpo) on CPU, beside supervised fine-tuning of the same rows'
size: what the reference costs in memory and time, and whether the estimate counts it.

A Llama of hidden 512, 8 blocks, vocabulary 32k (bench/memory_switches.py's shape), micro batch
4 rows of 1024 tokens: SFT at data.max_length 1024 is the baseline; DPO at data.max_length 512,
whose rows hold a pair (chosen and rejected, 2 x 512), so the rows are as long. Per run, one
`ftdist train --local` of STEPS steps in its own process (memory_switches' harness: the measured
peak is the process's peak resident set less what it held before the model was built, glibc's
mmap threshold fixed), the preflight's estimate of the same with its parts, and the median step
time from a second run. DPO runs: full with the reference a frozen copy, full with it
precomputed (no copy), lora with the adapters switched off.

Goals: every estimate within 25% of its measured peak; the precomputed reference saves at least
half the frozen copy's estimated bytes in the measured peak; a DPO step (a forward of the
reference too, and a pair's two sequences) at most 1.6x the SFT step's time for full.

Run: .venv/bin/python bench/preference.py [--steps N] [--time-steps N] (`make bench`). Writes
bench/results/preference.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

from memory_switches import MEASURED_ENV, SHAPE, train_process

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RUNS = {  # name -> overrides
    "sft full": ["method=full", "data.max_length=1024"],
    "dpo full, frozen copy": ["method=full", "objective=dpo", "data.max_length=512"],
    "dpo full, precomputed": ["method=full", "objective=dpo", "data.max_length=512", "dpo.precompute_reference=true"],
    "dpo lora, adapters off": ["method=lora", "objective=dpo", "data.max_length=512"],
}
DATA = {"sft": ["data.train=data/demo/train.jsonl", "data.format=prompt_completion"],
        "dpo": ["data.train=data/demo/pairs-train.jsonl", "data.format=auto"]}
GOALS = {"estimate_error": 0.25, "precompute_saving_of_copy": 0.5, "dpo_full_step_time_ratio": 1.6}


def run(name: str, overrides: list[str], steps: int, time_steps: int, out: str) -> dict:
    def settings(kind: str, n: int) -> list[str]:
        objective = "dpo" if "objective=dpo" in overrides else "sft"
        return [f"run.output={out}", f"run.name={name.replace(' ', '-').replace(',', '')}-{kind}", *SHAPE,
                *DATA[objective], *overrides, f"train.max_steps={n}", "train.eval_every=1000",
                "checkpoint.every_steps=1000", "data.eval=null", "data.retention=null", "data.eval_fraction=0",
                "train.warmup_steps=0"]

    found = train_process(settings("memory", steps), MEASURED_ENV)
    times = train_process(settings("time", time_steps), dict(os.environ))["step_time_s"]
    estimate = sum(found["estimate"].values())
    return {"run": name, "overrides": overrides, "peak_gib": found["peak_gib"], "estimate_gib": round(estimate, 3),
            "estimate_parts_gib": {k: round(v, 3) for k, v in found["estimate"].items()},
            "estimate_error": round(estimate / found["peak_gib"] - 1, 3),
            "step_time_s": round(statistics.median(times[1:] or times), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="steps of each memory run")
    parser.add_argument("--time-steps", type=int, default=5, help="steps of each timing run (the first left out)")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as out:
        for name, overrides in RUNS.items():
            runs[name] = run(name, overrides, args.steps, args.time_steps, out)
            print(json.dumps(runs[name]), flush=True)
    sft, copy, precomputed = runs["sft full"], runs["dpo full, frozen copy"], runs["dpo full, precomputed"]
    saved = copy["peak_gib"] - precomputed["peak_gib"]
    copy_bytes = copy["estimate_parts_gib"]["reference"]
    figures = {"precompute_saving_gib": round(saved, 3), "frozen_copy_estimate_gib": copy_bytes,
               "precompute_saving_of_copy": round(saved / copy_bytes, 3),
               "dpo_full_step_time_ratio": round(copy["step_time_s"] / sft["step_time_s"], 3),
               "dpo_full_precomputed_step_time_ratio": round(precomputed["step_time_s"] / sft["step_time_s"], 3)}
    met = {"estimate_error": all(abs(r["estimate_error"]) <= GOALS["estimate_error"] for r in runs.values()),
           "precompute_saving_of_copy": figures["precompute_saving_of_copy"] >= GOALS["precompute_saving_of_copy"],
           "dpo_full_step_time_ratio": figures["dpo_full_step_time_ratio"] <= GOALS["dpo_full_step_time_ratio"]}
    result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores", "shape": SHAPE, "steps": args.steps, "time_steps": args.time_steps,
              "runs": list(runs.values()), **figures, "goals": GOALS, "met": met}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "preference.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Preference tuning on CPU", "", f"{result['date']}, {result['machine']}; shape: {' '.join(SHAPE)} "
             "(rows of 1024 tokens: SFT max_length 1024, DPO 512 a sequence, a pair a row); "
             f"{args.steps} steps per memory run, {args.time_steps} per timing run. Peak: the process's peak RSS "
             "less its RSS before the model was built, glibc's mmap threshold fixed at 64 KiB.", "",
             "| run | measured peak GiB | estimate GiB | of which reference | estimate error | step s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['peak_gib']:.2f} | {r['estimate_gib']:.2f} | "
              f"{r['estimate_parts_gib'].get('reference', 0):.2f} | {r['estimate_error']:+.0%} | {r['step_time_s']:.2f} |"
              for r in runs.values()]
    lines += ["", f"Precomputing the reference saved {saved:.2f} GiB of measured peak, "
              f"{figures['precompute_saving_of_copy']:.2f}x the frozen copy's estimated {copy_bytes:.2f} GiB. A DPO "
              f"step (full) took {figures['dpo_full_step_time_ratio']:.2f}x the SFT step with the frozen copy, "
              f"{figures['dpo_full_precomputed_step_time_ratio']:.2f}x with the reference precomputed.", "",
              "Goals " + json.dumps(GOALS) + "; met: " + json.dumps(met)]
    (RESULTS / "preference.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
