"""Writing files so that a reader never sees half of one: atomic replacement, directory locks.

Used by every writer in lily_lab (adapters, recordings, reports): one definition of each.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, flush it to disk, then rename it over ``path``.

    The file is created with mode 0o666 less the umask, as ``open`` would (``tempfile.mkstemp``
    gives 0o600, which would leave a shared checkpoint readable by its owner only).
    """
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


@contextlib.contextmanager
def directory_lock(directory: Path, shared: bool = False) -> Iterator[None]:
    """Hold an advisory ``flock`` on ``directory`` (exclusive for a save, shared for a load).

    Where the platform has no ``flock`` (Windows), or the directory cannot be opened for it, this
    is a no-op: the atomic renames still leave one complete adapter from an interrupted save.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some network mounts)
            pass
        yield
    finally:
        os.close(fd)  # releases the lock
