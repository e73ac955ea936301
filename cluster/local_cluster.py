"""Start a Ray cluster of several nodes on this machine, on loopback, for trying multi-node
runs by hand (and for the multi-node tests). Each node is a real raylet with its own
resources; workers placed with STRICT_SPREAD land on different nodes.

    python cluster/local_cluster.py --nodes 2 --cpus-per-node 1
    # prints "address: 127.0.0.1:PORT"; in another shell:
    ftdist train jobs/configs/tiny-ray.yaml --address 127.0.0.1:PORT --set distributed.placement=STRICT_SPREAD

Nodes come and go as on a cloud of spot instances, by commands on its standard input, one a line
(each answered with one line):

    add              a node more ("node N: <node id>")
    drain N SECONDS  node N told it is preempted in SECONDS (`ray drain-node`, Ray's preemption notice)
    kill N           node N lost as a crash or a reclaim would (its processes SIGKILLed)

From Python (the tests, bench/preemption.py): `LocalCluster` starts it and sends commands;
`Lines` reads a process's output as it runs.

SIGUSR1 loses the head node as a crash would (its processes SIGKILLed, the other nodes left
to notice), for trying what a lost head does to a run. Ctrl-C (or SIGTERM) stops every node
it started, and nothing else.
"""

from __future__ import annotations

import argparse
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2, help="nodes, the head included (default 2)")
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--head-cpus", type=int, default=None,
                        help="CPUs of the head node (default: --cpus-per-node; 0 keeps training workers off it)")
    parser.add_argument("--memory-gib", type=float, default=4.0, help="memory resource per node")
    args = parser.parse_args()

    from ray.cluster_utils import Cluster

    node = {"num_cpus": args.cpus_per_node, "memory": int(args.memory_gib * 2**30)}
    head_cpus = args.cpus_per_node if args.head_cpus is None else args.head_cpus
    # A killed node is declared dead within about 3 s (Ray's default: 15), as a cloud's own
    # termination event tells a real cluster sooner than missed heartbeats would.
    health = {"health_check_period_ms": 1000, "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "num_cpus": head_cpus, "include_dashboard": False,
                                                            "_system_config": health})
    nodes = [cluster.head_node] + [cluster.add_node(**node) for _ in range(args.nodes - 1)]
    cluster.wait_for_nodes()
    print(f"address: {cluster.address}", flush=True)
    for index, each in enumerate(nodes):
        print(f"node {index}: {each.node_id}", flush=True)
    print(f"{args.nodes} nodes x {args.cpus_per_node} CPUs; Ctrl-C stops them", flush=True)

    # Commands and signals in the main thread: Ray's Cluster starts nodes only from there.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, raising(Stop))
    signal.signal(signal.SIGUSR1, raising(LoseHead))
    try:
        try:
            take_commands(cluster, nodes, node)  # until standard input closes
            while True:
                signal.pause()
        except LoseHead:
            cluster.remove_node(cluster.head_node, allow_graceful=False)
            print("head node killed", flush=True)
            while True:  # the other nodes stay until Ctrl-C, as on a real cluster
                signal.pause()
    except Stop:
        pass
    cluster.shutdown()
    print("cluster stopped", flush=True)


class Stop(Exception):
    """Ctrl-C or SIGTERM: stop every node."""


class LoseHead(Exception):
    """SIGUSR1: the head node lost as a crash would."""


def raising(exception: type):
    def handler(signum, frame):
        raise exception()

    return handler


def take_commands(cluster, nodes: list, node_args: dict) -> None:
    """Commands from standard input, until it closes (see the module's docstring)."""
    for line in sys.stdin:
        words = line.split()
        try:
            if words == ["add"]:
                nodes.append(cluster.add_node(**node_args))
                cluster.wait_for_nodes()
                print(f"node {len(nodes) - 1}: {nodes[-1].node_id}", flush=True)
            elif len(words) == 3 and words[0] == "drain":
                index, seconds = int(words[1]), int(words[2])
                subprocess.run([str(Path(sys.executable).parent / "ray"), "drain-node", "--address", cluster.address,
                                "--node-id", nodes[index].node_id, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                                "--reason-message", "spot instance reclaimed (local_cluster.py)",
                                "--deadline-remaining-seconds", str(seconds)],
                               check=True, capture_output=True, text=True, timeout=60)
                print(f"node {index} drained: preempted in {seconds} s", flush=True)
            elif len(words) == 2 and words[0] == "kill":
                index = int(words[1])
                cluster.remove_node(nodes[index], allow_graceful=False)
                print(f"node {index} killed", flush=True)
            elif words:
                print(f"unknown command {line.strip()[:80]!r}: add, drain N SECONDS, kill N", flush=True)
        except (ValueError, IndexError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            print(f"command {line.strip()[:80]!r} failed: {detail.strip()[-300:]}", flush=True)


class Lines:
    """A process's output read by a thread, each line with the time it came, so that a caller can
    wait for a line while the process runs."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process, self.seen, self.fresh = process, [], queue.Queue()
        threading.Thread(target=self.read, daemon=True).start()

    def read(self) -> None:
        for line in self.process.stdout:
            self.fresh.put((time.time(), line))
        self.fresh.put(None)

    def wait_for(self, pattern: str, timeout: float, what: str) -> re.Match:
        """The first line from here on that matches, within `timeout` seconds (AssertionError
        past that, with what was printed, the steps' lines left out)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self.fresh.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                continue
            if item is None:
                break
            self.seen.append(item)
            match = re.search(pattern, item[1])
            if match:
                self.at = item[0]  # when the matching line came
                return match
        told = [line for _, line in self.seen if not re.match(r"step \d+/", line)]
        raise AssertionError(f"no line for {what} ({pattern!r}) within {timeout} s; printed (steps left out):\n"
                             + "".join(told)[-8000:])

    def rest(self, timeout: float) -> str:
        """Everything the process printed, once it has ended (within `timeout` seconds)."""
        self.process.wait(timeout=timeout)
        while True:
            item = self.fresh.get(timeout=30)
            if item is None:
                return "".join(line for _, line in self.seen)
            self.seen.append(item)


class LocalCluster:
    """This script in the background: a head that holds no training workers and `nodes` nodes of
    one CPU each, driven by its commands."""

    def __init__(self, nodes: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--nodes", str(nodes + 1), "--cpus-per-node", "1", "--head-cpus", "0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = Lines(self.process)
        try:
            self.address = self.lines.wait_for(r"address: (\S+)", 120, "the cluster").group(1)
            self.lines.wait_for(rf"node {nodes}: ", 60, "its last node")
        except BaseException:
            self.stop()
            raise

    def command(self, line: str, answer: str) -> float:
        """Send one command, wait for its answer; the time it was sent."""
        sent = time.time()
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        self.lines.wait_for(answer, 120, line)
        return sent

    def stop(self) -> None:
        stop(self.process)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it is still there a minute later (a cluster stops every node it started)."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


if __name__ == "__main__":
    main()
