"""What trackers are told of a run: the resolved config as flat dotted parameters (secrets
redacted as in the snapshot), tags, and the numbers of a metrics-log record."""

from __future__ import annotations

import json
from typing import Any, Optional

from ftdist.config.redact import redacted
from ftdist.config.schema import Config


def flat_params(cfg: Config) -> dict[str, Any]:
    """{"train.lr": 0.0002, "lora.rank": 8, ...}: leaves of the config, redacted; lists as JSON."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
            return
        key = prefix.rstrip(".")
        flat[key] = json.dumps(node) if isinstance(node, (list, dict)) else node

    walk(redacted(cfg.model_dump(mode="json", exclude={"tune"})), "")
    return flat


def run_tags(cfg: Config, layout: Optional[dict] = None) -> dict[str, str]:
    """What runs are filtered and grouped by in a tracker's UI. `layout`: how this run really
    trains (the engine's layout record: world_size, zero_stage); None: as the config says."""
    d = cfg.distributed
    workers, stage = (layout["world_size"], layout.get("zero_stage")) if layout else (
        "-".join(map(str, d.workers)) if d.elastic else d.workers, d.zero_stage)
    return {"method": cfg.method, "freeze_layers": str(cfg.freeze_layers), "workers": str(workers),
            "zero_stage": "none" if stage is None else str(stage)}


def record_metrics(record: dict) -> Optional[tuple[int, dict[str, float]]]:
    """(step, numbers) of a step or evaluation record; None for events (start, checkpoint, ...)."""
    if "event" in record or "step" not in record:
        return None
    numbers = {k: float(v) for k, v in record.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return (int(record["step"]), numbers) if numbers else None
