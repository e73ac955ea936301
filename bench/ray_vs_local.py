"""One Ray Train worker (DeepSpeed ZeRO stage 0) against local mode: steady-state step time.

Both sides run ftdist's one loop on the same config (the tiny-demo model, method full,
constant lr, no eval or checkpoints, 60 steps): local mode in this process, and
`train_ray` with distributed.workers 1 holding both CPUs (so both use 2 torch threads).
Step time is the median `step_time_s` of metrics.jsonl after WARMUP steps; the result is
the median ratio Ray / local over REPEATS alternating pairs (goal: at most GOAL).
Start-up is reported apart: `ray.init` of a local cluster, and the rest of a Ray run's
wall time that is not training steps (worker group, imports, DeepSpeed set-up, data).

Run: .venv/bin/python bench/ray_vs_local.py [--repeats N]
Writes bench/results/ray_vs_local.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import psutil

from ftdist.config.load import load_config
from ftdist.launch.local import train_local
from ftdist.io.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
STEPS, WARMUP, REPEATS, GOAL = 60, 10, 3, 1.10


def bench_config(output: str, name: str, workers: int):
    never = STEPS + 1
    return load_config(ROOT / "jobs/configs/tiny-demo.yaml", [
        f"run.output={output}", f"run.name={name}", "method=full", f"train.max_steps={STEPS}",
        f"train.eval_every={never}", f"checkpoint.every_steps={never}", f"train.log_every={never}",
        "train.schedule=constant", "train.warmup_steps=0",
        "data.eval=null", "data.eval_fraction=0", "data.retention=null",
        f"distributed.workers={workers}", "distributed.zero_stage=0", "distributed.max_failures=0",
        "distributed.resources_per_worker={CPU: 2}",
    ])


def step_times(run_dir: Path) -> list[float]:
    return [r["step_time_s"] for r in read_metrics(run_dir / "metrics.jsonl") if "step_time_s" in r]


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args()
    os.chdir(ROOT)
    import ray

    from ftdist.launch.ray_train import connect, train_ray
    from ftdist.io.quiet import quiet_libraries

    quiet_libraries()
    _, init_s = timed(ray.init, address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
                      logging_config=ray.LoggingConfig(log_level="WARNING"))
    connect(None)
    repeats = []
    with tempfile.TemporaryDirectory(prefix="ftdist-bench-") as tmp:
        for r in range(1, args.repeats + 1):
            local_summary, local_wall = timed(train_local, bench_config(tmp, "local", 0), restart=True,
                                              show_progress=False)
            ray_summary, ray_wall = timed(train_ray, bench_config(tmp, "ray", 1), restart=True, show_progress=False)
            local_steps, ray_steps = step_times(Path(local_summary["run_dir"])), step_times(Path(ray_summary["run_dir"]))
            lo, ra = statistics.median(local_steps[WARMUP:]), statistics.median(ray_steps[WARMUP:])
            repeats.append({"repeat": r, "local_step_s": lo, "ray_step_s": ra, "ratio": ra / lo,
                            "local_wall_s": local_wall, "ray_wall_s": ray_wall,
                            "ray_startup_s": ray_wall - sum(ray_steps), "local_startup_s": local_wall - sum(local_steps)})
            print(f"repeat {r}: local {lo * 1e3:.1f} ms, ray {ra * 1e3:.1f} ms, ratio {ra / lo:.3f}; "
                  f"start-up ray {ray_wall - sum(ray_steps):.1f} s, local {local_wall - sum(local_steps):.1f} s",
                  flush=True)
    ray.shutdown()
    ratio = statistics.median(r["ratio"] for r in repeats)
    result = {
        "benchmark": "ray_vs_local", "date": datetime.date.today().isoformat(),
        "config": f"tiny-demo model, method full, {STEPS} steps, batch 16 = 2 x 8, max_length 128; Ray: 1 worker "
                  "with 2 CPUs, DeepSpeed ZeRO-0, gloo",
        "goal": f"ratio <= {GOAL}", "median_ratio": ratio, "ray_init_s": init_s,
        "median_ray_startup_s": statistics.median(r["ray_startup_s"] for r in repeats),
        "verdict": "met" if ratio <= GOAL else "not met", "repeats": repeats,
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version()},
    }
    result["summary"] = (f"median ratio Ray / local {ratio:.3f} (goal <= {GOAL}: {result['verdict']}); "
                         f"ray.init {init_s:.1f} s; other Ray start-up per run {result['median_ray_startup_s']:.1f} s")
    print(result["summary"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ray_vs_local.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# 1 Ray worker vs local mode ({result['date']})", "", f"{result['config']}.", "",
             "| repeat | local step (ms) | Ray step (ms) | ratio | Ray start-up (s) | local start-up (s) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['repeat']} | {r['local_step_s'] * 1e3:.1f} | {r['ray_step_s'] * 1e3:.1f} | {r['ratio']:.3f} | "
              f"{r['ray_startup_s']:.1f} | {r['local_startup_s']:.1f} |" for r in repeats]
    lines += ["", f"**{result['summary']}**"]
    (RESULTS / "ray_vs_local.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
