"""Start a Ray cluster of several nodes on this machine, on loopback, for trying multi-node
runs by hand (and for the multi-node tests). Each node is a real raylet with its own
resources; workers placed with STRICT_SPREAD land on different nodes.

    python cluster/local_cluster.py --nodes 2 --cpus-per-node 1
    # prints "address: 127.0.0.1:PORT"; in another shell:
    ftdist train jobs/configs/tiny-ray.yaml --address 127.0.0.1:PORT --set distributed.placement=STRICT_SPREAD

SIGUSR1 loses the head node as a crash would (its processes SIGKILLed, the other nodes left
to notice), for trying what a lost head does to a run. Ctrl-C (or SIGTERM) stops every node
it started, and nothing else.
"""

from __future__ import annotations

import argparse
import signal
import threading


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2, help="nodes, the head included (default 2)")
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--memory-gib", type=float, default=4.0, help="memory resource per node")
    args = parser.parse_args()

    from ray.cluster_utils import Cluster

    node = {"num_cpus": args.cpus_per_node, "memory": int(args.memory_gib * 2**30)}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    for _ in range(args.nodes - 1):
        cluster.add_node(**node)
    cluster.wait_for_nodes()
    print(f"address: {cluster.address}", flush=True)
    print(f"{args.nodes} nodes x {args.cpus_per_node} CPUs; Ctrl-C stops them", flush=True)

    stop, lose_head = threading.Event(), threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: (lose_head.set(), stop.set()))
    stop.wait()
    if lose_head.is_set():
        cluster.remove_node(cluster.head_node, allow_graceful=False)
        print("head node killed", flush=True)
        stop.clear()
        stop.wait()  # the other nodes stay until Ctrl-C, as on a real cluster
    cluster.shutdown()
    print("cluster stopped", flush=True)


if __name__ == "__main__":
    main()
