"""One writer at a time: of a run directory (a search's too) and of each prepared-data cache entry.

Local directories: an exclusive flock on <dir>/.ftdist-lock (layout.LOCK_FILE), held for the
whole command that writes there (train, tune, prepare of a model.init run). The OS drops it
when its holder ends, however it ends: a crashed or killed process never keeps a run. The file
says who holds it (host, pid, command, since), which a second writer's refusal names (exit 2).
A run's Ray workers and a search's trials write under their driver's lock and take none.

Readers (export of a local run) hold a shared flock on the run directory itself while they
read; `--restart`, which deletes, takes it exclusively around the deletion: a restart refuses
while an export reads, an export refuses while a restart deletes. Training beside an export is
fine: export reads final/ or a complete checkpoint.

s3:// runs: a lease object <run>/.ftdist-lease.json ({host, pid, command, since, token,
expires}), created with a conditional put (If-None-Match: *), renewed every LEASE_RENEW_S by a
background thread (If-Match its ETag), deleted at the end. A lease past its expiry, or one
whose holder on this same host is no longer running, is taken over (If-Match the stale
lease's ETag). Every lease is read back after it is written: on a store that ignores the
conditions a small race remains (two writers starting within the same moment). Expiry is told
by the clocks of the machines involved; a holder on another machine that died keeps the run
for at most LEASE_S.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from ftdist.errors import UserError
from ftdist.io.layout import LEASE_FILE
from ftdist.io.safewrite import not_regular, refuse

LEASE_S = 60.0  # an s3:// lease's lifetime: how long a writer that died elsewhere keeps a run
LEASE_RENEW_S = 15.0
POLL_S = 0.2


def holder_info() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "command": holder_command(sys.argv),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def holder_command(argv: list[str]) -> str:
    """What a lock names as its holder: `ftdist <command> <config or directory>` of this
    process's command line, never its other arguments (--set values may carry anything);
    a process that is not the CLI (a notebook, a test) says what it runs."""
    program = os.path.basename(argv[0]) if argv else ""
    words = argv[1:3] if program in ("ftdist", "__main__.py") else []
    if not words or words[0].startswith("-"):
        return f"ftdist (in {program or 'python'})"
    return " ".join(["ftdist", words[0], *(w for w in words[1:] if not w.startswith("-"))])


def describe(holder: Optional[dict]) -> str:
    if not holder:
        return "another ftdist process (it has not said which yet)"
    return f"`{holder.get('command', 'ftdist')}` (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, " \
           f"since {holder.get('since', '?')})"


class Held:
    """A lock or lease this process holds; release() lets it go (once)."""

    def __init__(self, release: Callable[[], None]):
        self._release = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


# ---------------------------------------------------------------- local: flock


def lock_file(path: Path, busy: Callable[[Optional[dict]], str], wait_s: float = 0.0,
              waiting: Optional[Callable[[Optional[dict]], None]] = None) -> Held:
    """The exclusive lock held on the file `path` (made if missing; a directory's is its
    LOCK_FILE), waiting up to `wait_s` for a holder to end (`waiting` is told once who it
    waits for); past that a UserError with busy(holder)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise refuse(path, "its lock") from None
        if e.errno == errno.ENXIO:
            raise not_regular(path, "its lock") from None
        raise
    deadline, told = time.monotonic() + wait_s, False
    try:
        if not _regular(fd):
            raise not_regular(path, "its lock")
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = read_holder(path)
                if time.monotonic() >= deadline:
                    raise UserError(busy(holder)) from None
                if waiting is not None and not told:
                    waiting(holder)
                    told = True
                time.sleep(POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_info()).encode(), 0)
    except BaseException:
        os.close(fd)
        raise

    def release() -> None:
        try:
            os.ftruncate(fd, 0)  # a lock file left behind names nobody
        finally:
            os.close(fd)  # closing drops the flock
    return Held(release)


def _regular(fd: int) -> bool:
    import stat

    return stat.S_ISREG(os.fstat(fd).st_mode)


def read_holder(path: Path) -> Optional[dict]:
    try:
        holder = json.loads(Path(path).read_text() or "null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def lock_holder(path: Path) -> Optional[dict]:
    """Who holds the lock of file `path` now ({} when someone does but has not said who); None
    when nobody does. Takes nothing: a look before the real claim."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return read_holder(path) or {}
    finally:
        os.close(fd)


@contextmanager
def reading(directory: Path, url: str) -> Iterator[None]:
    """A shared hold of a local run directory while it is read (export): a --restart of it
    waits for nobody and refuses instead. Where the directory cannot be opened, nothing."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        yield
        return
    with _held(fd, fcntl.LOCK_SH, f"{url} is being restarted (`--restart` is deleting what it holds); wait for "
                                  "that command to start training, then run this one again"):
        yield


@contextmanager
def deleting(directory: Path, url: str) -> Iterator[None]:
    """An exclusive hold of a local run directory while --restart deletes in it: refused
    while another process reads it."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    with _held(fd, fcntl.LOCK_EX, f"{url} is being read by another process (an `ftdist export` of it); --restart "
                                  "would delete what it reads: wait for it to end, then run the command again"):
        yield


@contextmanager
def _held(fd: int, mode: int, refusal: str) -> Iterator[None]:
    """flock `mode` on the open directory `fd` for the block, or a UserError (`refusal`) where
    another process holds it the other way; `fd` is closed after either."""
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(refusal) from None
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------- s3://: a lease object


def _alive_here(holder: dict) -> bool:
    """Whether a holder on this host is still running (a holder elsewhere: assumed so)."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def stale(lease: Optional[dict], now: Optional[float] = None) -> bool:
    if not isinstance(lease, dict):
        return True
    now = time.time() if now is None else now
    try:
        expired = float(lease.get("expires", 0)) < now
    except (TypeError, ValueError):
        expired = True
    return expired or not _alive_here(lease)


class LeaseClient:
    """The few calls a lease needs, on a RunStore's filesystem (s3fs)."""

    def __init__(self, store):
        self.store, self.fs = store, store.fs
        self.url = store.path(LEASE_FILE)
        bucket, key, _ = self.fs.split_path(self.url)
        self.bucket, self.key = bucket, key

    def read(self) -> tuple[Optional[dict], Optional[str]]:
        """(the lease, its ETag), (None, None) when there is none."""
        def get():
            try:
                info = self.fs.info(self.url)
                body = self.fs.cat_file(self.url)
            except FileNotFoundError:
                return None, None
            try:
                lease = json.loads(body)
            except ValueError:
                lease = {}
            return (lease if isinstance(lease, dict) else {}), info.get("ETag")
        return self.store.call(get, f"reading {self.url}")

    def put(self, lease: dict, if_match: Optional[str] = None) -> Optional[str]:
        """Write `lease` if the object is still what we think (absent, or ETag `if_match`);
        its new ETag, or None when another writer changed it first."""
        condition = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"}

        def put():
            try:
                done = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key,
                                       Body=json.dumps(lease).encode(), **condition)
            except FileExistsError:
                return None
            except FileNotFoundError:  # If-Match of an object since deleted
                return None
            except OSError as e:
                if e.errno == errno.EINVAL and "precondition" in str(e).lower():
                    return None
                raise
            return done.get("ETag") or "?"
        return self.store.call(put, f"writing {self.url}")

    def delete(self) -> None:
        def rm():
            try:
                self.fs.rm_file(self.url)
            except FileNotFoundError:
                pass
        self.store.call(rm, f"removing {self.url}")


def lease_holder(store) -> Optional[dict]:
    """The live lease's holder of an s3:// run, None when there is none (a look, no claim)."""
    lease, _ = LeaseClient(store).read()
    return None if lease is None or stale(lease) else lease


def take_lease(store, busy: Callable[[Optional[dict]], str]) -> Held:
    """The s3:// run's lease, renewed in the background until released; a UserError with
    busy(holder) while another writer's lease is live."""
    client = LeaseClient(store)
    mine = {**holder_info(), "token": uuid.uuid4().hex}
    etag = None
    for _ in range(5):  # a few rounds: another writer may be taking over the same stale lease
        current, current_etag = client.read()
        if current is not None and not stale(current):
            raise UserError(busy(current))
        etag = client.put({**mine, "expires": time.time() + LEASE_S}, if_match=current_etag)
        if etag is None:
            continue
        back, back_etag = client.read()  # a store that ignored the condition: the lease read back decides
        if back is None or back.get("token") != mine["token"]:
            if back is not None and not stale(back):
                raise UserError(busy(back))
            continue
        etag = back_etag or etag
        break
    else:
        current, _ = client.read()
        raise UserError(busy(current))

    stop = threading.Event()
    state = {"etag": etag}

    def renew() -> None:
        while not stop.wait(LEASE_RENEW_S):
            try:
                new = client.put({**mine, "expires": time.time() + LEASE_S}, if_match=state["etag"])
            except Exception:  # noqa: BLE001 - the store is away: try again at the next turn
                continue
            if new is None:
                if stop.is_set():  # released meanwhile: the lease is gone on purpose
                    return
                now, _ = client.read()
                print(f"ftdist: warning: {store.url}: this run's lease was taken over by {describe(now)}; two "
                      "writers may be writing it now", file=sys.stderr, flush=True)
                return
            state["etag"] = new

    thread = threading.Thread(target=renew, name="ftdist-lease", daemon=True)
    thread.start()

    def release() -> None:
        stop.set()
        thread.join(timeout=5)
        try:
            current, _ = client.read()
            if current is not None and current.get("token") == mine["token"]:
                client.delete()
        except UserError:  # the store is away: the lease expires by itself
            pass
    return Held(release)
