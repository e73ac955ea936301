"""Where runs, models and data live: a local directory or s3:// object storage (through s3fs).

A run on object storage is worked on in a local copy (`RunStore.local`, one per rank, under
`storage.cache_dir`) and streamed up by a background `Uploader`: training writes files
locally, which is fast, and never waits for the network except at the very end. Every call
that touches the store retries with exponential backoff until `storage.retry_deadline_s`;
past it the store counts as gone and the run stops with a message naming what is kept locally.

Credentials come from the standard AWS environment variables or profile (boto's own chain);
they are never read, stored or printed by ftdist.
"""

from __future__ import annotations

import hashlib
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Callable, Optional, TypeVar

from ftdist.config.schema import StorageConfig
from ftdist.errors import UserError
from ftdist.io import safewrite

T = TypeVar("T")
SCHEME = "s3://"
COMPLETE_FILE = ".ftdist-complete"  # marks a finished download in the local cache


def is_remote(path: str) -> bool:
    return str(path).startswith(SCHEME)


def join(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts if p)])


def filesystem(url: str, storage: StorageConfig):
    """An fsspec filesystem for `url`: s3fs for s3://, the local one otherwise."""
    if not is_remote(url):
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem(auto_mkdir=True)
    import s3fs

    return s3fs.S3FileSystem(
        anon=storage.anon,
        endpoint_url=storage.endpoint_url,
        client_kwargs={"region_name": storage.region} if storage.region else {},
        # Short timeouts and few inner retries: the backoff with a deadline is ours (retrying).
        config_kwargs={"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2}},
        # Markers written by other ranks must be seen at once, not from a stale listing.
        use_listings_cache=False,
    )


# ---------------------------------------------------------------- retries


class StoreUnavailable(UserError):
    """The store did not answer within the deadline."""


class NotYet(Exception):
    """A condition on the store that another process will make true (waited for like an outage)."""


def transient_errors() -> tuple[type[BaseException], ...]:
    """What a store that is away, slow or restarting raises; anything else is not retried."""
    import aiohttp
    from botocore.exceptions import BotoCoreError

    return (OSError, TimeoutError, BotoCoreError, aiohttp.ClientError, NotYet)


def permanent_error(error: BaseException, what: str) -> Optional[UserError]:
    """A UserError for failures no retry can fix (credentials, permissions, missing bucket)."""
    name = type(error).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
        return UserError(f"{what}: no AWS credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                         "(or AWS_PROFILE), or storage.anon: true for a public bucket")
    if isinstance(error, PermissionError):
        return UserError(f"{what}: access denied; check the AWS credentials and the bucket's permissions")
    if isinstance(error, FileNotFoundError):
        return UserError(f"{what}: not found ({short(error)}); check the bucket and path")
    if name == "ParamValidationError":  # botocore refuses the request before sending it
        return UserError(f"{what}: not a valid S3 bucket name or key ({str(error).splitlines()[-1].strip()}); bucket "
                         "names are 3-63 lowercase letters, digits, dots and hyphens")
    return None


def short(error: BaseException) -> str:
    """A one-line description of an error, without request details."""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def retrying(action: Callable[[], T], what: str, deadline_s: float) -> T:
    """Run `action`, retrying transient failures with exponential backoff (0.5 s doubling to
    10 s) until `deadline_s` has passed since the first failure, which is told in one line (a
    store that does not answer would otherwise be minutes of silence)."""
    first_failure: Optional[float] = None
    delay = 0.5
    while True:
        try:
            return action()
        except Exception as e:  # noqa: BLE001 - classified below
            fatal = permanent_error(e, what)
            if fatal is not None:
                raise fatal from None
            if not isinstance(e, transient_errors()):
                raise
            now = time.monotonic()
            first_failure = first_failure if first_failure is not None else now
            if now - first_failure + delay > deadline_s:
                raise StoreUnavailable(
                    f"{what}: the object store did not answer for {deadline_s:g} s "
                    f"(storage.retry_deadline_s): {short(e)}; check that the store at storage.endpoint_url (or "
                    "AWS's) is up and reachable from here") from None
            if now == first_failure and deadline_s > delay and not isinstance(e, NotYet):  # NotYet: waiting, not away
                print(f"ftdist: warning: {what}: the object store does not answer ({short(e)}); retrying for up "
                      f"to {deadline_s:g} s (storage.retry_deadline_s)", file=sys.stderr, flush=True)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)


# ---------------------------------------------------------------- a run's directory


@dataclass
class RunStore:
    """A run directory (`url`: an absolute local path or s3://bucket/prefix/name) and this
    process's local working copy of it.

    Local runs are written in place. Runs on object storage are written under `root` (in
    storage.cache_dir): per rank in `rank-<r>/`, since ranks on one node would otherwise
    write over each other, with the base model shared in `root/base`."""

    url: str
    root: Path
    storage: StorageConfig
    rank: int = 0

    @property
    def remote(self) -> bool:
        return is_remote(self.url)

    @property
    def local(self) -> Path:
        return self.root / f"rank-{self.rank}" if self.remote else self.root

    @cached_property
    def fs(self):
        return filesystem(self.url, self.storage)

    def path(self, rel: str = "") -> str:
        return join(self.url, rel) if rel else self.url

    def call(self, action: Callable[[], T], what: str) -> T:
        return retrying(action, what, self.storage.retry_deadline_s)

    # -- reads
    def exists(self, rel: str) -> bool:
        return self.call(lambda: self.fs.exists(self.path(rel)), f"checking {self.path(rel)}")

    def read_text(self, rel: str) -> str:
        return self.call(lambda: self.fs.cat_file(self.path(rel)).decode(), f"reading {self.path(rel)}")

    def list_names(self, rel: str = "") -> list[str]:
        """Names of the files and directories in `rel` ([] when it does not exist)."""
        def names() -> list[str]:
            if not self.fs.exists(self.path(rel)) or not self.fs.isdir(self.path(rel)):
                return []
            return [e.rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(self.path(rel), detail=False)]
        return self.call(names, f"listing {self.path(rel)}")

    def list_dirs(self, rel: str) -> list[str]:
        """Names of the directories in `rel` ([] when it does not exist)."""
        def names() -> list[str]:
            if not self.fs.exists(self.path(rel)):
                return []
            return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(self.path(rel), detail=True)
                    if e["type"] == "directory"]
        return self.call(names, f"listing {self.path(rel)}")

    def download(self, rel: str, dest: Path, keep: Callable[[str], bool] = lambda name: True) -> int:
        """Copy the tree `rel` to `dest` (files whose relative name passes `keep`). Returns bytes."""
        source = self.path(rel)
        bare = self.fs._strip_protocol(source).rstrip("/")  # find() names files without s3://

        def fetch() -> int:
            files = [f for f in self.fs.find(source) if keep(f[len(bare):].lstrip("/"))]
            targets = [str(dest / f[len(bare):].lstrip("/")) for f in files]
            for target in targets:
                Path(target).parent.mkdir(parents=True, exist_ok=True)
            if files:
                self.fs.get(files, targets)
            return sum(Path(t).stat().st_size for t in targets)
        return self.call(fetch, f"downloading {source}")

    # -- writes (no-ops for local runs: the local copy is the run)
    def write_text(self, rel: str, text: str) -> None:
        if not self.remote:
            target = self.local / rel
            safewrite.make_dirs(target.parent, self.local, rel)
            safewrite.write_text(target, self.local, rel, text)
            return
        self.call(lambda: self.fs.pipe_file(self.path(rel), text.encode()), f"writing {self.path(rel)}")

    def upload(self, rel: str, source: Optional[Path] = None, skip: set[str] = frozenset()) -> int:
        """Copy local `rel` (a file or a tree; or `source`, to `rel`) up, but the files named in
        `skip` (as `rel/...`). Returns bytes sent (0 for local runs: the local copy is the run)."""
        source = source or self.local / rel
        if not self.remote or not source.exists():
            return 0
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        names = [rel if f == source else join(rel, str(f.relative_to(source))) for f in files]
        files, targets = [f for f, n in zip(files, names) if n not in skip], [self.path(n) for n in names if n not in skip]
        if not files:
            return 0
        # One call for all files: s3fs sends them concurrently.
        self.call(lambda: self.fs.put([str(f) for f in files], targets), f"uploading {self.path(rel)}")
        return sum(f.stat().st_size for f in files)

    def upload_file(self, source: Path, rel: str) -> int:
        """Copy one local file (anywhere) up to `rel`."""
        if not self.remote:
            return 0
        self.call(lambda: self.fs.put_file(str(source), self.path(rel)), f"uploading {self.path(rel)}")
        return source.stat().st_size

    def remove(self, rel: str) -> None:
        if not self.remote:  # never through a link (safewrite)

            safewrite.remove(self.local / rel, self.local, rel)
            return

        def rm() -> None:
            if self.fs.exists(self.path(rel)):
                self.fs.rm(self.path(rel), recursive=True)
        self.call(rm, f"removing {self.path(rel)}")


def open_run_store(cfg, rank: int = 0) -> RunStore:
    """The RunStore of a config's run: <run.output>/<run.name>."""
    output = cfg.run.output
    if is_remote(output):
        url = join(output, cfg.run.name)
        return RunStore(url, cache_path(cfg.storage, "runs", url), cfg.storage, rank)
    # run.output is the user's path (links in it are theirs, resolved); the run directory itself
    # is not resolved: a link there is refused (rundir.claim), never written through.
    local = Path(os.path.normpath(Path(output).expanduser().resolve() / cfg.run.name))
    return RunStore(str(local), local, cfg.storage, rank)


def cache_path(storage: StorageConfig, kind: str, url: str) -> Path:
    """A stable local place for an s3:// object: <cache_dir>/<kind>/<bucket>/<key>-<hash>(.suffix)."""
    key = PurePosixPath(url[len(SCHEME):].strip("/"))
    digest = hashlib.sha1(f"{storage.endpoint_url}|{url}".encode()).hexdigest()[:8]
    # The suffix stays last: readers tell a file's type by it (.jsonl, .parquet, ...).
    return Path(storage.cache_dir).expanduser() / kind / key.parent / f"{key.stem}-{digest}{key.suffix}"


# ---------------------------------------------------------------- inputs: models and data


def fetch(url: str, storage: StorageConfig, kind: str = "inputs") -> Path:
    """A local copy of an s3:// file or directory, downloaded once into the cache (the lock
    keeps ranks on one node from downloading it twice at the same time)."""
    from filelock import FileLock

    dest = cache_path(storage, kind, url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    done = dest.parent / (dest.name + COMPLETE_FILE)
    with FileLock(str(dest) + ".lock"):
        if done.is_file():
            return dest
        fs = filesystem(url, storage)
        what = f"fetching {url}"
        if not retrying(lambda: fs.exists(url), what, storage.retry_deadline_s):
            raise UserError(f"{url}: not found in the object store; check the bucket and key")
        is_dir = retrying(lambda: fs.isdir(url), what, storage.retry_deadline_s)
        store = RunStore(url, dest.parent, storage)
        if is_dir:
            store.download("", dest)
        else:
            tmp = dest.with_name(dest.name + ".part")
            retrying(lambda: fs.get_file(url, str(tmp)), what, storage.retry_deadline_s)
            tmp.replace(dest)
        done.write_text(url)
    return dest


# ---------------------------------------------------------------- the background uploader


def lower_priority() -> None:
    """Run the calling thread (and threads it starts) at the lowest CPU priority: checkpoint
    I/O must take what training leaves, not the other way round. Linux schedules threads
    one by one, so this leaves the training threads alone."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: same priority then
        pass


class Uploader:
    """One background thread that runs a rank's store jobs (writing staged checkpoint files,
    uploads, markers, pruning) in order. Training hands jobs over and goes on; it waits only
    when `max_pending` jobs are queued (the store is slower than the checkpoints), at the end
    (`flush`), and it stops when a job has failed (`check`)."""

    def __init__(self, max_pending: int = 2):
        self.jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: Optional[BaseException] = None
        self.done: list[dict] = []  # results of finished jobs, drained by the loop for its log
        self.thread = threading.Thread(target=self._run, name="ftdist-uploader", daemon=True)
        self.thread.start()

    def submit(self, job: Callable[[], Optional[dict]]) -> None:
        self.check()
        self.jobs.put(job)

    def _run(self) -> None:
        lower_priority()
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                if self.error is None:  # after a failure, later jobs would only fail too
                    result = job()
                    if result:
                        self.done.append(result)
            except BaseException as e:  # noqa: BLE001 - handed to the training thread
                self.error = e
            finally:
                self.jobs.task_done()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def drain(self) -> list[dict]:
        done, self.done = self.done, []
        return done

    def flush(self) -> None:
        self.jobs.join()
        self.check()

    def close(self) -> None:
        """Let queued jobs finish (briefly: after a failure or Ctrl-C nothing may hang on a store)."""
        try:
            self.jobs.put(None, timeout=5)
        except queue.Full:
            return
        self.thread.join(timeout=5)
