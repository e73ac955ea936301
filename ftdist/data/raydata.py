"""Data for Ray workers through Ray Data: the driver prepares the packed rows once (the
prepared-data cache, ftdist.data.prepared: validated, tokenized and packed as local mode does, or
read back from an earlier run), hands them to Ray Data as Arrow tables of token lists, and
Ray Data shards them across workers (ray.train.get_dataset_shard).

Each worker turns its shard of the training rows, and the whole eval and retention sets
(each rank evaluates every world_size-th row of them), into the same `Dataset` local mode
builds in-process, so the loop cannot tell the two apart. A shard is held in the worker's
memory, compact (ftdist.data.rows.Rows), which keeps the per-epoch order a function of (seed,
rank, epoch) and therefore resumable.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ftdist.config.schema import SPLITS, Config
from ftdist.data.prepared import prepared_dataset
from ftdist.data.rows import COLUMNS, Dataset, Rows, empty_rows

SPLIT = ["train"]  # eval and retention go whole to every worker (small data: train too, see SharedInputs)
SPLIT_IN_WORKERS_MAX_ROWS = 50_000  # up to this many training rows every worker reads all, keeps its part
BLOCK_ROWS = 8192  # rows per Arrow table handed to Ray Data


def ray_datasets(cfg: Config, tokenizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The driver's side: Ray datasets of packed rows for train, eval, retention, and the
    data's stats (format, rows, what was skipped, truncated, dropped, whether from the cache)."""
    import ray.data

    dataset = prepared_dataset(cfg, tokenizer)
    splits = {name: getattr(dataset, name) for name in SPLITS}
    datasets = {name: ray.data.from_arrow([arrow_table(rows, i, i + BLOCK_ROWS)
                                           for i in range(0, max(len(rows), 1), BLOCK_ROWS)])
                for name, rows in splits.items() if rows is not None}
    return datasets, dict(dataset.stats, format=dataset.format, train_rows=len(dataset.train))


def arrow_table(rows: Rows, start: int, end: int):
    """Rows start..end as an Arrow table, one list<int32> column per token column (no copies
    through Python lists)."""
    import pyarrow as pa

    end = min(end, len(rows))
    offsets = rows.offsets[start : end + 1]
    first, last = int(offsets[0]), int(offsets[-1])
    table = {name: pa.LargeListArray.from_arrays(pa.array(offsets - first, pa.int64()),
                                                 pa.array(np.asarray(rows.flat[name][first:last])))
             for name in COLUMNS}
    if rows.source is not None:  # a mixture's rows know their source
        table["source"] = pa.array(rows.source[start:end])
    if rows.meta is not None:  # a prompt row's columns (objective grpo)
        table["meta"] = pa.array(rows.meta[start:end].tolist(), pa.large_string())
    return pa.table(table)


def rows_of(shard) -> Optional[Rows]:
    """A worker's shard (a Ray DataIterator) read into memory; None for no shard."""
    if shard is None:
        return None
    parts = []
    for batch in shard.iter_batches(batch_size=BLOCK_ROWS, batch_format="pyarrow"):
        lists = {name: batch.column(name).combine_chunks() for name in COLUMNS}
        offsets = lists["ids"].offsets.to_numpy()
        source = batch.column("source").to_numpy() if "source" in batch.column_names else None
        meta = np.array(batch.column("meta").to_pylist()) if "meta" in batch.column_names else None
        parts.append(Rows({name: lists[name].flatten().to_numpy().astype(np.int32) for name in COLUMNS},
                          (offsets - offsets[0]).astype(np.int64), source, meta))
    return Rows.concat(parts) if parts else empty_rows()


def dataset_from_shards(cfg: Config, stats: dict[str, Any], whole: bool = False) -> Dataset:
    """The worker's side: its Ray Data shards as the loop's Dataset. `whole`: the train shard
    is the whole training set (every worker reads every row, and takes its part of each batch)."""
    import ray.train

    def shard(name: str):
        try:
            return ray.train.get_dataset_shard(name)
        except KeyError:
            return None

    train, eval_rows, retention, replay = (rows_of(shard(n)) for n in SPLITS)
    stats = dict(stats, shard_rows=len(train), shard_target_tokens=train.target_tokens())
    if eval_rows is not None:
        stats["eval_rows"] = len(eval_rows)
    if retention is not None:
        stats["retention_rows"] = len(retention)
    if replay is not None:
        stats["replay_rows"] = len(replay)
    return Dataset(train, eval_rows, retention, stats.get("format", cfg.data.format), stats, replay, shared=whole)
