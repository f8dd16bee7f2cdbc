"""Linear byte devices that hold a unit image.

Design note.  A unit's format code sees only :class:`Device`: positional
reads and writes, a durable ``flush`` and a size.  The local backend is a
plain file (``pwritev`` + ``fdatasync``); the network backend is an NBD
export (:mod:`vmk_storage.nbd`).  Errors leave a device as ``OSError`` with
the errno the operating system (or the NBD server) gave; the unit turns
``ENOSPC``/``EDQUOT`` into :class:`~vmkernel.errors.DiskFull`.

``LocalDevice`` takes an optional ``pwritev`` function so that tests can
simulate a full disk where no small file system can be mounted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Protocol

Buffer = bytes | bytearray | memoryview
PwritevFn = Callable[[int, Sequence[Buffer], int], int]


class Device(Protocol):
    kind: str

    def pread(self, length: int, offset: int) -> bytes: ...

    def preadinto(self, buf: memoryview, offset: int) -> int: ...

    def pwrite(self, parts: Sequence[Buffer], offset: int) -> None: ...

    def flush(self) -> None: ...

    def size(self) -> int: ...

    def truncate(self, length: int) -> None: ...

    def close(self) -> None: ...


class LocalDevice:
    """A unit image in a local file."""

    kind = "local"

    def __init__(
        self, path: os.PathLike[str] | str, *, writable: bool, pwritev: PwritevFn | None = None
    ) -> None:
        self.path = os.fspath(path)
        self.writable = writable
        self._fd = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)
        self._pwritev = pwritev or os.pwritev

    def pread(self, length: int, offset: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def preadinto(self, buf: memoryview, offset: int) -> int:
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def pwrite(self, parts: Sequence[Buffer], offset: int) -> None:
        views = [memoryview(p).cast("B") for p in parts]
        total = sum(len(v) for v in views)
        done = 0
        while done < total:
            # pwritev may write short (signals, large requests): continue from where it stopped
            skip = done
            rest: list[memoryview] = []
            for v in views:
                if skip >= len(v):
                    skip -= len(v)
                    continue
                rest.append(v[skip:])
                skip = 0
            n = self._pwritev(self._fd, rest, offset + done)
            if n <= 0:
                raise OSError(5, "short write with no progress")
            done += n

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def truncate(self, length: int) -> None:
        os.ftruncate(self._fd, length)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def fsync_dir(path: os.PathLike[str] | str) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
