"""File-system helpers: atomic writes that honour the umask, and the run-folder lock."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import NinError


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; set straight back
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write through ``write(tmp_path)`` into a temp file beside ``path``, fsync, then rename.

    A crash at any moment leaves either the old file or the new one, never a torn one.  The file gets
    the permissions any new file would (0666 minus the umask: 0644 under umask 022), not mkstemp's 0600.
    A failed write (full disk, unwritable folder) raises NinError naming ``path``, and removes the temp file.
    """
    path = Path(path)
    tmp, replaced = None, False
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        replaced = True
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        if tmp is not None and not replaced and os.path.exists(tmp):
            os.unlink(tmp)
        if not isinstance(e, OSError):
            raise
        kept = "" if replaced or not path.exists() else f"; the previous {path.name} is unchanged"
        raise NinError(f"{path}: cannot write ({e.strerror or e}){kept}") from None
