"""A full disk, told: a write that runs out of room (or into a file-size limit) ends in one
message naming what was being written and the fix, its partial output removed."""

from __future__ import annotations

import errno
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from ftdist.errors import UserError

DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def disk_full(error: Exception, path: Path) -> Optional[str]:
    """Why `error` means the disk (or a file-size limit) is full; None when it does not.
    Writers report it differently: OSError's errno; safetensors' "os error 28"; torch.save's
    zip writer only a RuntimeError ("unexpected pos"), told by the disk's free space or a
    file that reached the file-size limit."""
    import resource

    if isinstance(error, OSError) and error.errno is not None:
        return error.strerror if error.errno in DISK_FULL else None
    found = re.search(r"os error (\d+)", str(error))
    if found:
        return os.strerror(int(found.group(1))) if int(found.group(1)) in DISK_FULL else None
    if not isinstance(error, (RuntimeError, OSError)):  # an OSError without errno: numpy's short write
        return None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    sizes = [f.stat().st_size for f in path.rglob("*") if f.is_file()] if path.is_dir() else []
    if limit != resource.RLIM_INFINITY and sizes and max(sizes) >= limit - 4096:
        return os.strerror(errno.EFBIG)
    if shutil.disk_usage(path.parent if path.parent.exists() else "/").free < 16 * 2**20:
        return os.strerror(errno.ENOSPC)
    return None


@contextmanager
def no_room_stops(path: Path, what: str, fix: str, remove: Optional[Callable[[], None]] = None):
    """Writing `what` into `path` (a checkpoint, final/, base/, the prepared rows' staging
    directory): a full disk (or a file-size limit) ends in one message naming it, with `fix`;
    the partial `path` goes (`remove`; by default the tree, never following a link inside it),
    freeing what it took; nothing else does."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - only disk-full errors are translated
        reason = disk_full(e, path)
        if reason is None:
            raise
        if remove is not None:
            remove()
        else:
            shutil.rmtree(path, ignore_errors=True)
        raise UserError(f"{what}: no room to write it in {path.parent} ({reason}); {fix}") from None
