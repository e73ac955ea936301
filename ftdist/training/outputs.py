"""What a finished run leaves, written by rank 0: final/ (a plain HF model or a PEFT adapter,
with the tokenizer and final/ftdist.json), summary.json and the plots; for s3:// runs all of
it published to the store, final/ftdist.json last, since it marks the run finished."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ftdist.config.schema import Config
from ftdist.io import safewrite
from ftdist.io.checkpoints import rerun_starts
from ftdist.io.layout import FINAL_DIR, FINAL_META, FINISHED, METRICS, PLOTS, SUMMARY
from ftdist.io.space import no_room_stops
from ftdist.objectives.registry import resolve


def save_final(run_dir: Path, cfg: Config, model, tokenizer, base_path: str,
               model_state: Optional[dict] = None) -> Path:
    """final/: a plain HF model (full) or PEFT adapter (lora/qlora), with the tokenizer.
    `model_state`: the full state gathered from ZeRO-3 partitions, else the model's own."""
    final = run_dir / FINAL_DIR
    tmp = run_dir / (FINAL_DIR + ".tmp")
    what = "the final model"
    # Written aside, in a directory of ftdist's own (never through a link), then renamed into place.
    safewrite.remove(tmp, run_dir, what)
    safewrite.check(final, run_dir, what)
    safewrite.make_dirs(tmp, run_dir, what)
    with no_room_stops(tmp, f"{FINAL_DIR}/ (the trained model)",
                       "free space there (or set run.output elsewhere) and run the same command again: "
                       + rerun_starts(run_dir)):
        write_final(tmp, run_dir, cfg, model, tokenizer, base_path, model_state)
    safewrite.remove(final, run_dir, what)
    safewrite.rename(tmp, final, run_dir, what)
    return final


def write_final(tmp: Path, run_dir: Path, cfg: Config, model, tokenizer, base_path: str,
                model_state: Optional[dict]) -> None:
    # The objective writes the model (a classifier's as one), and adds to final/ftdist.json.
    own = resolve(cfg).write_final(tmp, model, tokenizer, model_state)
    tokenizer.save_pretrained(tmp)
    meta = {"method": cfg.method, "base_model": base_path, "qlora": cfg.qlora.model_dump(),
            "dtype": cfg.model.dtype, "task": cfg.task, **own}
    safewrite.write_text(tmp / FINAL_META, run_dir, "the final model", json.dumps(meta, indent=2))


def write_summary(run_dir: Path, summary: dict) -> None:
    safewrite.write_text(run_dir / SUMMARY, run_dir, "the run's summary",
                         json.dumps(summary, indent=2, default=_jsonable))


def publish(store) -> None:
    """Summary, log, plots and the final model into the store (s3:// runs; no-ops locally)."""
    for rel in [SUMMARY, METRICS, *(name for name in PLOTS if (store.local / name).is_file())]:
        store.upload(rel)
    store.upload(FINAL_DIR, skip={FINISHED})
    store.upload(FINISHED)


def _jsonable(value):
    return float(value) if isinstance(value, (np.floating, torch.Tensor)) else str(value)
