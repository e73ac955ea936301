"""Data sources -> raw rows, each with the place it came from (file and line, or row index),
read without the training stack (no torch), so that a bad row is named in the first seconds.

A source is one of:
  a file       .jsonl / .ndjson (a row per line), .json (an array of rows), .parquet, .csv
  a directory  written by `datasets`' save_to_disk, or holding shards of one of the types above
  a glob       of shards of one type (`data/part-*.parquet`)
  hf:ID[:SPLIT]  a Hugging Face hub dataset, through `datasets` (split: train by default)
s3:// sources are fetched into the cache first (preflight.localize_data), then read as local.

Rows come out as (where, row) pairs; a row that cannot be read at all (invalid JSON or UTF-8)
comes out as a `Unreadable` in place of the row, so that data.skip_bad_rows can skip it.
"""

from __future__ import annotations

import csv
import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Union

from ftdist.config.load import not_a_file
from ftdist.errors import UserError
from ftdist.io.hub import check_reachable

FILE_TYPES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
HUB_PREFIX = "hf:"
GLOB_CHARS = "*?["
SAVED_DATASET_FILES = ("dataset_info.json", "state.json")  # what save_to_disk writes beside its arrow files
BATCH_ROWS = 4096  # rows per read from parquet and arrow


@dataclass(frozen=True)
class Unreadable:
    reason: str


Row = Union[dict, list, str, int, float, None, Unreadable]


def is_glob(path: str) -> bool:
    return any(c in path for c in GLOB_CHARS)


def is_hub(path: str) -> bool:
    return path.startswith(HUB_PREFIX)


def is_data_file(path: str) -> bool:
    return Path(path).suffix.lower() in FILE_TYPES


def check_source(path: str, key: str) -> None:
    """That a local source exists, is of a readable kind and this user may read its files
    (preflight, before any read)."""
    if is_hub(path):
        return
    for file in shard_files(path, key):
        check_readable(file, key)


def check_readable(file: Path, key: str) -> None:
    try:
        with open(file, "rb"):
            pass
    except PermissionError as e:
        raise UserError(unreadable(key, e)) from None


def unreadable(key: str, error: OSError, path: object = None) -> str:
    """`path`: the source whose file or directory `error` names (None: that file is the source's)."""
    inside = f" at {error.filename}" if path is not None and str(path) != str(error.filename) else ""
    return (f"{key}: cannot read {path or error.filename} ({error.strerror}{inside}); give this user read access "
            "to it (chmod, or chown), or copy the data somewhere it can read")


def shard_files(path: str, key: str) -> list[Path]:
    """The files of a local source, in order; [] for a save_to_disk directory."""
    try:
        return find_shards(path, key)
    except PermissionError as e:  # a directory this user may not list or enter
        raise UserError(unreadable(key, e, path)) from None


def find_shards(path: str, key: str) -> list[Path]:
    p = Path(path)
    if is_glob(path):
        files = sorted(Path(f) for f in glob.glob(path, recursive=True) if Path(f).is_file())
        if not files:
            raise UserError(f"{key}: {path} matches no file")
    elif p.is_dir():
        if (p / "dataset_dict.json").is_file():
            splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
            raise UserError(f"{key}: {path} holds a DatasetDict with splits {splits}; point {key} at one "
                            f"split's directory, e.g. {p / (splits[0] if splits else 'train')}")
        if any((p / name).is_file() for name in SAVED_DATASET_FILES):
            return []
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in FILE_TYPES
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise UserError(f"{key}: directory {path} holds no data files ({', '.join(FILE_TYPES)}) "
                            "and is not a save_to_disk dataset")
    elif p.is_file():
        files = [p]
    else:
        raise UserError(f"{key}: {not_a_file(p)}")
    types = {FILE_TYPES.get(f.suffix.lower()) for f in files}
    if None in types:
        raise UserError(f"{key}: {files[0] if len(files) == 1 else path}: not a data file type; "
                        f"use {', '.join(FILE_TYPES)}, a save_to_disk directory or hf:ID")
    if len(types) > 1:
        raise UserError(f"{key}: {path} mixes file types ({', '.join(sorted(types))}); a source is shards of "
                        "one type (give several sources as a list for more)")
    return files


def read_rows(path: str, key: str = "data.train") -> Iterator[tuple[str, Row]]:
    """Every row of a source, in order, with where it is: 'FILE:LINE' or 'FILE: row I'."""
    if is_hub(path):
        yield from hub_rows(path, key)
        return
    files = shard_files(path, key)
    if not files:
        yield from saved_rows(path)
        return
    for file in files:
        kind = FILE_TYPES[file.suffix.lower()]
        yield from READERS[kind](file)


BOM = b"\xef\xbb\xbf"  # what Excel and Notepad put before UTF-8 text: not part of the first row


def jsonl_rows(file: Path) -> Iterator[tuple[str, Row]]:
    with file.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            where = f"{file}:{line_no}"
            if line_no == 1:
                raw = raw.removeprefix(BOM)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, Unreadable(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, Unreadable(f"not valid JSON ({e.msg})")


def json_rows(file: Path) -> Iterator[tuple[str, Row]]:
    try:
        rows = json.loads(file.read_bytes().removeprefix(BOM).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{file}: not valid UTF-8 (byte {e.start}); save it as UTF-8") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{file}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno}); a .json data file is "
                        "one array of rows (one row per line: name it .jsonl)") from None
    if not isinstance(rows, list):
        raise UserError(f"{file}: a .json data file must be an array of rows, got a JSON {type(rows).__name__} "
                        "(one row per line: name it .jsonl)")
    for i, row in enumerate(rows):
        yield f"{file}: row {i}", row


def parquet_rows(file: Path) -> Iterator[tuple[str, Row]]:
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(file)
    except Exception as e:  # pyarrow's errors for a damaged file are of several types
        raise UserError(f"{file}: not a readable parquet file ({str(e).splitlines()[0]})") from None
    i = 0
    for batch in reader.iter_batches(batch_size=BATCH_ROWS):
        for row in batch.to_pylist():
            yield f"{file}: row {i}", without_nulls(row)
            i += 1


def csv_rows(file: Path) -> Iterator[tuple[str, Row]]:
    # surrogateescape: an invalid byte spoils its row only, which is then reported (or skipped).
    # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first column's name.
    with file.open(encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            return
        # Column names as meant: " completion" (after "prompt, ") is the completion column.
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise UserError(f"{file}:{reader.line_num}: not valid CSV ({e})") from None
            where = f"{file}:{reader.line_num}"
            if None in row:
                yield where, Unreadable(f"{len(row[None])} more fields than the header's {len(reader.fieldnames)}")
            elif any(isinstance(v, str) and has_surrogates(v) for v in row.values()):
                yield where, Unreadable("not valid UTF-8")
            else:
                yield where, {k: v for k, v in row.items() if v is not None}


def has_surrogates(text: str) -> bool:
    return any("\udc80" <= c <= "\udcff" for c in text)


def saved_rows(path: str) -> Iterator[tuple[str, Row]]:
    from datasets import Dataset, load_from_disk

    try:
        ds = load_from_disk(path)
    except Exception as e:  # datasets raises several types for a damaged directory
        raise UserError(f"{path}: not a readable save_to_disk dataset ({str(e).splitlines()[0]})") from None
    if not isinstance(ds, Dataset):
        raise UserError(f"{path}: holds several splits ({', '.join(ds)}); point at one split's directory")
    yield from dataset_rows(ds, path)


def hub_rows(source: str, key: str) -> Iterator[tuple[str, Row]]:
    from datasets import load_dataset

    name, _, split = source[len(HUB_PREFIX):].partition(":")
    check_reachable(key, name, cached_file=None)
    try:
        ds = load_dataset(name, split=split or "train")
    except Exception as e:  # no network, no such dataset or split, a gated one: all the same to the user
        raise UserError(f"{key}: cannot load the hub dataset {name} (split {split or 'train'}): "
                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; check the id and split and the "
                        "network (HF_TOKEN for a gated one), or save it to files and point at them") from None
    yield from dataset_rows(ds, source)


def dataset_rows(ds, name: str) -> Iterator[tuple[str, Row]]:
    i = 0
    for batch in ds.iter(batch_size=BATCH_ROWS):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            yield f"{name}: row {i}", without_nulls(dict(zip(columns, values)))
            i += 1


def without_nulls(row: dict) -> dict:
    """Arrow fills a key a row lacks with null; the row never had it."""
    return {k: v for k, v in row.items() if v is not None}


READERS = {"jsonl": jsonl_rows, "json": json_rows, "parquet": parquet_rows, "csv": csv_rows}
