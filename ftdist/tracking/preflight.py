"""Before any weight loads: each tracker `logging:` asks for is installed and can be reached.
A tracker marked optional that cannot be reached is one warning, and the run goes on
without it; otherwise it is a UserError naming the key and the fix."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

from ftdist.config.redact import redact_url
from ftdist.config.schema import Config
from ftdist.errors import UserError
from ftdist.io.storage import is_remote
from ftdist.tracking.hub import warn_line
from ftdist.tracking.mlflow_run import client

PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # key -> module


def check_tracking(cfg: Config, warn=warn_line) -> Config:
    """`cfg`, less the optional trackers that cannot be reached."""
    conf = cfg.logging
    for key in ("tensorboard", "mlflow", "wandb"):
        if getattr(conf, key):
            require(key)
    if isinstance(conf.tensorboard, str):
        tensorboard_dir(conf.tensorboard)
    off = {}
    for key, probe in (("mlflow", probe_mlflow), ("wandb", probe_wandb)):
        backend = getattr(conf, key)
        problem = probe(backend) if backend else None
        if problem is None:
            continue
        if not backend.optional:
            raise UserError(f"logging.{key}: {problem}; or set logging.{key}.optional: true to train without it "
                            "when it cannot be reached")
        warn(f"ftdist: warning: logging.{key}: {problem}; training without it (logging.{key}.optional)")
        off[key] = None
    return cfg.model_copy(update={"logging": conf.model_copy(update=off)}) if off else cfg


def require(key: str) -> None:
    module = PACKAGES[key]
    try:
        importlib.import_module(module)
    except ImportError:
        raise UserError(f"logging.{key} needs the {module} package, which is not installed: "
                        f"pip install 'ftdist[{key}]' (or pip install {module}), or remove logging.{key}") from None


def probe_mlflow(conf) -> Optional[str]:
    """Why the tracking server cannot be used, or None. A file: or database store needs no server."""
    uri = conf.tracking_uri
    if not uri.startswith(("http://", "https://")):
        return None

    try:
        client(conf).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001: connection refused, DNS, TLS, 401/403, a non-MLflow server
        return (f"cannot reach the MLflow server at {redact_url(uri)} ({unreachable_reason(e)}); start it or "
                "fix logging.mlflow.tracking_uri (credentials: MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN)")
    return None


def probe_wandb(conf) -> Optional[str]:
    """Online mode needs a W&B login; offline mode writes files only."""
    if conf.mode == "offline":
        return None
    import wandb

    try:
        wandb.login(verify=True, timeout=15)
    except Exception as e:  # noqa: BLE001: no API key, a wrong one, no network
        return (f"cannot log in to W&B ({unreachable_reason(e)}); set WANDB_API_KEY or run `wandb login`, "
                "or use logging.wandb.mode: offline (then `wandb sync`)")
    return None


def unreachable_reason(error: BaseException) -> str:
    """One short line of why a tracker's client failed, credentials redacted."""
    text = str(error).strip().splitlines()
    line = text[-1] if text else type(error).__name__
    for marker in ("Connection refused", "Max retries exceeded", "timed out", "Name or service not known",
                   "401", "403"):
        if marker in str(error):
            line = {"Max retries exceeded": "no answer"}.get(marker, marker)
            break
    return redact_url(line)[:200]


def tensorboard_dir(path: str) -> None:
    """An explicit TensorBoard directory: local, and creatable."""
    if is_remote(path):
        raise UserError(f"logging.tensorboard {path}: a local directory is needed; use logging.tensorboard: true "
                        "to keep the event files in the run (in its bucket for s3:// runs)")
    try:
        Path(path).expanduser().mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"logging.tensorboard {path}: cannot create it ({e.strerror})") from None
