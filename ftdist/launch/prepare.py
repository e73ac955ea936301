"""`ftdist prepare`: a config's data tokenized and packed into the prepared-data cache ahead of
its runs (what the runs would otherwise do at their start), and what was made, told."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import TYPE_CHECKING

from ftdist.config.schema import SPLITS, Config
from ftdist.data.prepared import prepared_dataset
from ftdist.launch.preflight import check_inputs
from ftdist.launch.rundir import writing
from ftdist.model.source import builds_own_base, load_tokenizer

if TYPE_CHECKING:
    from ftdist.data.rows import Dataset


def prepare(cfg: Config) -> list[str]:
    """Build (or find) a config's prepared rows ahead of its runs; the lines to print."""
    from ftdist.training.base import resolve_base

    started = time.perf_counter()
    checked = check_inputs(cfg)
    # A tokenizer trained for model.init (or a GGUF file's) lives with the run's base model: the
    # run's directory, written by this command alone while it builds it.
    with writing(cfg) if builds_own_base(cfg.model) else nullcontext() as store:
        tokenizer = load_tokenizer(checked.cfg, resolve_base(checked.cfg, store))
    dataset = prepared_dataset(checked.cfg, tokenizer)
    return describe(dataset, cfg.data.packing) + [
        f"prepared in {time.perf_counter() - started:.1f} s: {dataset.stats.get('prepared', 'not cached (hub data)')}"]


def describe(dataset: "Dataset", packing: bool) -> list[str]:
    lines = []
    for split in SPLITS:
        rows = getattr(dataset, split)
        if rows is None:
            continue
        tokens = rows.tokens()
        # Of the rows' token slots (data.max_length a row; twice that for preference pairs' rows).
        filled = f", packing efficiency {tokens / len(rows.flat['ids']):.1%}" if packing and len(rows) else ""
        lines.append(f"{split}: {len(rows)} rows, {tokens} tokens ({rows.target_tokens()} trained on){filled}, "
                     f"{rows.nbytes() / 2**20:.1f} MiB")
    from ftdist.data.rows import source_line  # torch: off `ftdist prepare`'s path to a config error

    stats = dataset.stats
    lines[1:1] = [f"  {source_line(s)}" for s in stats.get("sources", [])]
    unit = {"preference": "pairs", "prompt": "prompts"}.get(dataset.format, "examples")
    lines.insert(0, f"data: {dataset.format}, {stats.get('examples', '?')} training {unit}"
                    + (f", {stats['skipped_rows']} bad rows skipped" if stats.get("skipped_rows") else "")
                    + (f", {stats['truncated']} cut to data.max_length" if stats.get("truncated") else "")
                    + (f", {stats['dropped_no_target']} dropped (no token to learn)"
                       if stats.get("dropped_no_target") else ""))
    return lines
