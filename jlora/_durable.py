"""The local file-system steps :mod:`jlora._atomic` builds on: a text file written durably and
atomically (temporary file, fsync, rename, fsync of the directory), a directory's fsync, and an
exclusive ``flock`` on a directory. On remote file systems (``gs://``) the write is a plain write
and the lock is nothing."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from etils import epath

from ._dirs import is_local


def _write_atomically(path: epath.Path, text: str) -> None:
    if not is_local(path):
        path.write_text(text)
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.fspath(path)))


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(directory: epath.Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``directory`` (nothing where flock is unavailable)."""
    fd = None
    if is_local(directory):
        try:
            import fcntl

            fd = os.open(os.fspath(directory), os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except (OSError, ImportError):
            if fd is not None:
                os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock
