"""Pure-Python reference model of the NBD client (the fast one is ``vmkernel._core.NbdClient``).

Design note.  Storage units of the network backend live in images that
qemu-nbd serves on a unix socket.  The client speaks the subset of the NBD
protocol they need: the fixed newstyle handshake with one ``NBD_OPT_GO`` that
also asks for the block-size constraints (``NBD_INFO_EXPORT`` must be exactly
12 bytes, ``NBD_INFO_BLOCK_SIZE`` 14), then ``READ``, ``WRITE``,
``WRITE_ZEROES`` (zero-filled writes when the export lacks it), ``FLUSH`` and
``DISC`` with simple replies, one request in flight at a time.  Reads and
writes longer than ``max_payload`` are split.  Data moves with
``sendmsg``/``recv_into`` without copying.

The server is not trusted: an option reply may carry at most 64 KiB and at
most 64 of them may precede the acknowledgement, so nothing the server says
makes the client allocate more.  Every failure is an ``OSError``: the
server's own error number for an error reply (the session goes on),
``EPROTO`` (:class:`~vmkernel.errors.NbdProtocolError`) for a broken
protocol, ``ENOENT`` for a refused export, ``ESHUTDOWN`` when the server hangs
up, ``ETIMEDOUT`` when it stalls, ``ENOTSUP`` for ``FLUSH`` on an export
without it.  A failure that leaves the byte stream out of step drops the
connection, and later calls raise ``ENOTCONN`` rather than read a stale
reply.  Arguments are checked before any byte is sent
(:class:`~vmkernel.errors.InvalidArgument`).  The Rust client has the same
API, errors and messages; the differential tests hold it to this one.
"""

from __future__ import annotations

import contextlib
import errno
import operator
import os
import socket
import struct
from typing import TYPE_CHECKING, Any

from vmkernel.errors import BufferLayoutError, InvalidArgument, NbdProtocolError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from typing_extensions import Buffer

__all__ = [
    "CMD_DISC",
    "CMD_FLUSH",
    "CMD_READ",
    "CMD_WRITE",
    "CMD_WRITE_ZEROES",
    "DEFAULT_EXPORT",
    "FLAG_FIXED_NEWSTYLE",
    "FLAG_NO_ZEROES",
    "IHAVEOPT",
    "INFO_BLOCK_SIZE",
    "INFO_EXPORT",
    "MAX_PAYLOAD",
    "MIN_PAYLOAD",
    "NBDMAGIC",
    "OPT_GO",
    "REPLY_MAGIC",
    "REP_ACK",
    "REP_ERR_BIT",
    "REP_INFO",
    "REQUEST_MAGIC",
    "SIMPLE_REPLY_MAGIC",
    "TF_HAS_FLAGS",
    "TF_READ_ONLY",
    "TF_SEND_FLUSH",
    "TF_SEND_WRITE_ZEROES",
    "NbdClient",
]

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_GO = 7
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

DEFAULT_EXPORT = "unit"
MIN_PAYLOAD = 4096
MAX_PAYLOAD = 32 << 20

_REQ = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_OPT_REPLY = struct.Struct(">QIII")

_MAX_EXPORT_NAME = 4096
_MAX_OPTION_PAYLOAD = 64 << 10
_MAX_OPTION_REPLIES = 64
_MAX_ZEROES_REQUEST = 1 << 31  # the request length field is 32 bits
_MAX_IOVECS = 1024  # Linux IOV_MAX
_COMMANDS = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_FLUSH: "FLUSH", CMD_WRITE_ZEROES: "WRITE_ZEROES"}

_U64_EXPECTED = "an integer in [0, 2**64)"
_WRITABLE_EXPECTED = "a writable C-contiguous buffer (bytearray, memoryview, numpy array)"
_PARTS_EXPECTED = "a sequence of bytes-like objects"
_PART_EXPECTED = "a bytes-like object (a C-contiguous buffer)"
_PATH_EXPECTED = "a str or os.PathLike path of a unix socket (no NUL byte)"


def _strerror(code: int) -> str:
    return os.strerror(code) if 0 <= code < 1 << 31 else f"unknown error {code}"


def _u64_arg(value: Any, thing: str) -> int:
    try:
        n = operator.index(value)
    except TypeError:
        raise InvalidArgument(thing, value, _U64_EXPECTED) from None
    if not 0 <= n < 1 << 64:
        raise InvalidArgument(thing, value, _U64_EXPECTED)
    return int(n)


def _check_range(offset: int, length: int) -> None:
    if offset + length > 1 << 64:
        raise InvalidArgument("offset + length", offset + length, "at most 2**64 (the NBD offset range)")


def _path_arg(value: object) -> str:
    try:
        path = os.fspath(value)  # type: ignore[call-overload]
    except TypeError:
        path = None
    if not isinstance(path, str) or "\0" in path:
        raise InvalidArgument("socket_path", value, _PATH_EXPECTED)
    return path


def _export_arg(value: object) -> bytes:
    expected = f"a str of at most {_MAX_EXPORT_NAME} UTF-8 bytes"
    if not isinstance(value, str):
        raise InvalidArgument("export", value, expected)
    try:
        name = value.encode()
    except UnicodeEncodeError:
        raise InvalidArgument("export", value, expected) from None
    if len(name) > _MAX_EXPORT_NAME:
        raise InvalidArgument("export", value, expected)
    return name


def _timeout_arg(value: Any) -> float:
    expected = "a number of seconds in [0.001, 2**31)"
    try:
        # What a C extension's float conversion accepts: __float__, else __index__.
        number = value if hasattr(type(value), "__float__") else operator.index(value)
        seconds = float(number)
    except (TypeError, ValueError, OverflowError):
        raise InvalidArgument("timeout", value, expected) from None
    if not 0.001 <= seconds < 2.0**31:
        raise InvalidArgument("timeout", value, expected)
    return seconds


def _seconds(value: float) -> str:
    """``value`` as Rust prints an ``f64`` (no ``.0`` on whole numbers; no exponent in our range)."""
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text


def _max_payload_arg(value: Any) -> int:
    expected = f"an integer in [{MIN_PAYLOAD}, {MAX_PAYLOAD}]"
    try:
        n = operator.index(value)
    except TypeError:
        raise InvalidArgument("max_payload", value, expected) from None
    if not MIN_PAYLOAD <= n <= MAX_PAYLOAD:
        raise InvalidArgument("max_payload", value, expected)
    return int(n)


def _export_buffer(obj: object, thing: str, expected: str) -> memoryview:
    try:
        return memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgument(thing, obj, expected) from None


def _bytes_view(view: memoryview, thing: str) -> memoryview:
    if not view.c_contiguous:
        raise BufferLayoutError(f"{thing}.c_contiguous", False, "True (a C-contiguous buffer)")
    return view.cast("B") if view.nbytes else memoryview(b"")


class NbdClient:
    """One connection to an NBD export over a unix socket.

    ``NbdClient(socket_path, export="unit", *, timeout=60.0)`` connects and
    negotiates; every socket read or write times out after ``timeout``
    seconds.
    """

    __slots__ = (
        "_dropped_by",
        "_export",
        "_flags",
        "_handle",
        "_max_payload",
        "_path",
        "_size",
        "_sock",
        "_timeout",
    )

    def __init__(
        self, socket_path: str | os.PathLike[str], export: str = DEFAULT_EXPORT, *, timeout: float = 60.0
    ) -> None:
        name = _export_arg(export)
        seconds = _timeout_arg(timeout)
        path = _path_arg(socket_path)
        self._path = path
        self._export = export
        self._timeout = seconds
        self._handle = 0
        self._size = 0
        self._flags = 0
        self._max_payload = MAX_PAYLOAD
        self._dropped_by: int | None = None
        self._sock: socket.socket | None = None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(seconds)
        try:
            sock.connect(path)
        except TimeoutError:
            sock.close()
            raise self._timed_out() from None
        except OSError as exc:
            sock.close()
            code = exc.errno or errno.EINVAL
            raise OSError(code, f"cannot connect to NBD server at {path}: {_strerror(code)}") from None
        self._sock = sock
        try:
            self._handshake(name)
        except BaseException:
            self._close_socket()
            raise

    # ----------------------------------------------------------- attributes
    @property
    def socket_path(self) -> str:
        """The server's unix socket."""
        return self._path

    @property
    def export(self) -> str:
        """The export's name."""
        return self._export

    @property
    def size(self) -> int:
        """The export's size in bytes."""
        return self._size

    @property
    def transmission_flags(self) -> int:
        """The export's transmission flags (``TF_*``)."""
        return self._flags

    @property
    def max_payload(self) -> int:
        """The largest payload of one request; longer reads and writes are split."""
        return self._max_payload

    @max_payload.setter
    def max_payload(self, value: int) -> None:
        self._max_payload = _max_payload_arg(value)

    # ------------------------------------------------------------ transport
    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _fail(self, exc: OSError) -> OSError:
        """Drops the connection (the stream is out of step) and returns ``exc`` to raise."""
        if self._sock is not None:
            self._close_socket()
            self._dropped_by = exc.errno
        return exc

    def _protocol(self, detail: str) -> OSError:
        return self._fail(NbdProtocolError(detail))

    def _timed_out(self) -> OSError:
        seconds = _seconds(self._timeout)
        return OSError(errno.ETIMEDOUT, f"NBD server at {self._path} stalled for {seconds} s (the timeout)")

    def _hung_up(self) -> OSError:
        return self._fail(OSError(errno.ESHUTDOWN, f"NBD server at {self._path} closed the connection"))

    def _not_connected(self) -> OSError:
        if self._dropped_by is None:
            return OSError(errno.ENOTCONN, f"NBD connection to {self._path} is closed")
        return OSError(
            errno.ENOTCONN,
            f"NBD connection to {self._path} was dropped after an error (errno {self._dropped_by})",
        )

    def _live(self) -> socket.socket:
        if self._sock is None:
            raise self._not_connected()
        return self._sock

    def _transport_error(self, exc: OSError, what: str) -> OSError:
        if isinstance(exc, TimeoutError) or exc.errno in (errno.EAGAIN, errno.ETIMEDOUT):
            return self._fail(self._timed_out())
        code = exc.errno or errno.EIO
        return self._fail(OSError(code, f"cannot {what} NBD server at {self._path}: {_strerror(code)}"))

    def _recv_into(self, view: memoryview) -> None:
        sock = self._live()
        got = 0
        while got < len(view):
            try:
                n = sock.recv_into(view[got:])
            except OSError as exc:
                raise self._transport_error(exc, "receive from") from None
            if n == 0:
                raise self._hung_up()
            got += n

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _send(self, parts: Iterable[Buffer]) -> None:
        sock = self._live()
        views = [v for v in (memoryview(p).cast("B") for p in parts) if len(v)]
        while views:
            try:
                sent = sock.sendmsg(views[:_MAX_IOVECS])
            except OSError as exc:
                raise self._transport_error(exc, "send to") from None
            if sent == 0:
                raise self._hung_up()
            while sent:
                if sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0

    # ------------------------------------------------------------ handshake
    def _handshake(self, name: bytes) -> None:
        magic, opt_magic, flags = struct.unpack(">QQH", self._recv_exact(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise self._protocol(f"greeting {magic:#x}/{opt_magic:#x}, expected fixed newstyle")
        if not flags & FLAG_FIXED_NEWSTYLE:
            raise self._protocol(f"handshake flags {flags:#x} lack FIXED_NEWSTYLE")
        client_flags = FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)
        data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, INFO_BLOCK_SIZE)
        self._send([struct.pack(">I", client_flags), struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)), data])
        for _ in range(_MAX_OPTION_REPLIES):
            magic, option, rtype, length = _OPT_REPLY.unpack(self._recv_exact(_OPT_REPLY.size))
            if magic != REPLY_MAGIC or option != OPT_GO:
                raise self._protocol(f"option reply {magic:#x} for option {option}")
            if length > _MAX_OPTION_PAYLOAD:  # the protocol caps strings at 4 KiB; never allocate more
                raise self._protocol(f"option reply of {length} bytes (at most {_MAX_OPTION_PAYLOAD})")
            payload = self._recv_exact(length)
            if rtype & REP_ERR_BIT:
                message = payload.decode(errors="replace")
                raise self._fail(
                    OSError(errno.ENOENT, f"NBD export {self._export} refused ({rtype:#x}): {message}")
                )
            if rtype == REP_ACK:
                break
            if rtype == REP_INFO and len(payload) >= 2:
                (info,) = struct.unpack_from(">H", payload)
                if info == INFO_EXPORT:
                    if len(payload) != 12:
                        raise self._protocol(f"NBD_INFO_EXPORT of {len(payload)} bytes, expected 12")
                    self._size, self._flags = struct.unpack_from(">QH", payload, 2)
                elif info == INFO_BLOCK_SIZE:
                    if len(payload) != 14:
                        raise self._protocol(f"NBD_INFO_BLOCK_SIZE of {len(payload)} bytes, expected 14")
                    _minimum, _preferred, maximum = struct.unpack_from(">III", payload, 2)
                    self._max_payload = max(MIN_PAYLOAD, min(maximum, MAX_PAYLOAD))
        else:
            raise self._protocol(f"no NBD_REP_ACK after {_MAX_OPTION_REPLIES} option replies")
        if not self._flags & TF_HAS_FLAGS:
            raise self._protocol("export information missing")

    # ---------------------------------------------------------- transmission
    def _request(
        self,
        cmd: int,
        offset: int,
        length: int,
        payload: Iterable[Buffer] = (),
        into: memoryview | None = None,
    ) -> None:
        """Sends one request and reads its simple reply (and the reply data into ``into``)."""
        self._handle += 1
        self._send([_REQ.pack(REQUEST_MAGIC, 0, cmd, self._handle, offset, length), *payload])
        magic, error, handle = _SIMPLE_REPLY.unpack(self._recv_exact(_SIMPLE_REPLY.size))
        if magic != SIMPLE_REPLY_MAGIC or handle != self._handle:
            raise self._protocol(f"reply magic {magic:#x} handle {handle}, expected handle {self._handle}")
        if error:
            raise OSError(
                error,
                f"NBD server at {self._path}: {_COMMANDS[cmd]} of {length} bytes at offset {offset} "
                f"failed: {_strerror(error)}",
            )
        if into is not None:
            self._recv_into(into)

    def readinto(self, buf: Buffer, offset: int) -> None:
        """Reads ``len(buf)`` bytes at ``offset`` into ``buf`` (any writable C-contiguous buffer)."""
        view = _export_buffer(buf, "buf", _WRITABLE_EXPECTED)
        if view.readonly:
            raise BufferLayoutError("buf.readonly", True, "False (a writable buffer)")
        view = _bytes_view(view, "buf")
        start = _u64_arg(offset, "offset")
        _check_range(start, len(view))
        self._live()
        done = 0
        while done < len(view):
            n = min(len(view) - done, self._max_payload)
            self._request(CMD_READ, start + done, n, into=view[done : done + n])
            done += n

    def read(self, length: int, offset: int) -> bytes:
        """``length`` bytes at ``offset``."""
        n = _u64_arg(length, "length")
        start = _u64_arg(offset, "offset")
        _check_range(start, n)
        buf = bytearray(n)
        self.readinto(buf, start)
        return bytes(buf)

    def write(self, parts: Iterable[Buffer], offset: int) -> None:
        """Writes the concatenation of ``parts`` (a sequence of bytes-like objects) at ``offset``."""
        try:
            memoryview(parts)  # type: ignore[arg-type]
        except TypeError:
            pass
        else:
            raise InvalidArgument("parts", parts, _PARTS_EXPECTED)
        try:
            items = list(parts)
        except TypeError:
            raise InvalidArgument("parts", parts, _PARTS_EXPECTED) from None
        views = [
            _bytes_view(_export_buffer(p, f"parts[{i}]", _PART_EXPECTED), f"parts[{i}]")
            for i, p in enumerate(items)
        ]
        start = _u64_arg(offset, "offset")
        total = sum(len(v) for v in views)
        _check_range(start, total)
        self._live()
        if total <= self._max_payload:
            if total:
                self._request(CMD_WRITE, start, total, views)
            return
        joined = memoryview(b"".join(views))
        for at in range(0, total, self._max_payload):
            chunk = joined[at : at + self._max_payload]
            self._request(CMD_WRITE, start + at, len(chunk), [chunk])

    def write_zeroes(self, offset: int, length: int) -> None:
        """Makes ``length`` bytes at ``offset`` read as zeros (zero-filled writes when the export
        lacks ``WRITE_ZEROES``)."""
        start = _u64_arg(offset, "offset")
        n = _u64_arg(length, "length")
        _check_range(start, n)
        self._live()
        if not self._flags & TF_SEND_WRITE_ZEROES:
            zeros = memoryview(bytes(min(n, self._max_payload)))
            for at in range(0, n, self._max_payload):
                chunk = zeros[: min(self._max_payload, n - at)]
                self._request(CMD_WRITE, start + at, len(chunk), [chunk])
            return
        for at in range(0, n, _MAX_ZEROES_REQUEST):
            self._request(CMD_WRITE_ZEROES, start + at, min(_MAX_ZEROES_REQUEST, n - at))

    def flush(self) -> None:
        """Makes every acknowledged write durable (``ENOTSUP`` when the export cannot flush)."""
        self._live()
        if not self._flags & TF_SEND_FLUSH:
            raise OSError(
                errno.ENOTSUP,
                f"NBD export {self._export} at {self._path} does not support FLUSH; "
                "writes could not be made durable",
            )
        self._request(CMD_FLUSH, 0, 0)

    def close(self) -> None:
        """Disconnects (a second call does nothing)."""
        sock = self._sock
        if sock is None:
            self._dropped_by = None
            return
        self._handle += 1
        with contextlib.suppress(OSError):  # the server may be gone; closing is all that is left
            sock.sendmsg([_REQ.pack(REQUEST_MAGIC, 0, CMD_DISC, self._handle, 0, 0)])
        self._close_socket()
        self._dropped_by = None
