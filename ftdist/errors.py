"""User-facing errors: the CLI turns these into one message and exit code 2."""


EXIT_USER_ERROR = 2  # what a UserError ends the command with


class UserError(Exception):
    """A problem the user can fix (config, data, paths). Its message says how."""


# OSErrors that are the user's to fix (a permission, a full disk, a name the file system
# refuses), with what to do. Any other OSError is ftdist's own failure.
PATH_FIXES = {
    "EACCES": "give this user access to it, or point ftdist at a place it may use",
    "EPERM": "give this user access to it (an immutable file or directory: chattr -i), or point ftdist at a place "
             "it may use",
    "EROFS": "it is on a read-only file system: point ftdist at a writable place",
    "ENOSPC": "free space there, or point ftdist at another disk, and run the same command again",
    "EDQUOT": "free space within your quota, or point ftdist at another disk, and run the same command again",
    "EFBIG": "a file grew past the file-size limit (ulimit -f): raise it, and run the same command again",
    "ENAMETOOLONG": "use a shorter name or path",
    "ENOTDIR": "a file stands where a directory is needed: move it, or point ftdist elsewhere",
    "ELOOP": "a symbolic link loops: fix the link, or point ftdist elsewhere",
}


def path_problem(error: BaseException) -> "str | None":
    """One message for an OSError the user can fix, naming its file and the fix; None for others.
    Writers in Rust (safetensors, tokenizers) report an OSError only in their text ("os error 28")."""
    import errno as codes
    import os
    import re

    if not isinstance(error, OSError):
        found = re.search(r"os error (\d+)", str(error))
        name = codes.errorcode.get(int(found.group(1))) if found else None
        if name not in PATH_FIXES:
            return None
        return f"{os.strerror(int(found.group(1)))} ({str(error).splitlines()[0][:300]}); {PATH_FIXES[name]}"
    name = codes.errorcode.get(error.errno or -1)
    if name not in PATH_FIXES:
        return None
    where = error.filename if error.filename is not None else "a file"
    also = f" (to {error.filename2})" if error.filename2 is not None else ""
    return f"{where}{also}: {error.strerror or name}; {PATH_FIXES[name]}"
