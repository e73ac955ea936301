"""What differs between the modes the one loop runs in: rank, world, device, where the
data comes from, which engine steps, how to talk to the other ranks and the orchestrator.

Local mode is one process; each Ray Train worker gets a RayContext with the same interface, so
the loop never asks "am I under Ray?". The engine is distributed.engine's (ftdist/engines):
auto is the plain engine in local mode and DeepSpeed on Ray workers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ftdist.config.schema import Config
from ftdist.data.prepared import prepared_dataset
from ftdist.data.raydata import dataset_from_shards
from ftdist.engines.registry import engine_class, resolve
from ftdist.io.storage import RunStore
from ftdist.tracking.run import TrackingGroup
from ftdist.training.notice import Notice, StopNotice


@dataclass
class LocalContext:
    store: RunStore  # the run directory, and this rank's local copy of it (store.local)
    device: torch.device
    rank: int = 0
    world_size: int = 1
    show_progress: bool = True
    tracking_group: Optional[TrackingGroup] = None  # a search's trial reports inside the search's group
    notice: Optional[StopNotice] = None  # a stop asked of this process (SIGTERM)
    owns_world: bool = field(default=False, repr=False)  # a process group of one opened here (close())
    launcher_env: dict = field(default_factory=dict, repr=False)  # what open_world set, and what it replaced

    @property
    def run_dir(self) -> Path:
        """Where this rank writes: the run itself, or its local copy of an s3:// run."""
        return self.store.local

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, value):
        """A number's (or a numpy array's) sum over the ranks."""
        return value

    def barrier(self) -> None:
        pass

    def report(self, metrics: dict) -> None:
        """Hand metrics to the orchestrator (nothing to do in one process)."""

    def stop_requested(self) -> Optional[Notice]:
        """Why the run must stop at this step boundary (None: it goes on). Every rank gets the same answer."""
        return Notice(self.notice.reason) if self.notice and self.notice.reason else None

    def restart_cause(self) -> Optional[str]:
        """Why the orchestrator restarted this process (None: the run was started again)."""
        return None

    def topology(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "nodes": 1}

    def load_data(self, cfg: Config, tokenizer):
        return prepared_dataset(cfg, tokenizer)

    @property
    def local(self) -> bool:
        """One process without a process group (what engines may run here: ftdist.engines)."""
        return True

    def engine_class(self, cfg: Config):
        return engine_class(resolve(cfg.distributed.engine, self.local))

    def make_engine(self, cfg: Config, model, optimizer, scheduler, resume: Optional[dict] = None):
        """`resume`: the state.json of the checkpoint the run continues from, if any."""
        engine = self.engine_class(cfg)
        if engine.needs_process_group:
            self.open_world()
        return engine.build(cfg, model, optimizer, scheduler, self.world_size, resume)

    def open_world(self) -> None:
        """A process group of this one process (gloo on CPU, NCCL on GPU) for an engine that
        steps through one, unless one is open already (Ray's, on its workers). As a launcher
        (torchrun) would, it says the process's place in the environment: engines read it."""
        import os

        import torch.distributed as dist

        if dist.is_initialized():
            return
        place = {"RANK": str(self.rank), "LOCAL_RANK": str(self.rank), "WORLD_SIZE": str(self.world_size)}
        self.launcher_env = {key: os.environ.get(key) for key in place}
        os.environ.update(place)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=self.rank, world_size=self.world_size)
        self.owns_world = True

    def close(self) -> None:
        """Close what this context opened (a later run in this process opens its own)."""
        if not self.owns_world:
            return
        import os

        import torch.distributed as dist

        dist.destroy_process_group()
        for key, value in self.launcher_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.owns_world = False

    def make_reference(self, cfg: Config, model):
        """dpo's frozen reference model, as this rank's engine runs it."""
        return self.engine_class(cfg).reference(cfg, model, self.world_size)


@dataclass
class RayContext(LocalContext):
    """A Ray Train worker: torch.distributed is set up by Ray (gloo on CPU, NCCL on GPU),
    data arrives as this worker's Ray Data shard."""

    data_stats: dict[str, Any] = field(default_factory=dict)
    split_in_workers: bool = False  # the train shard is the whole set: each rank takes its part of each batch
    signals: Any = None  # the driver's RunSignals actor (launch/restarts.py): stops and resizes asked of the run

    def all_reduce_sum(self, value):
        import torch.distributed as dist

        # NCCL reduces only GPU tensors; float64 keeps token counts exact.
        array = isinstance(value, np.ndarray)
        tensor = torch.as_tensor(np.asarray(value, np.float64).reshape(-1), device=self.device)
        dist.all_reduce(tensor)
        if array:
            return tensor.cpu().numpy().reshape(value.shape)
        total = tensor.item()
        return int(total) if isinstance(value, int) else total

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def stop_requested(self) -> Optional[Notice]:
        """A stop asked of the driver (the run ends), a node's preemption notice from Ray Train, or
        a resize the controller is about to make (the workers restart): agreed by every rank, so
        that they stop at the same step. Ray Train's preemption query is collective: every rank
        asks it at every step boundary."""
        import ray
        import ray.train

        asked = ray.get(self.signals.asked.remote(), timeout=60) if self.signals is not None else {}
        preemption = ray.train.get_preemption_info()
        stop, preempted, resize = self.all_reduce_sum(np.array(
            [asked.get("stop") is not None, preemption is not None, asked.get("resize") is not None], np.float64)) > 0
        if stop:
            return Notice(asked.get("stop") or "a stop asked of the driver")
        if preempted:  # broadcast from rank 0 by Ray Train: the same on every rank
            return Notice(describe_preemption(preemption), restarts=True,
                          deadline=preemption.deadline_ms / 1000 if preemption.deadline_ms else None,
                          nodes=tuple(preemption.preempted_node_ids))
        if resize:
            return Notice(asked.get("resize") or "a resize of the worker group", restarts=True)
        return None

    def restart_cause(self) -> Optional[str]:
        """What Ray Train's controller noted before it restarted the workers (launch/restarts.py)."""
        if self.signals is None:
            return None
        import ray

        return ray.get(self.signals.cause.remote(), timeout=60)

    def report(self, metrics: dict) -> None:
        import ray.train

        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    def topology(self) -> dict[str, Any]:
        """How many Ray nodes this process group spans (by node id: nodes may share an IP)."""
        import ray
        import torch.distributed as dist

        node_ids: list = [None] * self.world_size
        dist.all_gather_object(node_ids, ray.get_runtime_context().get_node_id())
        return {"world_size": self.world_size, "nodes": len(set(node_ids))}

    def load_data(self, cfg: Config, tokenizer):
        return dataset_from_shards(cfg, self.data_stats, whole=self.split_in_workers)

    @property
    def local(self) -> bool:
        return False


def describe_preemption(info) -> str:
    """Ray Train's PreemptionInfo in one clause: which nodes and ranks, and the time left."""
    nodes = ", ".join(node[:12] for node in info.preempted_node_ids)
    left = (f"{info.deadline_ms / 1000 - time.time():.0f} s before the node goes"
            if info.deadline_ms else "no deadline given")
    return f"preemption notice for node {nodes} (rank {', '.join(map(str, info.preempted_ranks))}; {left})"
