"""Network backend: unit images served by qemu-nbd, reached with an NBD client.

Design note.  Each unit image is exported by its own ``qemu-nbd`` process
(Debian's qemu-utils) on a unix socket, started on first use, persistent
(it outlives client connections) and shared (several clients, e.g. a writer
and a checker, at once).  Sockets live in a short runtime directory, named
after a digest of the image path, so that another process with the same
runtime directory finds a running server instead of starting a second one
(qemu would refuse: it locks the image).

The client speaks the NBD protocol as specified upstream (fixed newstyle
handshake, ``NBD_OPT_GO`` with export and block-size information, simple
replies; ``READ``, ``WRITE``, ``FLUSH``, ``WRITE_ZEROES``, ``DISC``).  No
maintained NBD client exists on PyPI; libnbd's Python binding ships only
for the system interpreter, so this client is small, pure Python and
tested against the real server; it moves data with ``sendmsg``/
``recv_into`` without copying payloads.  Server error numbers arrive as
``OSError`` with the same errno (NBD uses the Linux values).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from vmk_storage.device import Buffer

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_GO = 7
OPT_ABORT = 2
REP_ACK = 1
REP_INFO = 3
REP_ERR_BIT = 1 << 31
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

TF_HAS_FLAGS = 1
TF_READ_ONLY = 2
TF_SEND_FLUSH = 4
TF_SEND_WRITE_ZEROES = 64

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_WRITE_ZEROES = 6

_REQ = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_OPT_REPLY = struct.Struct(">QIII")

DEFAULT_EXPORT = "unit"
_MAX_OPTION_PAYLOAD = 64 << 10
_MAX_OPTION_REPLIES = 64


class NbdProtocolError(OSError):
    """The server answered outside the protocol (an ``OSError`` with ``EPROTO``)."""

    def __init__(self, detail: str) -> None:
        super().__init__(errno.EPROTO, f"NBD protocol error: {detail}")


def qemu_nbd_path() -> str | None:
    """The qemu-nbd executable, or ``None`` when qemu-utils is not installed."""
    return shutil.which("qemu-nbd")


class NbdClient:
    """One connection to an NBD export over a unix socket."""

    def __init__(self, socket_path: str, export: str = DEFAULT_EXPORT, *, timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.export = export
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._handle = 0
        self.size = 0
        self.transmission_flags = 0
        self.max_payload = 32 << 20
        try:
            self._sock.connect(socket_path)
            self._handshake()
        except BaseException:
            self._sock.close()
            raise

    # ------------------------------------------------------------ handshake
    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = self._sock.recv_into(view[got:])
            if n == 0:
                raise OSError(errno.ESHUTDOWN, f"NBD server at {self.socket_path} closed the connection")
            got += n

    def _send(self, parts: Sequence[Buffer]) -> None:
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        while views:
            sent = self._sock.sendmsg(views)
            while sent:
                if sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0

    def _handshake(self) -> None:
        magic, opt_magic, flags = struct.unpack(">QQH", self._recv_exact(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise NbdProtocolError(f"greeting {magic:#x}/{opt_magic:#x}, expected fixed newstyle")
        if not flags & FLAG_FIXED_NEWSTYLE:
            raise NbdProtocolError(f"handshake flags {flags:#x} lack FIXED_NEWSTYLE")
        client_flags = FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)
        name = self.export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, INFO_BLOCK_SIZE)
        self._send([struct.pack(">I", client_flags), struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)), data])
        for _ in range(_MAX_OPTION_REPLIES):
            magic, option, rtype, length = _OPT_REPLY.unpack(self._recv_exact(_OPT_REPLY.size))
            if magic != REPLY_MAGIC or option != OPT_GO:
                raise NbdProtocolError(f"option reply {magic:#x} for option {option}")
            if length > _MAX_OPTION_PAYLOAD:  # the protocol caps strings at 4 KiB; never allocate more
                raise NbdProtocolError(f"option reply of {length} bytes (at most {_MAX_OPTION_PAYLOAD})")
            payload = self._recv_exact(length) if length else b""
            if rtype & REP_ERR_BIT:
                message = payload.decode(errors="replace")
                raise OSError(errno.ENOENT, f"NBD export {self.export!r} refused ({rtype:#x}): {message}")
            if rtype == REP_ACK:
                break
            if rtype == REP_INFO and len(payload) >= 2:
                (info,) = struct.unpack_from(">H", payload)
                if info == INFO_EXPORT:
                    if len(payload) != 12:
                        raise NbdProtocolError(f"NBD_INFO_EXPORT of {len(payload)} bytes, expected 12")
                    self.size, self.transmission_flags = struct.unpack_from(">QH", payload, 2)
                elif info == INFO_BLOCK_SIZE:
                    if len(payload) != 14:
                        raise NbdProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes, expected 14")
                    _minimum, _preferred, maximum = struct.unpack_from(">III", payload, 2)
                    self.max_payload = max(4096, min(maximum, 32 << 20))
        else:
            raise NbdProtocolError(f"no NBD_REP_ACK after {_MAX_OPTION_REPLIES} option replies")
        if not self.transmission_flags & TF_HAS_FLAGS:
            raise NbdProtocolError("export information missing")

    # ---------------------------------------------------------- transmission
    def _command(
        self, cmd: int, offset: int, length: int, payload: Sequence[Buffer] = (), flags: int = 0
    ) -> None:
        self._handle += 1
        self._send([_REQ.pack(REQUEST_MAGIC, flags, cmd, self._handle, offset, length), *payload])

    def _reply(self, into: memoryview | None = None) -> None:
        magic, error, handle = _SIMPLE_REPLY.unpack(self._recv_exact(_SIMPLE_REPLY.size))
        if magic != SIMPLE_REPLY_MAGIC or handle != self._handle:
            raise NbdProtocolError(f"reply magic {magic:#x} handle {handle}, expected handle {self._handle}")
        if error:
            raise OSError(error, f"NBD server: {os.strerror(error)}")
        if into is not None:
            self._recv_into(into)

    def readinto(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            n = min(len(buf) - done, self.max_payload)
            self._command(CMD_READ, offset + done, n)
            self._reply(buf[done : done + n])
            done += n

    def read(self, length: int, offset: int) -> bytes:
        buf = bytearray(length)
        self.readinto(memoryview(buf), offset)
        return bytes(buf)

    def write(self, parts: Sequence[Buffer], offset: int) -> None:
        data = [memoryview(p).cast("B") for p in parts]
        total = sum(len(p) for p in data)
        if total <= self.max_payload:
            self._command(CMD_WRITE, offset, total, data)
            self._reply()
            return
        joined = memoryview(b"".join(data))
        for start in range(0, total, self.max_payload):
            chunk = joined[start : start + self.max_payload]
            self._command(CMD_WRITE, offset + start, len(chunk), [chunk])
            self._reply()

    def write_zeroes(self, offset: int, length: int) -> None:
        if not self.transmission_flags & TF_SEND_WRITE_ZEROES:
            self.write([bytes(length)], offset)
            return
        self._command(CMD_WRITE_ZEROES, offset, length)
        self._reply()

    def flush(self) -> None:
        if not self.transmission_flags & TF_SEND_FLUSH:
            raise OSError(
                errno.ENOTSUP, "NBD export does not support FLUSH; writes could not be made durable"
            )
        self._command(CMD_FLUSH, 0, 0)
        self._reply()

    def close(self) -> None:
        if self._sock.fileno() < 0:
            return
        with contextlib.suppress(OSError):
            self._command(CMD_DISC, 0, 0)
        self._sock.close()


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

    def __init__(self, backend: NbdBackend, image: Path, client: NbdClient) -> None:
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
