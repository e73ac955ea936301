"""Data at scale: how long from the command to training, and how much memory, at 10k / 100k
(and, with --rows, 1M) prompt/completion rows, against the fast tokenizer's floor.

For each size the script writes ROWS prompt/completion rows (about 250 bytes each, digit
strings and words, seeded) and measures:
- floor: the fast tokenizer batch-tokenizing the same prompts and completions in one
  process (the tokenizer's own Rust threads included), the least any pipeline can take;
- data step, first run and cached rerun: `prepared_dataset` in a fresh process each (validate,
  tokenize, pack, keep; then read back from the cache), timed, with the peak RSS it adds
  to that process once the tokenizer is loaded (psutil, sampled every 20 ms) against the
  bytes of the packed arrays;
- whole command, local and Ray (2 workers): `ftdist train` of one step as a subprocess,
  first with an empty cache, then again (cached), wall seconds, and the peak RSS of the
  driver and of each Ray worker (every process on the machine sampled every 0.2 s).
Ratios: first data step / floor (goal at most 1.5); cached data step seconds (goal at most
5 s at 1M rows); added peak memory / packed bytes (goal at most 3).

Run: .venv/bin/python bench/data_scale.py [--rows 10000 100000 1000000] [--no-ray]
Writes bench/results/data_scale.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
WORDS = (ROOT / "data/demo/general.txt").read_text().split()
GOALS = {"first_vs_floor": 1.5, "cached_s_at_1m": 5.0, "memory_vs_packed": 3.0}


def write_rows(path: Path, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(8, 40)))
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 30)))
            f.write(json.dumps({"prompt": f"{words}\nreverse {digits} =", "completion": f" {digits[::-1]}"}) + "\n")


class PeakRss:
    """Peak RSS of processes, sampled in a thread: `select(proc) -> label or None`."""

    def __init__(self, select, every: float):
        self.select, self.every, self.peaks, self._stop = select, every, {}, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()

    def _run(self):
        while not self._stop.is_set():
            for proc in psutil.process_iter(["pid", "cmdline"]):
                try:
                    label = self.select(proc)
                    if label:
                        key = f"{label}:{proc.pid}"
                        self.peaks[key] = max(self.peaks.get(key, 0), proc.memory_info().rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            self._stop.wait(self.every)


def bench_config(tmp: Path, data: Path, workers: int):
    from ftdist.config.load import load_config

    return load_config(ROOT / "jobs/configs/tiny-demo.yaml", [
        f"run.output={tmp / 'runs'}", f"run.name=data-{workers}", f"data.train={data}", "data.eval=null",
        "data.eval_fraction=0.01", "data.retention=null", "train.max_steps=1", "train.eval_every=1000",
        "checkpoint.every_steps=1000", f"storage.cache_dir={tmp / 'cache'}", f"distributed.workers={workers}"])


def floor_seconds(config: Path, data: Path, env: dict) -> float:
    """The fast tokenizer's batch time on the rows, in a fresh process (its lists of token ids
    take gigabytes at 1M rows, which this process should not keep)."""
    done = subprocess.run([sys.executable, __file__, "--floor", str(config), str(data)], capture_output=True,
                          text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"the floor failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def measure_floor(config: Path, data: Path) -> None:
    from ftdist.config.load import load_config
    from ftdist.model.source import load_tokenizer
    from ftdist.training.base import resolve_base
    from ftdist.launch.rundir import prepare_run_dir

    cfg = load_config(config, [])
    tokenizer = load_tokenizer(cfg, resolve_base(cfg, prepare_run_dir(cfg, restart=False)))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    started = time.perf_counter()
    tokenizer([r["prompt"] for r in rows])
    tokenizer([r["completion"] for r in rows], add_special_tokens=False)
    print(time.perf_counter() - started)


def data_step(config: Path, env: dict) -> dict:
    """`prepared_dataset` in a fresh process (what a run's start does): seconds and the peak
    RSS it adds to that process once the tokenizer is loaded."""
    done = subprocess.run([sys.executable, __file__, "--data-step", str(config)], capture_output=True, text=True,
                          env=env, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"the data step failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_data_step(config: Path) -> None:
    """The child of data_step: prints one JSON line."""
    from ftdist.config.load import load_config
    from ftdist.model.source import load_tokenizer
    from ftdist.training.base import resolve_base
    from ftdist.data.prepared import prepared_dataset
    from ftdist.launch.rundir import prepare_run_dir

    cfg = load_config(config, [])
    tokenizer = load_tokenizer(cfg, resolve_base(cfg, prepare_run_dir(cfg, restart=False)))
    me = os.getpid()
    base = psutil.Process(me).memory_info().rss
    with PeakRss(lambda p: "me" if p.pid == me else None, 0.02) as peak:
        started = time.perf_counter()
        dataset = prepared_dataset(cfg, tokenizer)
        seconds = time.perf_counter() - started
    packed = dataset.train.nbytes() + (dataset.eval.nbytes() if dataset.eval is not None else 0)
    added = max(peak.peaks.values(), default=base) - base
    print(json.dumps({"seconds": seconds, "prepared": dataset.stats["prepared"].split(",")[0], "packed_bytes": packed,
                      "added_peak_rss_bytes": added, "memory_vs_packed": added / packed,
                      "train_rows": len(dataset.train)}))


def command(config: Path, local: bool, env: dict) -> dict:
    def select(proc):
        line = " ".join(proc.info["cmdline"] or [])
        if "ftdist" in line and "train" in line and str(config) in line:
            return "driver"
        if "RayTrainWorker" in line or "ray::RayTrainWorker" in line:
            return "worker"
        return None

    args = [sys.executable, "-m", "ftdist", "train", str(config), "--restart"] + (["--local"] if local else [])
    with PeakRss(select, 0.2) as peak:
        started = time.perf_counter()
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=1800)
        seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    by_kind = {}
    for key, rss in peak.peaks.items():
        by_kind.setdefault(key.split(":")[0], []).append(rss)
    return {"seconds": seconds, "peak_rss_bytes": {k: sorted(v, reverse=True) for k, v in by_kind.items()}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--data-step", type=Path, help=argparse.SUPPRESS)  # the child of data_step
    parser.add_argument("--floor", type=Path, nargs=2, help=argparse.SUPPRESS)  # the child of floor_seconds
    args = parser.parse_args()
    if args.data_step:
        return measure_data_step(args.data_step)
    if args.floor:
        return measure_floor(*args.floor)

    import yaml

    from ftdist.training.base import resolve_base
    from ftdist.launch.rundir import prepare_run_dir

    results = []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for n in args.rows:
        with tempfile.TemporaryDirectory(prefix="data-scale-") as tmp:
            tmp = Path(tmp)
            data = tmp / "rows.jsonl"
            write_rows(data, n)
            cfg = bench_config(tmp, data, 0)
            resolve_base(cfg, prepare_run_dir(cfg, restart=True))  # the tokenizer, trained once for all
            step_config = tmp / "data-step.yaml"
            step_config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
            row = {"rows": n, "file_mib": data.stat().st_size / 2**20, "floor_s": floor_seconds(step_config, data, env)}
            row["first"], row["cached"] = data_step(step_config, env), data_step(step_config, env)
            row["first_vs_floor"] = row["first"]["seconds"] / row["floor_s"]
            for workers in ([0] if args.no_ray else [0, 2]):
                mode = "local" if workers == 0 else "ray"
                config = tmp / f"{mode}.yaml"
                config.write_text(yaml.safe_dump(bench_config(tmp / mode, data, workers).model_dump(mode="json")))
                row[f"{mode}_first"] = command(config, workers == 0, env)
                row[f"{mode}_cached"] = command(config, workers == 0, env)
            results.append(row)
            print(json.dumps(row), flush=True)
    write(results)


def write(results: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.platform(),
            "cpus": os.cpu_count(), "memory_gib": psutil.virtual_memory().total / 2**30, "goals": GOALS}
    (RESULTS / "data_scale.json").write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    gib = 2**30
    lines = [f"# data_scale ({meta['date']}, {meta['cpus']} CPUs)", "",
             "| rows | file MiB | floor s | data step first s (x floor) | cached s | added peak RSS / packed bytes "
             "| local cmd first / cached s | local peak RSS GiB | ray cmd first / cached s | ray driver / workers peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        local, ray = r.get("local_first"), r.get("ray_first")
        ray_cells = ("-", "-") if ray is None else (
            f"{ray['seconds']:.0f} / {r['ray_cached']['seconds']:.0f}",
            f"{max(ray['peak_rss_bytes'].get('driver', [0])) / gib:.2f} / "
            + ", ".join(f"{b / gib:.2f}" for b in ray["peak_rss_bytes"].get("worker", [])))
        lines.append(f"| {r['rows']:,} | {r['file_mib']:.0f} | {r['floor_s']:.1f} | {r['first']['seconds']:.1f} "
                     f"({r['first_vs_floor']:.2f}x) | {r['cached']['seconds']:.2f} | "
                     f"{r['first']['memory_vs_packed']:.2f} | {local['seconds']:.0f} / {r['local_cached']['seconds']:.0f} | "
                     f"{max(local['peak_rss_bytes'].get('driver', [0])) / gib:.2f} | {ray_cells[0]} | {ray_cells[1]} |")
    lines += ["", f"Goals: first data step at most {GOALS['first_vs_floor']}x the floor; cached data step at most "
              f"{GOALS['cached_s_at_1m']} s at 1M rows; added peak memory at most {GOALS['memory_vs_packed']}x "
              "the packed arrays."]
    (RESULTS / "data_scale.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
