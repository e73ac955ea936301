"""The prepared-data cache: tokenized, packed rows kept on disk, so that a rerun, `best.yaml`
after a search, and every trial read them back in seconds instead of tokenizing again.

Keyed by content, not by name: the bytes of every source file, the data settings that shape
the rows (format, mapping, max_length, packing, the eval split and its seed) and the
tokenizer. Two levels, so that preflight can skip validating rows it has validated before
(it has no tokenizer):

  <storage.cache_dir>/prepared/<data key>/records.json          format, rows skipped
  <storage.cache_dir>/prepared/<data key>/<tokenizer key>/      <split>.<column>.npy, stats.json

Runs on object storage (run.output s3://...) and runs of s3:// data keep a copy in the bucket
too (storage.prepared_url; by default <run.output>/.prepared/, or s3://BUCKET/.ftdist-prepared/
for the data's bucket), so that a fresh node (a new KubeRay pod) reads the rows instead of
tokenizing again; its stats.json is sent last and marks it whole.

A rows directory is written beside its final place and renamed into it, so a crash never
leaves half of one; the .npy files are memory-mapped on load (memory follows what is read).
Hub sources (hf:) have no local bytes to key by and are not cached. Preflight imports this
module before torch: ftdist.data (which needs torch) is imported where rows are built.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import numpy as np

from ftdist.config.schema import SPLITS, Config
from ftdist.data.records import data_paths
from ftdist.data.sources import is_hub, shard_files
from ftdist.errors import UserError
from ftdist.io import runlock, safewrite
from ftdist.io.space import no_room_stops
from ftdist.io.storage import RunStore, is_remote, join

if TYPE_CHECKING:
    from ftdist.data.rows import Dataset

# How long a run waits for another process that prepares the same rows (then reads them).
WAIT_S = 1800.0
VERSION = 2  # of the rows' layout: a new one never reads an old one's files (2: eval rows per source)
CHUNK = 2**20


def cache_root(cfg: Config) -> Path:
    return Path(cfg.storage.cache_dir).expanduser() / "prepared"


def check_cache_dir(cfg: Config) -> None:
    """Preflight: storage.cache_dir can be made and written (the prepared rows, s3:// copies go
    there), told before any work as one message naming the key (and HOME, for the default)."""
    root = cache_root(cfg)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as e:
        raise UserError(cache_dir_problem(cfg, e, root)) from None


def cache_dir_problem(cfg: Config, error: OSError, where: Path) -> str:
    given = cfg.storage.cache_dir
    home = os.path.expanduser("~")
    why = (f"; {given} is under HOME, and HOME ({home}) is not a directory"
           if given.startswith("~") and not os.path.isdir(home) else "")
    return (f"storage.cache_dir: cannot write {error.filename or where} ({error.strerror}){why}; set "
            "storage.cache_dir to a directory this user can write (e.g. --set storage.cache_dir=/tmp/ftdist-cache)")


def source_files(path: str) -> list[Path]:
    """The files whose bytes make a source: the file (plain retention text too), its shards,
    or every file of a save_to_disk directory."""
    if Path(path).is_file():
        return [Path(path)]
    files = shard_files(path, "data")
    return files or sorted(f for f in Path(path).rglob("*") if f.is_file())


def file_digest(path: Path) -> str:
    """SHA-256 of a file; once per process for each (path, size, mtime): preflight and the
    build key the same files."""
    st = path.stat()
    return content_digest(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4096)
def content_digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def data_key(cfg: Config) -> Optional[str]:
    """What the records depend on; None where a source cannot be keyed by content (hub ids)."""
    d = cfg.data
    listed = {split: d.split_sources(split) for split in SPLITS}
    sources = [s.path for split in SPLITS for s in listed[split]]
    if any(is_hub(p) for p in sources):
        return None
    held_out = d.eval_fraction if not d.eval else None
    # Each source's own format and mapping; not its weight (the mixture is drawn as the run
    # goes) nor its name (the run's config names them).
    settings = {"version": VERSION, "format": d.format, "columns": d.columns, "roles": d.roles,
                "sources": {split: [s.model_dump(exclude={"path", "weight", "name"}) for s in listed[split]]
                            for split in SPLITS},
                "chat_template": d.chat_template, "max_length": d.max_length, "packing": d.packing,
                "labels": task_labels(cfg), "task": cfg.task, "objective": cfg.objective,
                **({"prompt_room": prompt_room(cfg)} if cfg.row_shape == "prompts" else {}),
                "skip_bad_rows": d.skip_bad_rows, "eval_fraction": held_out, "seed": cfg.train.seed,
                "splits": [name for name in SPLITS[1:] if getattr(d, name)],
                "files": [[file_digest(f) for f in source_files(p)] for p in sources]}
    return digest(settings)


def prompt_room(cfg: Config) -> int:
    """The most tokens of a prompt row (objective grpo): what its completion leaves of data.max_length."""
    return cfg.data.max_length - cfg.grpo.max_new_tokens if cfg.row_shape == "prompts" else 0


def task_labels(cfg: Config) -> Optional[list[str]]:
    """A classification task's labels, as its rows are made (preflight resolves them); None
    for rows that are not labelled texts."""
    labels = cfg.classification.labels
    return [str(x) for x in labels] if cfg.row_shape == "labels" and labels else None


def tokenizer_key(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return digest({"class": type(tokenizer).__name__, "vocab": backend.to_str() if backend else repr(tokenizer),
                   "chat_template": tokenizer.chat_template, "eos": tokenizer.eos_token_id,
                   "pad": tokenizer.pad_token_id, "bos": getattr(tokenizer, "bos_token_id", None)})


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:24]


# ---------------------------------------------------------------- validated records (preflight)


def validated(cfg: Config) -> Optional[tuple[str, int, Optional[list[str]]]]:
    """(format, rows skipped, classification labels) of data validated before, by content;
    None if not yet."""
    key = data_key(cfg)
    path = cache_root(cfg) / key / "records.json" if key else None
    if path is None or not path.is_file():
        return None
    info = json.loads(path.read_text())
    return info["format"], info["skipped_rows"], info.get("labels")


def remember_validated(cfg: Config, fmt: str, skipped: int, labels: Optional[list[str]] = None) -> None:
    key = data_key(cfg)
    if key:
        write_atomic(cache_root(cfg) / key / "records.json",
                     json.dumps({"format": fmt, "skipped_rows": skipped, "labels": labels}))


# ---------------------------------------------------------------- packed rows


def prepared_dataset(cfg: Config, tokenizer) -> "Dataset":
    """The run's packed rows: from the cache, or built (and kept); stats["prepared"] says which."""
    from ftdist.data.rows import build_dataset

    key = data_key(cfg)
    if key is None:
        return build_dataset(cfg.data, tokenizer, cfg.train.seed, task_labels(cfg), cfg.row_shape, prompt_room(cfg))
    rel = f"{key}/{tokenizer_key(tokenizer)}"
    where, bucket = cache_root(cfg) / rel, bucket_copy(cfg)
    if (where / "stats.json").is_file():  # whole once there (renamed into place): no lock to read it
        return cached(where, f"from the cache, {where}")
    with entry_lock(cfg, where):  # one writer of an entry; a second waits, then reads what it made
        if (where / "stats.json").is_file():
            return cached(where, f"from the cache, {where} (prepared by another process meanwhile)")
        if bucket is not None and bucket.exists(f"{rel}/stats.json"):
            fetch_rows(bucket, rel, where, cache_root(cfg))
            return cached(where, f"from the cache, {bucket.path(rel)}")
        dataset = build_dataset(cfg.data, tokenizer, cfg.train.seed, task_labels(cfg), cfg.row_shape, prompt_room(cfg))
        try:
            save(dataset, where, cache_root(cfg))
        except PermissionError as e:
            raise UserError(cache_dir_problem(cfg, e, where)) from None
        remember_validated(cfg, dataset.format, dataset.stats.get("skipped_rows", 0), task_labels(cfg))
    if bucket is not None:
        keep_copy(bucket, rel, where)
    dataset.stats["prepared"] = f"tokenized, kept in {where}"
    return dataset


def cached(where: Path, how: str) -> "Dataset":
    dataset = load(where)
    dataset.stats["prepared"] = how
    return dataset


@contextmanager
def entry_lock(cfg: Config, where: Path) -> Iterator[None]:
    """The lock of one cache entry (<entry>.lock beside it), held while it is made; another
    process making the same entry is waited for, at most WAIT_S."""
    root = cache_root(cfg)
    safewrite.make_dirs(where.parent, root, "the prepared rows")

    def waiting(holder) -> None:
        print(f"ftdist: {runlock.describe(holder)} is preparing the same rows into {where}; waiting for it (at most "
              f"{WAIT_S:.0f} s), then reading them", file=sys.stderr, flush=True)

    def busy(holder) -> str:
        return (f"{where}: {runlock.describe(holder)} has been preparing these rows for more than {WAIT_S:.0f} s; "
                "wait for it to end (or stop it), then run this command again")

    held = runlock.lock_file(where.with_name(where.name + ".lock"), busy, wait_s=WAIT_S, waiting=waiting)
    try:
        yield
    finally:
        held.release()


def shared_url(cfg: Config) -> Optional[str]:
    """Where the bucket's copy of the cache lives: storage.prepared_url, else beside a run on
    object storage, else in the bucket of the first s3:// data source; None for local work.
    Resolved on the config as written (preflight's local copies of the data no longer name
    their bucket)."""
    if cfg.storage.prepared_url:
        return cfg.storage.prepared_url
    if is_remote(cfg.run.output):
        return join(cfg.run.output, ".prepared")
    remote = [path for _, path in data_paths(cfg.data) if is_remote(path)]
    return f"s3://{remote[0].removeprefix('s3://').split('/', 1)[0]}/.ftdist-prepared" if remote else None


def bucket_copy(cfg: Config):
    """The bucket's copy of the cache (a RunStore over storage.prepared_url, which preflight
    resolves with shared_url); None where there is none."""
    url = cfg.storage.prepared_url
    return RunStore(url, cache_root(cfg), cfg.storage) if url else None


def keep_copy(bucket, rel: str, where: Path) -> None:
    """The rows into the bucket, stats.json last (it marks the copy whole). A bucket that takes
    no writes (read-only data, say) costs only the copy: the local cache has the rows."""
    try:
        bucket.upload(rel, source=where, skip={f"{rel}/stats.json"})
        bucket.upload_file(where / "stats.json", f"{rel}/stats.json")
    except UserError as e:
        print(f"ftdist: warning: the prepared rows are kept in {where} only, not in {bucket.url}: {e}; "
              "set storage.prepared_url to a place this run may write", flush=True)


def fetch_rows(bucket, rel: str, where: Path, root: Path) -> None:
    """The bucket's rows into the local cache, renamed into place once whole."""
    safewrite.make_dirs(where.parent, root, "the prepared rows")
    staging = Path(tempfile.mkdtemp(prefix=".fetching-", dir=where.parent))
    try:
        bucket.download(rel, staging)
        try:
            os.rename(staging, where)
        except OSError:  # another process fetched it first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def save(dataset: "Dataset", where: Path, root: Path) -> None:
    safewrite.make_dirs(where.parent, root, "the prepared rows")
    safewrite.check(where, root, "the prepared rows")
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=where.parent))
    try:
        with no_room_stops(staging, "storage.cache_dir: the prepared rows",
                           "free space there, or set storage.cache_dir to another disk, and run the same command "
                           "again (the cache holds only complete rows)"):
            write_rows(dataset, staging)
        try:
            os.rename(staging, where)
        except OSError:  # another process prepared the same data first: theirs is as good
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load(where: Path) -> "Dataset":
    from ftdist.data.rows import COLUMNS, Dataset, Rows

    info = json.loads((where / "stats.json").read_text())

    def split(name: str) -> Optional[Rows]:
        if not (where / f"{name}.offsets.npy").is_file():
            return None
        source, meta = where / f"{name}.source.npy", where / f"{name}.meta.npy"
        return Rows({c: np.load(where / f"{name}.{c}.npy", mmap_mode="r") for c in COLUMNS},
                    np.load(where / f"{name}.offsets.npy"), np.load(source) if source.is_file() else None,
                    np.load(meta) if meta.is_file() else None)  # np.load refuses pickled (object) arrays

    return Dataset(split("train"), split("eval"), split("retention"), info["format"], info["stats"], split("replay"))


def write_atomic(path: Path, text: str) -> None:
    root = path.parent.parent  # <cache_dir>/prepared: the entry's directory is ftdist's
    safewrite.make_dirs(path.parent, root, path.name)
    safewrite.check(path, root, path.name)
    fd, tmp = tempfile.mkstemp(prefix=".", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)





def write_rows(dataset: "Dataset", staging: Path) -> None:
    from ftdist.data.rows import COLUMNS

    for split in SPLITS:
        rows = getattr(dataset, split)
        if rows is None:
            continue
        for name in COLUMNS:
            np.save(staging / f"{split}.{name}.npy", rows.flat[name])
        np.save(staging / f"{split}.offsets.npy", rows.offsets)
        if rows.source is not None:
            np.save(staging / f"{split}.source.npy", rows.source)
        if rows.meta is not None:  # fixed-width unicode: no pickle
            np.save(staging / f"{split}.meta.npy", rows.meta)
    (staging / "stats.json").write_text(json.dumps({"format": dataset.format, "stats": dataset.stats}))
