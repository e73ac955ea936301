"""Data for Ray workers through Ray Data: read JSONL, tokenize and pack in map_batches (small
files: in the driver, into in-memory datasets), shard across workers (ray.train.get_dataset_shard).

The driver builds the datasets once (`ray_datasets`); each worker turns its shard of the
training rows, and the whole eval and retention sets (each rank evaluates every
world_size-th row of them), into the same `Dataset` local mode builds in-process, so the
loop cannot tell the two apart. A shard is held in the worker's memory, which keeps the
per-epoch order a function of (seed, rank, epoch) and therefore resumable.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ftdist.config import Config
from ftdist.data import Dataset, Rows, pack, tokenize_records
from ftdist.records import check_record, read_jsonl, read_text_file

PACK_BATCH_ROWS = 512  # examples packed together per map_batches call
DRIVER_PACK_MAX_BYTES = 16 * 2**20  # data files up to this size in all are packed by the driver
COLUMNS = ("ids", "targets", "positions", "doc")
SPLIT = ["train"]  # eval and retention go whole to every worker (small data: train too, packs_on_driver)


@functools.lru_cache(maxsize=4)
def cached_tokenizer(path: str):
    """Once per Ray worker process: tasks that pack batches reuse their process."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def tokenize_and_pack(batch, tokenizer_path: str, fmt: str, max_length: int, packing: bool, skip_bad_rows: bool,
                      seed: int, from_lines: bool):
    """map_batches function: records (or JSON lines) -> packed token rows (one Arrow row each).

    Examples are shuffled before packing, as local mode does, so that a row mixes the data;
    the loop reshuffles whole rows every epoch.
    """
    items = [item["text"] for item in batch.to_pylist()] if from_lines else batch.to_pylist()
    return pack_items(items, cached_tokenizer(tokenizer_path), fmt, max_length, packing, skip_bad_rows, seed,
                      from_lines)


def pack_items(items: list, tokenizer, fmt: str, max_length: int, packing: bool, skip_bad_rows: bool, seed: int,
               from_lines: bool):
    """One batch of records (or JSON lines) -> an Arrow table of packed token rows."""
    import pyarrow as pa

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    records = []
    for item in items:
        try:
            record = json.loads(item) if from_lines else item
            if not from_lines:
                record = {k: v for k, v in record.items() if v is not None}  # Arrow fills absent keys with null
            if check_record(record) != fmt:
                raise ValueError(fmt)
        except (ValueError, TypeError):
            if skip_bad_rows:  # the driver's check let bad rows through only with skip_bad_rows
                continue
            raise
        records.append(record)
    random.Random(seed).shuffle(records)
    examples, stats = tokenize_records(tokenizer, records, fmt, max_length)
    rows = pack(examples, max_length, packing, pad_id)
    table = {name: [a.astype(np.int32).tolist() for a in getattr(rows, name)] for name in COLUMNS}
    table["truncated"] = ([stats["truncated"]] + [0] * (len(rows) - 1)) if len(rows) else []
    return pa.table(table, schema=pa.schema([*(pa.field(n, pa.list_(pa.int32())) for n in COLUMNS),
                                             pa.field("truncated", pa.int64())]))


def ray_datasets(cfg: Config, tokenizer_path: str, fmt: str) -> dict[str, Any]:
    """The driver's side: Ray datasets of packed rows for train, eval, retention.

    Small local files (DRIVER_PACK_MAX_BYTES in all) are tokenized and packed right here, in
    the same PACK_BATCH_ROWS batches with the same function, into in-memory datasets: Ray
    Data tasks would each start a process and import the tokenizer stack, which takes far
    longer than the work. Larger data is read and packed by Ray Data tasks, lazily.

    Files are read with `read_json`; with data.skip_bad_rows they are read as lines and
    parsed in map_batches instead, because Arrow's JSON reader fails a whole file on one
    unparsable line or wrongly typed value, which is exactly what skipping is for.
    """
    d = cfg.data
    if packs_on_driver(cfg):
        return driver_datasets(cfg, tokenizer_path, fmt)
    import ray.data

    from_lines = d.skip_bad_rows

    def read(path: str):
        return ray.data.read_text(on_driver(path)) if from_lines else ray.data.read_json(on_driver(path))

    def packed(ds, row_fmt: str, lines: bool = from_lines):
        return ds.map_batches(
            tokenize_and_pack, batch_size=PACK_BATCH_ROWS, batch_format="pyarrow",
            fn_args=(tokenizer_path, row_fmt, d.max_length, d.packing, d.skip_bad_rows, cfg.train.seed, lines))

    records = read(d.train)
    datasets = {}
    if d.eval:
        datasets["eval"] = packed(read(d.eval), fmt)
    elif d.eval_fraction > 0:
        records, held_out = records.train_test_split(test_size=d.eval_fraction, shuffle=True, seed=cfg.train.seed)
        datasets["eval"] = packed(held_out, fmt)
    datasets["train"] = packed(records, fmt)
    if d.retention:
        datasets["retention"] = packed(ray.data.from_items(read_text_file(d.retention)), "text", lines=False)
    return datasets


def packs_on_driver(cfg: Config) -> bool:
    """Whether the data is small enough to pack in the driver (and needs no Ray Data split)."""
    d = cfg.data
    paths = [p for p in (d.train, d.eval, d.retention) if p]
    if d.eval_fraction > 0 and not d.eval:  # the held-out split is Ray Data's (train_test_split)
        return False
    if any("://" in p or not Path(p).is_file() for p in paths):
        return False
    return sum(Path(p).stat().st_size for p in paths) <= DRIVER_PACK_MAX_BYTES


def driver_datasets(cfg: Config, tokenizer_path: str, fmt: str) -> dict[str, Any]:
    """`ray_datasets` for small local files: packed here by the same `pack_items`, in batches
    of PACK_BATCH_ROWS records (read and validated as preflight reads them, bad rows skipped
    with data.skip_bad_rows), as in-memory datasets."""
    import ray.data
    from transformers import AutoTokenizer

    d = cfg.data
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)

    def packed(records: list[dict], row_fmt: str):
        rows = [row for i in range(0, len(records), PACK_BATCH_ROWS)
                for row in pack_items(records[i : i + PACK_BATCH_ROWS], tokenizer, row_fmt, d.max_length, d.packing,
                                      d.skip_bad_rows, cfg.train.seed, from_lines=False).to_pylist()]
        # from_items builds its blocks here (from_arrow would run a task per table for its metadata).
        return ray.data.from_items(rows, override_num_blocks=1)

    datasets = {"train": packed(read_jsonl(d.train, fmt, d.skip_bad_rows)[0], fmt)}
    if d.eval:
        datasets["eval"] = packed(read_jsonl(d.eval, fmt, d.skip_bad_rows)[0], fmt)
    if d.retention:
        datasets["retention"] = packed(read_text_file(d.retention), "text")
    return datasets


def on_driver(path: str) -> str:
    """Absolute, as read tasks run in other processes (and on other nodes: there the path
    must exist too, as it does in a `ray job submit` working dir or on shared storage)."""
    return path if "://" in path else str(Path(path).resolve())


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
