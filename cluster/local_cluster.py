"""Start a Ray cluster of several nodes on this machine, on loopback, for trying multi-node
runs by hand (and for the multi-node test). Each node is a real raylet with its own
resources; workers placed with STRICT_SPREAD land on different nodes.

    python cluster/local_cluster.py --nodes 2 --cpus-per-node 1
    # prints "address: 127.0.0.1:PORT"; in another shell:
    ftdist train jobs/configs/tiny-ray.yaml --address 127.0.0.1:PORT --set distributed.placement=STRICT_SPREAD

Ctrl-C (or SIGTERM) stops every node it started, and nothing else.
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

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    cluster.shutdown()
    print("cluster stopped", flush=True)


if __name__ == "__main__":
    main()
