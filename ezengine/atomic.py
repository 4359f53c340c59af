"""File writes: atomic replacement (a reader, or a crash, never sees a half-written file),
and a full disk reported as which file and what was kept."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


class DiskFullError(OSError):
    """The disk filled up while writing a file; the message names it and what was kept."""

    def __str__(self) -> str:
        return str(self.strerror)


def raise_if_disk_full(exc: OSError, path: Path, kept: str) -> None:
    """Raise a DiskFullError naming `path` and what was `kept` when `exc` says the disk (or
    the quota) is full; return otherwise (the caller re-raises `exc`)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFullError(exc.errno, f"disk full while writing {path}: {kept}. Free some "
                            "space; `ezengine train --resume RUN_DIR` continues a run"
                            ) from exc


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write` on a temporary file beside `path`, fsync it, then rename it over `path`.

    The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise_if_disk_full(exc, path, f"the previous {path.name} is kept unchanged"
                               if path.exists() else "no part of it was written")
        raise


def remove_leftover_temporaries(path: str | Path) -> list[Path]:
    """Delete temporary files that :func:`atomic_write` left beside `path` when its process
    was killed mid-write (`path` itself is never half-written); returns those removed."""
    path = Path(path)
    leftovers = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for tmp in leftovers:
        tmp.unlink(missing_ok=True)
    return leftovers
