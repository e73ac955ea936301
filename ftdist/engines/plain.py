"""The plain engine: the model's own weights, a torch optimizer and scheduler, every state whole
on every rank. One process in local mode; on N Ray workers, data-parallel as DDP is: the same
weights on every rank (rank 0's broadcast at the start), gradients averaged over the ranks
(torch.distributed all-reduce) before the update, so every rank takes the same step.

Checkpoint files (rank 0 writes them; every rank, at any world size, reads them):
model.safetensors (the trained weights) or adapter/ (a PEFT adapter directory), optimizer.pt,
scheduler.pt.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Optional

import torch
from safetensors.torch import load_file, save_file

from ftdist.engines.base import (
    Layout,
    MasterShare,
    MicroLoss,
    Sharding,
    frozen_names,
    is_adapter_model,
    nothing,
    refuse_other_engine,
    tied_names,
    trainable_names,
    unique_tensors,
    whole_shares,
)
from ftdist.errors import UserError
from ftdist.io.safeload import safe_load

WEIGHTS = "model.safetensors"
ADAPTER_DIR = "adapter"
# Gradients are all-reduced in flat buckets of at most this many elements (one call per bucket,
# a bounded extra copy).
BUCKET_ELEMENTS = 2**24


class PlainEngine:
    """AdamW + scheduler on each rank, gradients averaged over the ranks."""

    name: ClassVar[str] = "plain"
    WEIGHT_FILES: ClassVar[tuple[str, ...]] = (WEIGHTS, f"{ADAPTER_DIR}/")
    needs_process_group: ClassVar[bool] = False  # one process needs none; on Ray workers, Ray's

    def __init__(self, model, optimizer, scheduler, grad_clip: Optional[float], world_size: int = 1):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_clip = grad_clip or float("inf")
        self.forward = model
        self.world_size = world_size
        self.layout = Layout(self.name, world_size, None)
        if world_size > 1:
            self.broadcast_weights()

    # ------------------------------------------------------------ building

    @classmethod
    def build(cls, cfg, model, optimizer, scheduler, world_size: int, resume: Optional[dict] = None) -> "PlainEngine":
        return cls(model, optimizer, scheduler, cfg.train.grad_clip, world_size)

    @classmethod
    def reference(cls, cfg, model, world_size: int):
        return model  # weights whole on every rank: the reference is the model (adapters off, or a copy)

    # ------------------------------------------------------------ planning and memory

    @classmethod
    def describe(cls, cfg) -> str:
        return "plain engine (data-parallel: gradients all-reduced, every state whole on each worker)"

    @classmethod
    def sharding(cls, cfg, world_size: int) -> Sharding:
        return Sharding()  # nothing divided, nothing offloaded

    @classmethod
    def memory_tips(cls, cfg, world_size: int, estimate, fits) -> list[str]:
        return []

    @classmethod
    def scale_out_tip(cls, cfg, world_size: int) -> Optional[str]:
        if cfg.method == "qlora":
            return "use a smaller model"
        # Only a partitioning engine divides states over more devices.
        explicit = " and distributed.engine: deepspeed" if cfg.distributed.engine == "plain" else ""
        return f"use more distributed.workers with distributed.zero_stage 3{explicit}"

    # ------------------------------------------------------------ checkpoint files

    @classmethod
    def file_rank(cls, name: str) -> Optional[int]:
        return None  # rank 0 writes every file; every rank reads them

    @classmethod
    def pickled_classes(cls) -> list[Any]:
        return []  # optimizer.pt and scheduler.pt: tensors and containers

    @classmethod
    def holds_weights(cls, checkpoint: Path) -> bool:
        return (checkpoint / WEIGHTS).is_file() or cls.adapter_folder(checkpoint) is not None

    @classmethod
    def read_weights(cls, checkpoint: Path, adapters_only: bool) -> dict[str, torch.Tensor]:
        if adapters_only or not (checkpoint / WEIGHTS).is_file():
            # Adapters are read as PEFT's directory (adapter_folder), by PEFT's names.
            raise UserError(f"{checkpoint}: holds the plain engine's {ADAPTER_DIR}/, read through PEFT; "
                            f"export it as adapters")
        return load_file(str(checkpoint / WEIGHTS))

    @classmethod
    def adapter_folder(cls, checkpoint: Path) -> Optional[Path]:
        folder = checkpoint / ADAPTER_DIR
        return folder if (folder / "adapter_config.json").is_file() else None

    # ------------------------------------------------------------ the engine

    def broadcast_weights(self) -> None:
        """Every rank starts from rank 0's trained weights (an adapter's random init included)."""
        import torch.distributed as dist

        with torch.no_grad():
            for p in self.model.parameters():
                if p.requires_grad:
                    dist.broadcast(p.data, src=0)

    def average_gradients(self) -> None:
        """Each trained weight's gradient averaged over the ranks, in flat buckets. A weight
        without a gradient counts as zero, so every rank reduces the same buckets."""
        import torch.distributed as dist

        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            by_kind.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
        for grads in by_kind.values():
            start = 0
            while start < len(grads):
                bucket, size = [], 0
                while start < len(grads) and (not bucket or size + grads[start].numel() <= BUCKET_ELEMENTS):
                    bucket.append(grads[start])
                    size += grads[start].numel()
                    start += 1
                flat = torch.cat([g.reshape(-1) for g in bucket])
                dist.all_reduce(flat)
                flat /= self.world_size
                offset = 0
                for g in bucket:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()

    @contextlib.contextmanager
    def generating(self) -> Iterator[torch.nn.Module]:
        yield self.model

    def step(self, micro_batches: list[dict], loss: MicroLoss, before_update: Callable[[], None] = nothing) -> float:
        for batch in micro_batches:
            loss(self.forward, batch).backward()
        if self.world_size > 1:
            self.average_gradients()
        before_update()
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save(self, path: Path, is_main: bool) -> Optional[Callable[[], None]]:
        """Copy the states in memory (milliseconds) and return the function that writes them,
        which the checkpoint's background job runs while training goes on. Every rank holds the
        same states: rank 0 alone writes them."""
        if not is_main:
            return None
        adapter = is_adapter_model(self.model)
        if adapter:
            from peft import get_peft_model_state_dict

            weights = get_peft_model_state_dict(self.model)
        else:  # the trained weights: frozen ones are the base's, loaded again on resume
            trained = trainable_names(self.model)
            weights = {k: v for k, v in unique_tensors(self.model.state_dict()).items() if k in trained}
        weights = {k: v.detach().clone() for k, v in weights.items()}
        optimizer, scheduler = copy.deepcopy(self.optimizer.state_dict()), copy.deepcopy(self.scheduler.state_dict())

        def write() -> None:
            if adapter:  # the adapters' state as PEFT saves it (PEFT's save_pretrained wants the whole
                # model's state: given only the adapters', it fails on a modules_to_save head)
                folder = path / ADAPTER_DIR
                folder.mkdir(parents=True, exist_ok=True)
                self.model.peft_config["default"].save_pretrained(str(folder))
                save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
            else:
                save_file(weights, str(path / WEIGHTS), metadata={"format": "pt"})
            torch.save(optimizer, path / "optimizer.pt")
            torch.save(scheduler, path / "scheduler.pt")
        return write

    def load(self, path: Path, saved: dict) -> None:
        refuse_other_engine(path, saved, self.name)
        if is_adapter_model(self.model):
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, load_file(str(path / ADAPTER_DIR / "adapter_model.safetensors")))
        else:
            missing, unexpected = self.model.load_state_dict(load_file(str(path / WEIGHTS)), strict=False)
            missing = set(missing) - tied_names(self.model) - frozen_names(self.model)
            if unexpected or missing:
                raise UserError(f"{path}/{WEIGHTS} does not fit this model (missing "
                                f"{sorted(missing)[:3]}, unexpected {unexpected[:3]}); rerun with --restart")
        self.optimizer.load_state_dict(safe_load(path / "optimizer.pt"))
        self.scheduler.load_state_dict(safe_load(path / "scheduler.pt"))

    def master_shares(self, params: list[tuple[str, torch.nn.Parameter]], rank: int) -> list[MasterShare]:
        return whole_shares(params, rank)

    def model_state(self) -> Optional[dict[str, torch.Tensor]]:
        """None: the model's own state dict is complete."""
        return None
