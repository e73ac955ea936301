"""The training stall that checkpointing to object storage causes, on CPU against moto.

ftdist's local mode trains the tiny-demo model (method full) with `run.output` on a real S3
server (moto_server on loopback, started here) and a checkpoint every EVERY steps. Saving
copies the states in memory on the training thread; writing the files, uploading them, the
markers and pruning run in the background. Per checkpoint the stall is

    stall = time in save_checkpoint on the training thread (`checkpoint_staged.stall_s`)
          + what the next AFTER steps took beyond the checkpoint-free median step, summed
            with signs (the background job competes with training for the 2 cores; it runs
            at the lowest CPU priority, and so does the S3 server, as a real store's CPU is
            not the training machine's)

and the result is stall / median checkpoint-free step (goal: at most GOAL), the median over
all checkpoints of REPEATS runs. Also reported: upload MiB/s (bytes sent / seconds in the
upload call, per checkpoint), and how long the background job took (write + upload + markers,
at the lowest priority: it waits for training, which is the point).

Run: .venv/bin/python bench/checkpoint_stall.py [--repeats N]
Writes bench/results/checkpoint_stall.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.s3server: the same loopback S3 server the tests use

from ftdist.config.load import load_config  # noqa: E402
from ftdist.launch.local import train_local  # noqa: E402
from ftdist.io.metrics_log import read_metrics  # noqa: E402
from tests.s3server import MotoServer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
STEPS, EVERY, WARMUP, AFTER, REPEATS, GOAL = 160, 20, 10, 3, 3, 0.10
BUCKET = "ftdist-bench"


def bench_config(endpoint: str, cache: Path, name: str):
    never = STEPS + 1
    return load_config(ROOT / "jobs/configs/tiny-demo.yaml", [
        f"run.output=s3://{BUCKET}/runs", f"run.name={name}", "method=full", f"train.max_steps={STEPS}",
        f"train.eval_every={never}", f"train.log_every={never}", f"checkpoint.every_steps={EVERY}",
        "checkpoint.keep=2", "train.schedule=constant", "train.warmup_steps=0",
        "data.eval=null", "data.eval_fraction=0", "data.retention=null",
        f"storage.endpoint_url={endpoint}", "storage.region=us-east-1", f"storage.cache_dir={cache}",
    ])


def measure(records: list[dict]) -> dict:
    times = {r["step"]: r["step_time_s"] for r in records if "step_time_s" in r}
    staged = {r["step"]: r["stall_s"] for r in records if r.get("event") == "checkpoint_staged"}
    done = [r for r in records if r.get("event") == "checkpoint"]
    near = {c + k for c in staged for k in range(1, AFTER + 1)}
    free = [t for s, t in times.items() if s > WARMUP and s not in near and s not in staged]
    median = statistics.median(free)
    # Signed excess: clipping each step at the median would count every slow step's noise
    # and none of the fast ones, a bias of about half the noise per step.
    stalls = [max(0.0, staged[c] + sum(times.get(c + k, median) - median for k in range(1, AFTER + 1)))
              for c in sorted(staged)]
    return {
        "median_step_s": median,
        "stall_s": stalls,
        "stall_ratio": [s / median for s in stalls],
        "training_thread_s": list(staged.values()),
        "checkpoint_bytes": statistics.median(r["bytes"] for r in done),
        "upload_mib_per_s": [r["uploaded"] / 2**20 / r["upload_s"] for r in done if r["uploaded"]],
        "background_job_s": [r["seconds"] for r in done],
    }


def write_results(result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "checkpoint_stall.json").write_text(json.dumps(result, indent=2))
    rows = []
    for i, run in enumerate(result["runs"], 1):
        rows.append(f"| {i} | {run['median_step_s'] * 1e3:.1f} | {statistics.median(run['training_thread_s']) * 1e3:.1f} | "
                    f"{statistics.median(run['stall_s']) * 1e3:.1f} | {statistics.median(run['stall_ratio']):.3f} | "
                    f"{statistics.median(run['background_job_s']) * 1e3:.0f} | "
                    f"{statistics.median(run['upload_mib_per_s']):.1f} | {run['other_load']:.2f} |")
    met = "met" if result["median_stall_ratio"] <= GOAL else "NOT met"
    text = f"""# Checkpoint stall, local mode to S3 (moto on loopback) ({result['time']})

tiny-demo model (method full), {STEPS} steps, a checkpoint every {EVERY} steps of
{result['checkpoint_mib']:.1f} MiB (weights, AdamW state, scheduler, RNG). Stall per checkpoint = time on the
training thread in save_checkpoint + the signed excess of the next {AFTER} steps over the checkpoint-free median
step. The writer/uploader thread and the S3 server run at the lowest CPU priority.

| repeat | step (ms) | training thread (ms) | stall (ms) | stall / step | background job (ms) | upload MiB/s | other load (cores) |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

**median stall / step {result['median_stall_ratio']:.3f} over {result['checkpoints']} checkpoints; goal <= {GOAL}: {met}**

Upload MiB/s is moto_server on loopback (a Python server), not S3: it measures that uploads
stream without stalling, not what a real store sustains.

Machine: {result['machine']}
"""
    (RESULTS / "checkpoint_stall.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")  # moto accepts any credentials
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    with tempfile.TemporaryDirectory(prefix="ftdist-bench-") as tmp:
        server = MotoServer(Path(tmp) / "moto.log")
        try:
            import s3fs

            s3fs.S3FileSystem(endpoint_url=server.url, skip_instance_cache=True).mkdir(BUCKET)
            runs = []
            for i in range(args.repeats):
                psutil.cpu_percent(None)
                summary = train_local(bench_config(server.url, Path(tmp) / "cache", f"stall-{i}"), show_progress=False)
                load = max(0.0, psutil.cpu_percent(None) / 100 * psutil.cpu_count() - 2)  # beyond our 2 threads
                local = next((Path(tmp) / "cache").rglob(f"stall-{i}-*/rank-0/metrics.jsonl"))
                run = measure(read_metrics(local))
                run["other_load"] = load
                runs.append(run)
                print(f"repeat {i + 1}: step {run['median_step_s'] * 1e3:.1f} ms, stall/step "
                      f"{statistics.median(run['stall_ratio']):.3f}, upload {statistics.median(run['upload_mib_per_s']):.1f} "
                      f"MiB/s ({summary['run_dir']})", flush=True)
        finally:
            server.stop()
    ratios = [r for run in runs for r in run["stall_ratio"]]
    result = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "steps": STEPS, "every": EVERY, "after": AFTER, "goal": GOAL,
        "checkpoint_mib": statistics.median(run["checkpoint_bytes"] for run in runs) / 2**20,
        "checkpoints": len(ratios), "median_stall_ratio": statistics.median(ratios),
        "runs": runs,
        "machine": f"cpu_count {psutil.cpu_count()}, python {platform.python_version()}, {platform.platform()}",
    }
    write_results(result)
    print(f"median stall / step {result['median_stall_ratio']:.3f} (goal <= {GOAL})")


if __name__ == "__main__":
    main()
