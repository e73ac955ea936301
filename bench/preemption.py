"""Training on spot nodes: what a preemption costs an elastic run.

On a local cluster of three one-CPU nodes (cluster/local_cluster.py, loopback; the head holds
no training worker), one run with distributed.workers [1, 3], ZeRO-2, its output on the local
disk or in an S3 server (--s3 URL of a running one, e.g. `moto_server -p 5555`), goes through:

    notice   node 3 drained with a preemption deadline (`ray drain-node`, Ray's notice); the node
             is reclaimed (killed) once the run says its checkpoint is committed
    kill     node 2 killed without notice
    grow     a node added: the run grows back at Ray Train's next resize check (5 s here)

and is stopped by SIGTERM. Measured for each event, from the run's own output (each line timed
as it arrives) and its metrics log:

- steps lost: the resume record's steps_lost (steps trained past the checkpoint it resumed from);
- seconds from the notice (the drain) to the checkpoint committed (the run's "stopping:" line);
- seconds from the restart to training again: from the node's end (or, growing, from the
  workers' "stopping:" line) to the first step line after the resume;
- tokens/s at each world size: the median of the steps' tokens_per_s between resizes.

Goals: 0 steps lost with notice (a deadline longer than one checkpoint takes); training again
within 60 s of a restart on this machine.

    python bench/preemption.py [--hidden 256] [--notice 60] [--s3 http://127.0.0.1:5555]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
GOAL_RESTART_S = 60


def config(tmp: Path, args) -> Path:
    import yaml

    output = f"s3://{args.bucket}/preemption" if args.s3 else str(tmp / "runs")
    raw = {
        "run": {"name": "preemption", "output": output},
        "model": {"init": {"arch": "llama", "hidden_size": args.hidden, "num_layers": 4, "num_heads": 4,
                           "vocab_size": 384}},
        "method": "full",
        "data": {"train": str(ROOT / "data" / "demo" / "train.jsonl"), "eval": str(ROOT / "data" / "demo" / "eval.jsonl"),
                 "max_length": 64, "packing": False},
        "train": {"lr": 3e-4, "max_steps": 100000, "batch_size": 12, "micro_batch_size": 2, "schedule": "constant",
                  "warmup_steps": 0, "eval_every": 100000, "log_every": 1},
        "checkpoint": {"every_steps": 20, "keep": 2},
        "distributed": {"workers": [1, 3], "zero_stage": 2, "resize_check_s": 5, "max_failures": 4},
        "storage": {"cache_dir": str(tmp / "cache"),
                    **({"endpoint_url": args.s3, "region": "us-east-1"} if args.s3 else {})},
    }
    path = tmp / "preemption.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def first_step_after(lines) -> float:
    """When the first step line came after those read so far (a resume's)."""
    lines.wait_for(r"^step \d+/", 300, "a step after the resume")
    return lines.at


def run(args) -> dict:
    from cluster.local_cluster import Lines, LocalCluster

    tmp = Path(tempfile.mkdtemp(prefix="ftdist-preemption-"))
    path = config(tmp, args)
    if args.s3:
        import s3fs

        s3fs.S3FileSystem(endpoint_url=args.s3).mkdir(args.bucket)
    events = {}
    cluster = LocalCluster(nodes=3)
    driver = subprocess.Popen([sys.executable, "-m", "ftdist", "train", str(path), "--address", cluster.address],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = Lines(driver)
    try:
        out.wait_for(r"checkpoint step \d+ complete", 600, "a checkpoint at 3 workers")
        drained = cluster.command(f"drain 3 {args.notice}", "node 3 drained")
        out.wait_for(r"^stopping: preemption notice", 300, "the checkpoint on notice")
        committed = out.at
        reclaimed = cluster.command("kill 3", "node 3 killed")
        out.wait_for(r"^resuming from .*3 -> 2 workers", 300, "the resume at 2 workers")
        events["notice"] = {"deadline_s": args.notice, "notice_to_committed_s": committed - drained,
                            "restart_to_training_s": first_step_after(out) - reclaimed}

        out.wait_for(r"checkpoint step \d+ complete", 600, "a checkpoint at 2 workers")
        killed = cluster.command("kill 2", "node 2 killed")
        out.wait_for(r"^resuming from .*2 -> 1 workers", 600, "the resume at 1 worker")
        events["kill"] = {"restart_to_training_s": first_step_after(out) - killed}

        out.wait_for(r"checkpoint step \d+ complete", 600, "a checkpoint at 1 worker")
        added = cluster.command("add", r"node 4: ")
        out.wait_for(r"^stopping: room for", 300, "the checkpoint to grow")
        stopped = out.at
        out.wait_for(r"^resuming from .*1 -> 2 workers", 300, "the resume at 2 workers")
        events["grow"] = {"node_added_to_checkpoint_s": stopped - added,
                          "restart_to_training_s": first_step_after(out) - stopped}
        time.sleep(5)  # steps at 2 workers
        driver.send_signal(signal.SIGTERM)
        out.rest(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
        cluster.stop()

    records = read_log(args, tmp)
    resumes = [r for r in records if r.get("event") == "resume"]
    for event, resume in zip(("notice", "kill", "grow"), resumes):
        events[event].update(steps_lost=resume["steps_lost"], why=resume["why"],
                             world_size=f"{resume['from_world_size']} -> {resume['world_size']}")
    return {"events": events, "tokens_per_s": tokens_per_world_size(records)}


def read_log(args, tmp: Path) -> list[dict]:
    if not args.s3:
        text = (tmp / "runs" / "preemption" / "metrics.jsonl").read_text()
    else:
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=args.s3)
        text = fs.cat_file(f"{args.bucket}/preemption/preemption/metrics.jsonl").decode()
    return [json.loads(line) for line in text.splitlines()]


def tokens_per_world_size(records: list[dict]) -> dict:
    """The median tokens/s of the steps at each world size (the start's, then each resume's)."""
    world, seen = None, {}
    for r in records:
        if r.get("event") in ("start", "resume"):
            world = r["world_size"]
        elif "loss" in r and "tokens_per_s" in r and world is not None:
            seen.setdefault(world, []).append(r["tokens_per_s"])
    return {str(n): {"steps": len(v), "median_tokens_per_s": statistics.median(v[5:] or v)}
            for n, v in sorted(seen.items())}


def write(result: dict, args) -> None:
    ev = result["events"]
    met = {"zero steps lost with notice": ev["notice"]["steps_lost"] == 0 and ev["grow"]["steps_lost"] == 0,
           f"training again within {GOAL_RESTART_S} s of each restart":
               all(e["restart_to_training_s"] <= GOAL_RESTART_S for e in ev.values())}
    result.update(goals=met, machine=f"{platform.machine()}, {os.cpu_count()} cores",
                  date=datetime.date.today().isoformat(), store="S3 server on loopback" if args.s3 else "local disk",
                  model=f"tiny Llama, hidden {args.hidden}, 4 blocks", command=" ".join(sys.argv))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "preemption.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = ["| event | world size | steps lost | notice to checkpoint committed | restart to training again |",
            "|---|---|---:|---:|---:|"]
    for name, e in ev.items():
        notice = f"{e['notice_to_committed_s']:.1f} s (deadline {e['deadline_s']} s)" if "notice_to_committed_s" in e \
            else (f"{e['node_added_to_checkpoint_s']:.1f} s from the node added" if "node_added_to_checkpoint_s" in e
                  else "no notice")
        rows.append(f"| {name} | {e['world_size']} | {e['steps_lost']} | {notice} | {e['restart_to_training_s']:.1f} s |")
    rows += ["", "| world size | steps | tokens/s (median) |", "|---:|---:|---:|"]
    rows += [f"| {n} | {t['steps']} | {t['median_tokens_per_s']:.0f} |" for n, t in result["tokens_per_s"].items()]
    rows += ["", *(f"- {goal}: {'met' if ok else 'NOT met'}" for goal, ok in met.items()),
             "", f"{result['model']}; output on the {result['store']}; {result['machine']}; {result['date']}.",
             f"`{result['command']}`"]
    (RESULTS / "preemption.md").write_text("# Preemption: bench/preemption.py\n\n" + "\n".join(rows) + "\n")
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256, help="the model's hidden size (default 256)")
    parser.add_argument("--notice", type=int, default=60, help="the preemption's deadline, seconds (default 60)")
    parser.add_argument("--s3", default=None, help="endpoint of an S3 server for the run's output (default: local disk)")
    parser.add_argument("--bucket", default="ftdist-bench")
    args = parser.parse_args()
    write(run(args), args)


if __name__ == "__main__":
    main()
