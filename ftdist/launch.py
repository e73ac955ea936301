"""From a validated config to a finished run: preflight, run directory, the loop.

Preflight runs before any weight is loaded: paths exist, the dtype suits the hardware,
the model fits in memory. Each failure is a UserError that says what to change.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ftdist.config import Config
from ftdist.context import LocalContext, default_device
from ftdist.errors import UserError
from ftdist.rundir import is_finished, prepare_run_dir

# Bytes per parameter while training (weights + gradient + AdamW's two moments, fp32).
BYTES_TRAINABLE = 4 + 4 + 8
BYTES_FROZEN = {"full": 4, "lora": 4, "qlora": 0.5 + 0.1}  # NF4 plus quantization constants
ACTIVATION_MARGIN = 1.3


def check_paths(cfg: Config) -> None:
    for key in ("train", "eval", "retention"):
        value = getattr(cfg.data, key)
        if value is None:
            continue
        if value.startswith("s3://"):
            raise UserError(f"data.{key} {value}: s3:// data is not supported yet; use a local file")
        if not Path(value).is_file():
            raise UserError(f"data.{key}: file not found: {value}")
    if cfg.model.tokenizer and not cfg.model.tokenizer.startswith("s3://") and cfg.model.tokenizer.startswith((".", "/")):
        if not Path(cfg.model.tokenizer).exists():
            raise UserError(f"model.tokenizer: not found: {cfg.model.tokenizer}")


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
    source = check_model_source(cfg.model.name_or_path)
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"model.name_or_path {source}: cannot read its config: {e}") from None


def estimate_training_bytes(cfg: Config, model_config) -> tuple[int, int]:
    """(bytes needed, parameter count): weights, gradients and optimizer states, with a margin."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        shell = AutoModelForCausalLM.from_config(model_config)
    n = sum(p.numel() for p in shell.parameters())
    if cfg.method == "full":
        need = n * BYTES_TRAINABLE
    else:
        need = n * BYTES_FROZEN[cfg.method] + 0.05 * n * BYTES_TRAINABLE  # adapters: a few % at most
    return int(need * ACTIVATION_MARGIN), n


def check_fits(cfg: Config, device: torch.device) -> None:
    import psutil

    model_config = model_config_of(cfg)
    layers = model_config.num_hidden_layers
    if isinstance(cfg.freeze_layers, int) and cfg.freeze_layers > layers:
        raise UserError(f"freeze_layers {cfg.freeze_layers} is more than the model's {layers} layers; "
                        f"use at most {layers}, or 'all' for feature extraction")
    need, n = estimate_training_bytes(cfg, model_config)
    if device.type == "cuda":
        have = torch.cuda.mem_get_info(device)[0]
    else:
        have = psutil.virtual_memory().available
    if need > have:
        advice = "use method: qlora or lora" if cfg.method == "full" else "use a smaller model"
        raise UserError(
            f"the model ({n / 1e9:.2f}B parameters, method {cfg.method}) needs about {need / 2**30:.1f} GiB "
            f"to train but {device.type} has {have / 2**30:.1f} GiB free; {advice}, or run on a Ray cluster"
        )


def preflight(cfg: Config, device: torch.device) -> None:
    check_paths(cfg)
    check_dtype(cfg, device)
    check_fits(cfg, device)


def train_local(cfg: Config, restart: bool = False, show_progress: bool = True) -> dict:
    from ftdist.loop import FINAL_DIR, train

    device = default_device()
    preflight(cfg, device)
    run_dir = prepare_run_dir(cfg, restart)
    if is_finished(run_dir):
        print(f"{run_dir} is already finished; rerun with --restart to train again", flush=True)
        import json

        summary = json.loads((run_dir / "summary.json").read_text())
    else:
        summary = train(cfg, LocalContext(run_dir=run_dir, device=device, show_progress=show_progress))
    summary.update(run_dir=str(run_dir), final_dir=str(run_dir / FINAL_DIR))
    return summary
