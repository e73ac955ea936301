"""Writing inside the directories ftdist owns without ever following a symbolic link.

Inside a run directory (and a search's directory, an export being written, the entries of
storage.cache_dir), ftdist creates, writes, renames and deletes only regular files and
directories it made. A symbolic link where it would write (metrics.jsonl, final.tmp,
checkpoints/, tensorboard/, ...) is refused with one message naming it and its target, never
written through: the writes, or the deletions, would land in whatever it points at. A FIFO or
a device there is refused too (opening one could hang), and so is a file with a second hard
link (an append would change the other name's file too).

Where the line is drawn:
- The path *up to* such a directory is the user's own choice and may hold links (run.output
  on another disk through a link, a linked home, storage.cache_dir): every function here
  checks only what lies below `root`, the directory ftdist owns.
- The directory itself, where a command writes and replaces, must not be a link either: a
  run directory <run.output>/<run.name> (rundir.claim) and `export --out` (export.check_output)
  that are links are refused, with the link's target named as what to give instead.
- A command pointed at a directory to read (`ftdist report RUN`, export's source) takes that
  path as given; what it writes inside follows the rule.

Each check is an lstat just before the write; files are opened with O_NOFOLLOW, so the link
that matters most (the file itself) cannot slip in between. Deleting a tree that ftdist made
(shutil.rmtree) never follows a link found inside it: the link goes, its target is untouched
(libraries make links of their own there, e.g. W&B's latest-run).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path
from typing import IO

from ftdist.errors import UserError


class LinkRefused(UserError):
    """A symbolic link (or another file that is not ftdist's) where ftdist would write."""


def refuse(path: Path, what: str) -> LinkRefused:
    """The refusal of a link at `path` (returned, for the caller to raise)."""
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:
        target = ""
    return LinkRefused(f"{path} is a symbolic link{target} where ftdist writes {what}; ftdist never writes through "
                       "a link: remove the link (ftdist makes that file or directory itself) and run the command again")


def check(path: Path, root: Path, what: str) -> None:
    """Refuse when `path`, or a directory between `root` (excluded) and it, is a symbolic link.
    A path outside `root` is checked alone."""
    path, root = Path(path), Path(root)
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        parts, root = (path.name,), path.parent
    here = root
    for part in parts:
        here = here / part
        if here.is_symlink():
            raise refuse(here, what)


def open_file(path: Path, root: Path, what: str, mode: str = "w") -> IO:
    """`path` opened for writing ("w", "wb") or appending ("a", "ab"), created if missing; never
    through a link, and only when it is a regular file with no other name."""
    path = Path(path)
    check(path.parent, root, what)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    if "a" in mode:
        flags |= os.O_APPEND
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP or path.is_symlink():
            raise refuse(path, what) from None
        if e.errno == errno.ENXIO:  # a FIFO nobody reads
            raise not_regular(path, what) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            raise not_regular(path, what, st)
        os.set_blocking(fd, True)
        if "w" in mode:
            os.ftruncate(fd, 0)  # only now: a refused file is left as it was
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def not_regular(path: Path, what: str, st: os.stat_result | None = None) -> LinkRefused:
    kind = "has a second hard link" if st is not None and stat.S_ISREG(st.st_mode) else "is not a regular file"
    return LinkRefused(f"{path} {kind}, where ftdist writes {what}; ftdist writes only files it made: remove it and "
                       "run the command again")


def write_text(path: Path, root: Path, what: str, text: str) -> None:
    write_bytes(path, root, what, text.encode())


def write_bytes(path: Path, root: Path, what: str, data: bytes) -> None:
    """Whole or not at all: written to <name>.tmp beside `path`, then renamed over it, so that
    a reader (or a kill in between) never finds half a file. Markers depend on it: a COMPLETE
    that exists is complete."""
    path = Path(path)
    check(path, root, what)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and (not stat.S_ISREG(st.st_mode) or st.st_nlink > 1):
        raise not_regular(path, what, st)
    staged = path.with_name(path.name + ".tmp")
    try:
        with open_file(staged, root, what, "wb") as f:
            f.write(data)
        os.replace(staged, path)
    except BaseException:
        if staged.is_file() and not staged.is_symlink():
            staged.unlink()
        raise


def save_figure(fig, path: Path, what: str = "a plot", dpi: int = 110) -> None:
    """A matplotlib figure as PNG at `path` (in the directory it lies in, ftdist's)."""
    with open_file(path, Path(path).parent, what, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)


def copy_file(source: Path, dest: Path, root: Path, what: str) -> None:
    """Copy `source` (read as given) to `dest` inside `root` (written by the rule)."""
    with open(source, "rb") as src, open_file(dest, root, what, "wb") as out:
        shutil.copyfileobj(src, out)


def make_dirs(path: Path, root: Path, what: str) -> Path:
    """`path` and the directories between `root` and it, made where missing; a link among them
    is refused (never made through). `root` itself is made as a plain directory if missing."""
    path, root = Path(path), Path(root)
    root.mkdir(parents=True, exist_ok=True)
    here = root
    for part in path.relative_to(root).parts:
        here = here / part
        if here.is_symlink():
            raise refuse(here, what)
        try:
            here.mkdir()
        except FileExistsError:
            if here.is_symlink():  # made between the check and the mkdir
                raise refuse(here, what) from None
            if not here.is_dir():
                raise LinkRefused(f"{here} is a file where ftdist makes the directory for {what}; remove it and run "
                                  "the command again") from None
    return path


def remove(path: Path, root: Path, what: str) -> None:
    """Delete the file or tree `path` (nothing when it is missing). A link at `path` or above it
    (below `root`), or a FIFO, socket or device there, is refused; inside the tree, links are
    removed, never followed."""
    path = Path(path)
    check(path, root, what)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    elif stat.S_ISREG(st.st_mode):
        path.unlink(missing_ok=True)
    else:  # a FIFO, a socket, a device: not a file ftdist made
        raise not_regular(path, what)


def remove_quietly(path: Path, root: Path, what: str) -> None:
    """remove(), on the way out of a failure: a refusal or an error here must not hide that one
    (a link is still never followed: it stays)."""
    try:
        remove(path, root, what)
    except (OSError, UserError):
        pass


def rename(source: Path, dest: Path, root: Path, what: str) -> None:
    """Rename `source` to `dest` (both below `root`), neither of them, nor a directory above
    them, a link. `dest` must be free or an empty directory."""
    check(source, root, what)
    check(dest, root, what)
    os.rename(source, dest)
