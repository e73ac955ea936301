"""The memory switches on CPU, at a shape where activations and logits dominate: a Llama of
hidden 512, 8 blocks, vocabulary 32k, micro batch 4 x 1024 tokens.

Part 1, whole runs: for full, lora and qlora, with gradient checkpointing off and on (chunked
loss on, the default), one `ftdist train --local` of STEPS steps each in its own process.
Per run: the measured peak (the summary's peak_memory_gib: the process's peak resident set
less what it held before the model was built, see ftdist.sizing.memory.PeakMemory; glibc's mmap
threshold fixed at 64 KiB, MALLOC_MMAP_THRESHOLD_, so that every tensor's memory goes back to
the system when it is freed: by default malloc keeps freed blocks, and the resident set then
counts memory no tensor holds, up to 2 GiB more at this shape), the preflight's
estimate of the same (weights + gradients + optimizer + activations), their ratio, and the
median step time (from a second run, malloc left as it is). Goals: checkpointing's activations at most 0.35x (measured peak less the
estimate's weights, gradients and optimizer states), step time at most 1.4x; every estimate
within 25% of its measured peak.

Part 2, train.compile: full fine-tuning, checkpointing off, compiled against not; the step
time ratio (the first step, which compiles, left out).

Part 3, the loss alone: the last hidden states of the same shape through the LM head to the
summed cross-entropy and back, full fp32 logits against the chunked loss, each in its own
process; peak resident memory above the inputs' and the step time. Goals: at most 0.2x the
memory, at most 1.1x the time.

Run: .venv/bin/python bench/memory_switches.py [--steps N] [--time-steps N]  (`make bench`). Writes
bench/results/memory_switches.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHAPE = ["model.init.hidden_size=512", "model.init.num_layers=8", "model.init.num_heads=8",
         "model.init.vocab_size=32000", "model.init.intermediate_size=1376", "data.max_length=1024",
         "train.micro_batch_size=4", "train.batch_size=4", "data.packing=true"]
# Every tensor of 64 KiB or more in its own mapping, returned to the system when freed.
MEASURED_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
GOALS = {"activations_ratio": 0.35, "checkpointing_time_ratio": 1.4, "estimate_error": 0.25,
         "loss_memory_ratio": 0.2, "loss_time_ratio": 1.1}

RUN = """
import json, sys
from ftdist.config.load import load_config
from ftdist.launch.local import train_local
from ftdist.io.metrics_log import read_metrics
from ftdist.launch.preflight import check_fits
import torch
cfg = load_config(sys.argv[1], sys.argv[2:])
est = check_fits(cfg, torch.device("cpu"))
summary = train_local(cfg, show_progress=False)
from pathlib import Path
times = [r["step_time_s"] for r in read_metrics(Path(summary["run_dir"]) / "metrics.jsonl") if "step_time_s" in r]
print(json.dumps({"peak_gib": summary["peak_memory_gib"], "step_time_s": times,
                  "estimate": {k: getattr(est, k) / 2**30 for k in ("weights", "gradients", "optimizer", "anchors",
                                                                     "reference", "activations") if getattr(est, k)}}))
"""

LOSS = """
import json, resource, sys, time
import psutil, torch
from ftdist.objectives.tokens import chunked_cross_entropy
torch.manual_seed(0)
tokens, hidden_size, vocab, chunked = int(sys.argv[1]), 512, 32000, sys.argv[2] == "chunked"
hidden = torch.randn(1, tokens, hidden_size, requires_grad=True)
head = torch.nn.Linear(hidden_size, vocab, bias=False)
targets = torch.randint(0, vocab, (1, tokens))
def step():
    if chunked:
        loss = chunked_cross_entropy(hidden, head.weight, None, targets, 1024)
    else:
        loss = torch.nn.functional.cross_entropy(head(hidden).float().flatten(0, 1), targets.flatten(), reduction="sum")
    loss.backward()
    hidden.grad = head.weight.grad = None
step()  # warm-up; the peak below is over every step
before = psutil.Process().memory_info().rss
times = []
for _ in range(3):
    start = time.perf_counter(); step(); times.append(time.perf_counter() - start)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(json.dumps({"peak_gib": max(peak, 0) / 2**30, "step_time_s": sorted(times)[1]}))
"""


def train_process(overrides: list[str], env: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", RUN, str(ROOT / "jobs/configs/tiny-demo.yaml"), *overrides],
                            capture_output=True, text=True, cwd=ROOT, timeout=1800, env=env)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_train(method: str, checkpointing: bool, steps: int, time_steps: int, out: str, compiled: bool = False) -> dict:
    def overrides(kind: str, n: int) -> list[str]:
        return [f"run.output={out}", f"run.name={method}-{checkpointing}-{compiled}-{kind}", f"method={method}",
                f"train.compile={str(compiled).lower()}",
                f"train.max_steps={n}", "train.eval_every=1000", "checkpoint.every_steps=1000",
                "data.eval=null", "data.retention=null", "data.eval_fraction=0", "train.warmup_steps=0",
                f"train.gradient_checkpointing={str(checkpointing).lower()}", *SHAPE]

    found = train_process(overrides("memory", steps), MEASURED_ENV)
    # Step time from a run of its own, with malloc as it is: a fresh mapping for every tensor
    # costs page faults, more the larger the activations.
    found["step_time_s"] = train_process(overrides("time", time_steps), dict(os.environ))["step_time_s"]
    est = found["estimate"]
    estimate = sum(est.values())
    return {"method": method, "gradient_checkpointing": checkpointing, "compile": compiled, "peak_gib": found["peak_gib"],
            "estimate_gib": round(estimate, 3), "estimate_parts_gib": {k: round(v, 3) for k, v in est.items()},
            "estimate_error": round(estimate / found["peak_gib"] - 1, 3),
            "activations_measured_gib": round(found["peak_gib"] - (estimate - est["activations"]), 3),
            "step_time_s": round(statistics.median(found["step_time_s"][1:] or found["step_time_s"]), 3)}


def run_loss(kind: str, tokens: int) -> dict:
    result = subprocess.run([sys.executable, "-c", LOSS, str(tokens), kind], capture_output=True, text=True,
                            cwd=ROOT, timeout=900, env=MEASURED_ENV)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return {"loss": kind, **json.loads(result.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="steps of each memory run")
    parser.add_argument("--time-steps", type=int, default=6, help="steps of each timing run (the first left out)")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as out:
        for method in ("full", "lora", "qlora"):
            for checkpointing in (False, True):
                runs.append(run_train(method, checkpointing, args.steps, args.time_steps, out))
                print(json.dumps(runs[-1]), flush=True)
        compiled = run_train("full", False, args.steps, args.time_steps, out, compiled=True)
        print(json.dumps(compiled), flush=True)
    eager = next(r for r in runs if r["method"] == "full" and not r["gradient_checkpointing"])
    compile_ratio = {"step_time_ratio": round(compiled["step_time_s"] / eager["step_time_s"], 3),
                     "peak_ratio": round(compiled["peak_gib"] / eager["peak_gib"], 3)}
    pairs = {}
    for method in ("full", "lora", "qlora"):
        off, on = (next(r for r in runs if r["method"] == method and r["gradient_checkpointing"] is c)
                   for c in (False, True))
        pairs[method] = {"activations_ratio": round(on["activations_measured_gib"] / off["activations_measured_gib"], 3),
                         "checkpointing_time_ratio": round(on["step_time_s"] / off["step_time_s"], 3)}
    tokens = 4 * 1024
    full, chunked = run_loss("full", tokens), run_loss("chunked", tokens)
    loss = {"tokens": tokens, "full": full, "chunked": chunked,
            "loss_memory_ratio": round(chunked["peak_gib"] / full["peak_gib"], 3),
            "loss_time_ratio": round(chunked["step_time_s"] / full["step_time_s"], 3)}
    verdicts = {
        "activations_ratio": all(p["activations_ratio"] <= GOALS["activations_ratio"] for p in pairs.values()),
        "checkpointing_time_ratio": all(p["checkpointing_time_ratio"] <= GOALS["checkpointing_time_ratio"]
                                        for p in pairs.values()),
        "estimate_error": all(abs(r["estimate_error"]) <= GOALS["estimate_error"] for r in runs),
        "loss_memory_ratio": loss["loss_memory_ratio"] <= GOALS["loss_memory_ratio"],
        "loss_time_ratio": loss["loss_time_ratio"] <= GOALS["loss_time_ratio"],
    }
    result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{__import__('os').cpu_count()} cores", "shape": SHAPE, "steps": args.steps, "time_steps": args.time_steps, "runs": runs,
              "checkpointing": pairs, "compile": {"run": compiled, **compile_ratio}, "loss": loss, "goals": GOALS, "met": verdicts}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory_switches.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Memory switches on CPU", "", f"{result['date']}, {result['machine']}; shape: {' '.join(SHAPE)}; "
             f"{args.steps} steps per memory run, {args.time_steps} per timing run. Peak: the process's peak RSS less its RSS before the model was built, "
             "glibc's mmap threshold fixed at 64 KiB (freed tensors leave the resident set at once).", "",
             "| method | checkpointing | measured peak GiB | estimate GiB | estimate error | step s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {'on' if r['gradient_checkpointing'] else 'off'} | {r['peak_gib']:.2f} | "
              f"{r['estimate_gib']:.2f} | {r['estimate_error']:+.0%} | {r['step_time_s']:.2f} |" for r in runs]
    lines += ["", "| method | activations on/off | step time on/off |", "|---|---|---|"]
    lines += [f"| {m} | {p['activations_ratio']:.2f} | {p['checkpointing_time_ratio']:.2f} |" for m, p in pairs.items()]
    lines += ["", f"train.compile (full, checkpointing off): step time {compile_ratio['step_time_ratio']:.2f}x "
              f"uncompiled ({compiled['step_time_s']:.2f} vs {eager['step_time_s']:.2f} s, the compiling first step "
              f"left out), peak memory {compile_ratio['peak_ratio']:.2f}x."]
    lines += ["", f"Loss alone, {tokens} tokens x 32k vocabulary: chunked / full fp32 logits: memory "
              f"{loss['loss_memory_ratio']:.2f}x ({chunked['peak_gib']:.2f} vs {full['peak_gib']:.2f} GiB), time "
              f"{loss['loss_time_ratio']:.2f}x.", "", "Goals " + json.dumps(GOALS) + "; met: " + json.dumps(verdicts)]
    (RESULTS / "memory_switches.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
