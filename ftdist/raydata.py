"""Data for Ray workers through Ray Data: the driver reads and validates the records (as
preflight does, ftdist.records), Ray Data tokenizes and packs them in map_batches (small
data: in the driver, into in-memory datasets), shards them across workers
(ray.train.get_dataset_shard).

The driver builds the datasets once (`ray_datasets`); each worker turns its shard of the
training rows, and the whole eval and retention sets (each rank evaluates every
world_size-th row of them), into the same `Dataset` local mode builds in-process, so the
loop cannot tell the two apart. A shard is held in the worker's memory, which keeps the
per-epoch order a function of (seed, rank, epoch) and therefore resumable.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ftdist.config import Config
from ftdist.data import Dataset, Rows, pack, tokenize_records
from ftdist.records import read_records, read_retention

PACK_BATCH_ROWS = 512  # examples packed together per map_batches call
DRIVER_PACK_MAX_BYTES = 16 * 2**20  # data files up to this size in all are packed by the driver
COLUMNS = ("ids", "targets", "positions", "doc")
SPLIT = ["train"]  # eval and retention go whole to every worker (small data: train too, packs_on_driver)


@functools.lru_cache(maxsize=4)
def cached_tokenizer(source: str, chat_template: Optional[str]):
    """Once per Ray worker process: tasks that pack batches reuse their process."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def tokenize_and_pack(batch, tokenizer_source: str, chat_template: Optional[str], max_length: int, packing: bool,
                      seed: int):
    """map_batches function: records -> packed token rows (one Arrow row each)."""
    return pack_items(batch.to_pylist(), cached_tokenizer(tokenizer_source, chat_template), max_length, packing, seed)


def pack_items(records: list[dict], tokenizer, max_length: int, packing: bool, seed: int):
    """One batch of records -> an Arrow table of packed token rows.

    Examples are shuffled before packing, as local mode does, so that a row mixes the data;
    the loop reshuffles whole rows every epoch.
    """
    import pyarrow as pa

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    records = [{k: v for k, v in r.items() if v is not None} for r in records]  # Arrow's nulls for absent keys
    random.Random(seed).shuffle(records)
    examples, stats = tokenize_records(tokenizer, records, max_length)
    rows = pack(examples, max_length, packing, pad_id)
    table = {name: [a.astype(np.int32).tolist() for a in getattr(rows, name)] for name in COLUMNS}
    table["truncated"] = ([stats["truncated"]] + [0] * (len(rows) - 1)) if len(rows) else []
    return pa.table(table, schema=pa.schema([*(pa.field(n, pa.list_(pa.int32())) for n in COLUMNS),
                                             pa.field("truncated", pa.int64())]))


def ray_datasets(cfg: Config, base_path: str, fmt: str) -> dict[str, Any]:
    """The driver's side: Ray datasets of packed rows for train, eval, retention.

    The records are read here, where a bad row is named by file and line (and skipped with
    data.skip_bad_rows), whatever the source's file type. Small data (DRIVER_PACK_MAX_BYTES of
    local files in all) is tokenized and packed right here too, in the same PACK_BATCH_ROWS
    batches with the same function, into in-memory datasets: Ray Data tasks would each start
    a process and import the tokenizer stack, which takes far longer than the work. Larger
    data is packed by Ray Data tasks, lazily.
    """
    import ray.data

    from ftdist.chat_templates import require_template
    from ftdist.model import load_tokenizer, run_tokenizer_source

    d = cfg.data
    tokenizer = load_tokenizer(cfg, base_path)
    require_template(tokenizer, fmt)
    sources = {"train": read_records(d.train, d, fmt)[0]}
    if d.eval:
        sources["eval"] = read_records(d.eval, d, fmt, key="data.eval")[0]
    if d.retention:
        sources["retention"] = read_retention(d)

    if packs_on_driver(cfg):
        def packed(records: list[dict]):
            rows = [row for i in range(0, len(records), PACK_BATCH_ROWS)
                    for row in pack_items(records[i : i + PACK_BATCH_ROWS], tokenizer, d.max_length, d.packing,
                                          cfg.train.seed).to_pylist()]
            # from_items builds its blocks here (from_arrow would run a task per table for its metadata).
            return ray.data.from_items(rows, override_num_blocks=1)

        return {name: packed(records) for name, records in sources.items()}

    def packed(ds):
        return ds.map_batches(tokenize_and_pack, batch_size=PACK_BATCH_ROWS, batch_format="pyarrow",
                              fn_args=(run_tokenizer_source(cfg, base_path), tokenizer.chat_template, d.max_length,
                                       d.packing, cfg.train.seed))

    datasets = {name: packed(ray.data.from_items(records)) for name, records in sources.items() if name != "train"}
    train = ray.data.from_items(sources["train"])
    if not d.eval and d.eval_fraction > 0:
        train, held_out = train.train_test_split(test_size=d.eval_fraction, shuffle=True, seed=cfg.train.seed)
        datasets["eval"] = packed(held_out)
    datasets["train"] = packed(train)
    return datasets


def packs_on_driver(cfg: Config) -> bool:
    """Whether the data is small enough to pack in the driver (and needs no Ray Data split)."""
    d = cfg.data
    paths = [p for p in (d.train, d.eval, d.retention) if p]
    if d.eval_fraction > 0 and not d.eval:  # the held-out split is Ray Data's (train_test_split)
        return False
    if not all(Path(p).is_file() for p in paths):  # directories, globs, hub ids: possibly large
        return False
    return sum(Path(p).stat().st_size for p in paths) <= DRIVER_PACK_MAX_BYTES


def rows_of(shard, part: Optional[tuple[int, int]] = None) -> tuple[Optional[Rows], int]:
    """A worker's shard (a Ray DataIterator) read into memory, and how many of its examples
    were truncated; (None, 0) for no shard. `part` (rank, world size): the shard is the whole
    dataset, of which this worker keeps rows rank, rank + world size, ..., as many as every
    rank gets (what streaming_split(equal=True) would give it)."""
    if shard is None:
        return None, 0
    rows = Rows([], [], [], [])
    truncated = []
    for batch in shard.iter_batches(batch_size=256, batch_format="pyarrow"):
        for name in COLUMNS:
            getattr(rows, name).extend(np.asarray(x, dtype=np.int64) for x in batch.column(name).to_pylist())
        truncated.extend(batch.column("truncated").to_pylist())
    if part is not None:
        rank, world = part
        keep = list(range(rank, len(rows) - len(rows) % world, world))
        rows = Rows(*([getattr(rows, name)[i] for i in keep] for name in COLUMNS))
        truncated = [truncated[i] for i in keep]
    return rows, sum(truncated)


def dataset_from_shards(cfg: Config, stats: dict[str, Any], part: Optional[tuple[int, int]] = None) -> Dataset:
    """The worker's side: its Ray Data shards as the loop's Dataset. `part` (rank, world
    size): the train shard is the whole training set, of which this worker takes its part."""
    import ray.train

    def shard(name: str):
        try:
            return ray.train.get_dataset_shard(name)
        except KeyError:
            return None

    (train, truncated), (eval_rows, _), (retention, _) = (rows_of(shard(n), part if n == "train" else None)
                                                          for n in ("train", "eval", "retention"))
    stats = dict(stats, shard_rows=len(train), shard_target_tokens=train.target_tokens(), shard_truncated=truncated)
    if eval_rows is not None:
        stats["eval_rows"] = len(eval_rows)
    if retention is not None:
        stats["retention_rows"] = len(retention)
    return Dataset(train, eval_rows, retention, stats.get("format", cfg.data.format), stats)
