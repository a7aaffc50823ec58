"""Files replaced whole: a crash at any moment leaves the old file or the new one, never a mix.

Checkpoints (streamed by ``torch.save`` into :func:`atomic_file`), run configs, metrics logs, the
kernels' build stamp and prediction outputs are all written this way.
"""

from __future__ import annotations

import glob
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Replace ``path`` with ``data`` so that a crash at any moment leaves the old file or the new one."""
    with atomic_file(path) as out:
        out.write(data)


@contextmanager
def atomic_file(path: Path) -> Iterator[FdWriter]:
    """A binary file object whose bytes replace ``path`` when the block ends without an error, so
    that a crash at any moment leaves the old file or the new one.

    It writes :func:`temp_path` beside ``path``; one left by a killed process is removed by
    :func:`seg.runs.rundir.remove_stale_temps`. An ``OSError`` (a full disk) names ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # same directory, so os.replace is an atomic rename on one filesystem
    tmp = temp_path(path, os.getpid())
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            out = FdWriter(fd)
            yield out
            out.flush()
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # fsync the directory too, or a power cut can lose the rename itself
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class FdWriter:
    """A write-only binary file object over ``fd``, for :func:`atomic_file`. Writes below ``CHUNK``
    bytes (a zip file's headers and names) are gathered into one ``os.write``. The first ``OSError``
    is also kept in ``error``: torch's zip writer turns one raised in ``write`` into a ``RuntimeError``
    that has lost it."""

    CHUNK = 1 << 20

    def __init__(self, fd: int) -> None:
        self.fd, self.error = fd, None
        self._pending = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        if len(self._pending) + len(view) < self.CHUNK:
            self._pending += view
        else:
            self.flush()
            self._write(view)
        return len(view)

    def flush(self) -> None:
        if self._pending:
            self._write(self._pending)
            self._pending.clear()

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        try:
            write_all(self.fd, data)
        except OSError as err:
            self.error = self.error or err
            raise


def temp_path(path: Path, pid: int) -> Path:
    """The temporary file process ``pid`` writes ``path`` through: ``.<name>.<pid>.tmp`` beside it."""
    return path.with_name(f".{path.name}.{pid}.tmp")


def temps_of(path: Path) -> list[Path]:
    """Temporary files :func:`write_atomic` of any process has left for ``path``, and no other file:
    a user's ``.notes.tmp`` beside it is not one."""
    prefix = f".{path.name}."
    return sorted(tmp for tmp in path.parent.glob(f"{glob.escape(prefix)}*.tmp")
                  if tmp.name[len(prefix):-len(".tmp")].isdigit())


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until every byte is written (one call may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
