"""From a validated config to a finished run: preflight, run directory, the loop.

Preflight runs before any weight is loaded: paths exist, the dtype suits the hardware,
the model fits in memory. Each failure is a UserError that says what to change.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ftdist import memory
from ftdist.config import Config
from ftdist.context import LocalContext, default_device
from ftdist.errors import UserError
from ftdist.memory import GiB, MemoryEstimate
from ftdist.rundir import is_finished, prepare_run_dir
from ftdist.storage import RunStore, fetch, is_remote


def check_paths(cfg: Config) -> None:
    for key in ("train", "eval", "retention"):
        value = getattr(cfg.data, key)
        if value is None or is_remote(value):  # fetched (and checked) by localize_data
            continue
        if not Path(value).is_file():
            raise UserError(f"data.{key}: file not found: {value}")
    if cfg.model.tokenizer and cfg.model.tokenizer.startswith((".", "/")):
        if not Path(cfg.model.tokenizer).exists():
            raise UserError(f"model.tokenizer: not found: {cfg.model.tokenizer}")


def localize_data(cfg: Config) -> Config:
    """The config with s3:// data files replaced by local copies (fetched once into the cache):
    data is read where the run starts (this process, or the Ray driver)."""
    local = {}
    for key in ("train", "eval", "retention"):
        value = getattr(cfg.data, key)
        if value is not None and is_remote(value):
            local[key] = str(fetch(value, cfg.storage, "data"))
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=local)}) if local else cfg


def check_dtype(cfg: Config, device: torch.device) -> None:
    if cfg.model.dtype == "float16" and device.type == "cpu":
        raise UserError(
            f"model.dtype float16 needs a GPU{' (for qlora too)' if cfg.method == 'qlora' else ''}; "
            "on CPU use float32 or bfloat16 (or auto)"
        )
    if cfg.model.dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("model.dtype bfloat16: this GPU has no bfloat16; use float16 or auto")


def model_config_of(cfg: Config):
    from transformers import AutoConfig

    from ftdist.model import check_model_source, init_model_config

    if cfg.model.init:
        return init_model_config(cfg.model.init)
    source = check_model_source(cfg.model.name_or_path, cfg.storage)
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"model.name_or_path {source}: cannot read its config: {e}") from None


def check_fits(cfg: Config, device: torch.device, workers: int = 1, zero_stage: int = 0,
               available: float | None = None) -> MemoryEstimate:
    """The memory estimate per device; a UserError with advice when it exceeds `available`."""
    import psutil

    from ftdist.model import compute_dtype

    model_config = model_config_of(cfg)
    layers = model_config.num_hidden_layers
    if isinstance(cfg.freeze_layers, int) and cfg.freeze_layers > layers:
        raise UserError(f"freeze_layers {cfg.freeze_layers} is more than the model's {layers} layers; "
                        f"use at most {layers}, or 'all' for feature extraction")
    dtype = compute_dtype(cfg, device)
    est = memory.estimate(cfg, model_config, workers, zero_stage, dtype)
    if available is None:
        available = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    if est.device_total > available:
        tips = memory.advice(cfg, model_config, workers, dtype, available)
        raise UserError(
            f"the model ({est.total_params / 1e9:.2f}B parameters, method {cfg.method}) needs about "
            f"{est.device_total / GiB:.1f} GiB per {device.type} device to train ({est.describe()}) but "
            f"{available / GiB:.1f} GiB is free; " + "; or ".join(tips)
        )
    return est


def preflight(cfg: Config, device: torch.device) -> None:
    check_paths(cfg)
    check_dtype(cfg, device)
    check_fits(cfg, device)


def train_local(cfg: Config, restart: bool = False, show_progress: bool = True) -> dict:
    from ftdist.loop import train

    device = default_device()
    preflight(cfg, device)
    store = prepare_run_dir(cfg, restart)
    if is_finished(store):
        return finished_summary(store)
    train(localize_data(cfg), LocalContext(store=store, device=device, show_progress=show_progress))
    return read_summary(store)


def finished_summary(store: RunStore) -> dict:
    print(f"{store.url} is already finished; rerun with --restart to train again", flush=True)
    return read_summary(store)


def read_summary(store: RunStore) -> dict:
    import json

    from ftdist.loop import FINAL_DIR

    summary = json.loads(store.read_text("summary.json"))
    summary.update(run_dir=store.url, final_dir=store.path(FINAL_DIR))
    return summary
