"""Network backend: unit images served by qemu-nbd, reached with an NBD client.

Design note.  Each unit image is exported by its own ``qemu-nbd`` process
(Debian's qemu-utils) on a unix socket, started on first use, persistent
(it outlives client connections) and shared (several clients, e.g. a writer
and a checker, at once).  Sockets live in a short runtime directory, named
after a digest of the image path, so that another process with the same
runtime directory finds a running server instead of starting a second one
(qemu would refuse: it locks the image).

The NBD client is not here: it is ``NbdClient`` of the implementation that
``vmkernel.implementation()`` selects when a connection is opened, the Rust
one (``vmkernel._core``) by default and the pure-Python reference
(``vmkernel.reference.nbd``) under ``VMKERNEL_IMPL=reference``.  Both speak
the fixed newstyle handshake with ``NBD_OPT_GO`` and ``READ``, ``WRITE``,
``FLUSH``, ``WRITE_ZEROES``, ``DISC`` with simple replies; no maintained
NBD client exists on PyPI, and libnbd's Python binding ships only for the
system interpreter.  Server error numbers arrive as ``OSError`` with the
same errno (NBD uses the Linux values); a broken protocol is
:class:`~vmkernel.errors.NbdProtocolError` (``EPROTO``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from vmk_storage.device import Buffer
from vmkernel import implementation
from vmkernel.errors import NbdProtocolError
from vmkernel.reference.nbd import DEFAULT_EXPORT

# NbdProtocolError is re-exported for existing imports; the protocol constants live in
# vmkernel.reference.nbd, beside the reference client.
__all__ = [
    "DEFAULT_EXPORT",
    "NbdBackend",
    "NbdClient",
    "NbdConnection",
    "NbdDevice",
    "NbdProtocolError",
    "NbdServer",
    "qemu_nbd_path",
]


class NbdConnection(Protocol):
    """What the backend needs of an NBD client (both implementations' ``NbdClient``)."""

    @property
    def socket_path(self) -> str: ...

    @property
    def export(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def transmission_flags(self) -> int: ...

    @property
    def max_payload(self) -> int: ...

    @max_payload.setter
    def max_payload(self, value: int) -> None: ...

    def readinto(self, buf: Buffer, offset: int) -> None: ...

    def read(self, length: int, offset: int) -> bytes: ...

    def write(self, parts: Sequence[Buffer], offset: int) -> None: ...

    def write_zeroes(self, offset: int, length: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def NbdClient(
    socket_path: str | os.PathLike[str], export: str = DEFAULT_EXPORT, *, timeout: float = 60.0
) -> NbdConnection:
    """Connects to an NBD export with the client of ``vmkernel.implementation()``."""
    client: NbdConnection = implementation().NbdClient(socket_path, export, timeout=timeout)
    return client


def qemu_nbd_path() -> str | None:
    """The qemu-nbd executable, or ``None`` when qemu-utils is not installed."""
    return shutil.which("qemu-nbd")


class NbdServer:
    """A qemu-nbd process exporting one image file on a unix socket."""

    def __init__(self, image: Path, socket_path: Path, *, read_only: bool = False) -> None:
        self.image = image
        self.socket_path = socket_path
        self.log_path = socket_path.with_suffix(".log")
        self.pid_path = socket_path.with_suffix(".pid")
        self.read_only = read_only
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        exe = qemu_nbd_path()
        if exe is None:
            raise FileNotFoundError(errno.ENOENT, "qemu-nbd not found (install Debian's qemu-utils)")
        self.socket_path.unlink(missing_ok=True)
        args = [
            exe,
            "--format=raw",
            f"--socket={self.socket_path}",
            f"--export-name={DEFAULT_EXPORT}",
            "--persistent",
            "--shared=16",
            "--cache=writeback",
            "--aio=threads",
            "--detect-zeroes=off",
            # qemu writes its own pid file, so it is found even if the process that started it dies.
            f"--pid-file={self.pid_path}",
        ]
        if self.read_only:
            args.append("--read-only")
        args.append(str(self.image))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                detail = self.log_path.read_text(errors="replace").strip()
                raise OSError(errno.EIO, f"qemu-nbd exited with {self.proc.returncode}: {detail}")
            if self.socket_path.exists() and _can_connect(self.socket_path):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(errno.ETIMEDOUT, f"qemu-nbd did not listen on {self.socket_path}")
            time.sleep(0.005)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=10)
            self.proc = None
        self.socket_path.unlink(missing_ok=True)
        self.pid_path.unlink(missing_ok=True)
        self.log_path.unlink(missing_ok=True)


def _can_connect(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


class NbdDevice:
    """A unit image reached through an NBD connection."""

    kind = "nbd"

    def __init__(self, backend: NbdBackend, image: Path, client: NbdConnection) -> None:
        self._backend = backend
        self.image = image
        self.client = client

    def pread(self, length: int, offset: int) -> bytes:
        length = max(0, min(length, self.client.size - offset))
        return self.client.read(length, offset) if length else b""

    def preadinto(self, buf: memoryview, offset: int) -> int:
        n = max(0, min(len(buf), self.client.size - offset))
        if n:
            self.client.readinto(buf[:n], offset)
        return n

    def pwrite(self, parts: Sequence[Buffer], offset: int) -> None:
        total = sum(memoryview(p).nbytes for p in parts)
        if offset + total > self.client.size:
            raise OSError(
                errno.ENOSPC, f"NBD export of {self.client.size} bytes cannot hold {offset + total}"
            )
        self.client.write(parts, offset)

    def flush(self) -> None:
        self.client.flush()

    def size(self) -> int:
        return self.client.size

    def truncate(self, length: int) -> None:
        # The export size is fixed; zero what follows the end (bounded) so a scan stops there.
        n = min(self.client.size - length, 1 << 20)
        if n > 0:
            self.client.write_zeroes(length, n)

    def close(self) -> None:
        self.client.close()
        self._backend._release(self.image)


class NbdBackend:
    """Starts, finds and stops the qemu-nbd servers of unit images.

    :param runtime_dir: where sockets live (kept short: unix socket paths are
        limited to 108 bytes).  ``None`` makes a private temporary directory.
    :param capacity: size of a new unit image (sparse) and so of its export.
    """

    kind = "nbd"

    def __init__(self, runtime_dir: str | os.PathLike[str] | None = None, *, capacity: int = 1 << 30) -> None:
        self._owns_runtime = runtime_dir is None
        self.runtime_dir = (
            Path(runtime_dir) if runtime_dir is not None else Path(tempfile.mkdtemp(prefix="vmknbd-"))
        )
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity
        self._servers: dict[Path, NbdServer] = {}  # by socket path
        self._refs: dict[Path, int] = {}

    def socket_for(self, image: Path) -> Path:
        # The inode is part of the name: a server left running on a file that was since
        # replaced (a crash during compaction) must never be mistaken for the new file's.
        st = image.stat()
        key = f"{image.resolve()}:{st.st_dev}:{st.st_ino}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        return self.runtime_dir / f"{digest}.sock"

    def prepare_image(self, image: Path) -> None:
        """Give a new or recovered image its full (sparse) export size."""
        if image.stat().st_size < self.capacity:
            os.truncate(image, self.capacity)

    def open_device(self, image: Path, *, writable: bool) -> NbdDevice:
        image = image.resolve()
        sock = self.socket_for(image)
        if writable and image.stat().st_size < self.capacity:
            # A server started for reading exports the old size: restart it on the grown image.
            self.stop_server(image)
            self.prepare_image(image)
        if sock not in self._servers and not (sock.exists() and _can_connect(sock)):
            server = NbdServer(image, sock)
            server.start()
            self._servers[sock] = server
        client = NbdClient(str(sock))
        self._refs[image] = self._refs.get(image, 0) + 1
        return NbdDevice(self, image, client)

    def _release(self, image: Path) -> None:
        self._refs[image] = self._refs.get(image, 1) - 1

    def stop_server(self, image: Path) -> None:
        """Stop the server of ``image`` (before it is renamed or deleted), whoever started it."""
        image = image.resolve()
        if not image.exists():
            return
        sock = self.socket_for(image)
        server = self._servers.pop(sock, None)
        if server is not None:
            server.stop()
        else:
            self.stop_server_by_pid_file(sock.with_suffix(".pid"))

    def stop_server_by_pid_file(self, pid_path: Path) -> None:
        """Stop a server that an earlier backend on this runtime directory started (by its pid)."""
        if not pid_path.exists():
            return
        try:
            pid = int(pid_path.read_text())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"qemu-nbd" not in f.read():
                    raise ProcessLookupError(pid)
            os.kill(pid, signal.SIGTERM)
            for _ in range(2000):
                os.kill(pid, 0)
                with open(f"/proc/{pid}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[-1].split()[0] == b"Z":
                        break  # exited; its parent reaps it
                time.sleep(0.005)
        except (ValueError, ProcessLookupError, FileNotFoundError):
            pass
        for suffix in (".sock", ".pid", ".log"):
            pid_path.with_suffix(suffix).unlink(missing_ok=True)

    def stop_all(self) -> None:
        """Stop every server with a pid file in the runtime directory (also ones of dead processes)."""
        for pid_file in sorted(self.runtime_dir.glob("*.pid")):
            self.stop_server_by_pid_file(pid_file)

    def close(self) -> None:
        """Stop the servers this backend started (all of them if it owns the runtime directory)."""
        for sock in list(self._servers):
            self._servers.pop(sock).stop()
        if self._owns_runtime:
            self.stop_all()
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
