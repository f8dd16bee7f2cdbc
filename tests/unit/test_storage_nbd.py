"""The NBD clients (Rust and reference) against a real qemu-nbd, cross-checked with qemu-io (an
independent client), and against a scripted server for what qemu-nbd never does (stall, answer
out of step, lack WRITE_ZEROES or FLUSH).  Every test runs once per implementation: the backend
takes its client from ``vmkernel.implementation()``, switched here with ``VMKERNEL_IMPL``."""

from __future__ import annotations

import array
import contextlib
import errno
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from vmk_storage import NbdBackend, NbdClient, UnitStore
from vmk_storage.nbd import NbdProtocolError, qemu_nbd_path
from vmk_storage.testing import NBD_MISSING, new_vm_id

import vmkernel
import vmkernel.errors
from vmkernel.errors import BufferLayoutError, InvalidArgument, StorageError
from vmkernel.reference.nbd import (
    CMD_DISC,
    CMD_FLUSH,
    CMD_READ,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    NBDMAGIC,
    OPT_GO,
    REP_ACK,
    REP_INFO,
    REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC,
    TF_HAS_FLAGS,
    TF_SEND_FLUSH,
    TF_SEND_WRITE_ZEROES,
)

needs_qemu_nbd = pytest.mark.skipif(qemu_nbd_path() is None, reason=NBD_MISSING)


@pytest.fixture(params=["fast", "reference"], autouse=True)
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.setenv("VMKERNEL_IMPL", request.param)
    return vmkernel.implementation()


@pytest.fixture
def served(tmp_path):
    if qemu_nbd_path() is None:
        pytest.skip(NBD_MISSING)
    image = tmp_path / "img.raw"
    image.write_bytes(b"")
    backend = NbdBackend(capacity=8 << 20)
    dev = backend.open_device(image, writable=True)
    yield image, backend, dev
    dev.close()
    backend.close()


def qemu_io(sock: Path, command: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io not found (Debian's qemu-utils ships it)")
    uri = f"nbd+unix:///unit?socket={sock}"
    return subprocess.run(
        ["qemu-io", "-f", "raw", "-c", command, uri], capture_output=True, text=True, timeout=60
    )


# ------------------------------------------------------------------ qemu-nbd


def test_the_backend_uses_the_selected_client(served, impl):
    _image, _backend, dev = served
    assert type(dev.client) is impl.NbdClient


def test_handshake_reports_the_export(served):
    image, _backend, dev = served
    client = dev.client
    assert client.size == 8 << 20 == image.stat().st_size
    assert client.transmission_flags & TF_SEND_FLUSH
    assert 4096 <= client.max_payload <= 32 << 20
    assert client.export == "unit" and client.socket_path.endswith(".sock")


def test_our_writes_read_back_by_qemu_io_and_the_file(served):
    image, backend, dev = served
    dev.pwrite([b"\x5a" * 65536], 1 << 20)
    dev.flush()
    done = qemu_io(backend.socket_for(image), f"read -P 0x5a {1 << 20} 64k")
    assert done.returncode == 0 and "Pattern verification failed" not in done.stdout, (
        done.stdout + done.stderr
    )
    with open(image, "rb") as f:
        f.seek(1 << 20)
        assert f.read(65536) == b"\x5a" * 65536


def test_qemu_io_writes_read_back_by_us(served):
    image, backend, dev = served
    done = qemu_io(backend.socket_for(image), "write -P 0xc3 12288 8k")
    assert done.returncode == 0, done.stderr
    assert dev.pread(8192, 12288) == b"\xc3" * 8192
    assert dev.pread(10, 12288 - 10) == bytes(10)


def test_large_requests_are_split(served):
    _image, _backend, dev = served
    dev.client.max_payload = 64 << 10  # force several requests per call
    data = os.urandom(300_000)
    dev.pwrite([data[:1000], data[1000:]], 4096)
    buf = bytearray(len(data))
    dev.preadinto(memoryview(buf), 4096)
    assert bytes(buf) == data


def test_any_buffer_in_and_out(served):
    _image, _backend, dev = served
    client = dev.client
    data = os.urandom(8 * 1024)
    parts = [
        data[:5],
        bytearray(data[5:100]),
        memoryview(data)[100:1000],
        np.frombuffer(data[1000:], np.uint8),
    ]
    client.write(parts, 0)
    assert client.read(len(data), 0) == data
    words = array.array("Q", bytes(8192))
    client.readinto(words, 0)
    assert words.tobytes() == data[:8192]
    grid = np.zeros((4, 16), dtype=np.uint16)
    client.readinto(grid, 16)
    assert grid.tobytes() == data[16 : 16 + 128]
    window = bytearray(64)
    client.readinto(memoryview(window)[8:24], 40)
    assert window[8:24] == data[40:56] and window[:8] == bytes(8)
    client.readinto(bytearray(), 0)
    assert client.read(0, client.size) == b""
    client.write_zeroes(10, 20)
    assert client.read(40, 0) == data[:10] + bytes(20) + data[30:40]


def test_server_errors_arrive_as_oserror_and_the_session_survives(served):
    _image, _backend, dev = served
    with pytest.raises(OSError) as err:
        dev.client.read(4096, dev.client.size)  # beyond the export
    assert err.value.errno == errno.EINVAL
    assert f"READ of 4096 bytes at offset {dev.client.size} failed" in str(err.value)
    assert dev.pread(4, 0) == bytes(4)  # replies stay in step
    with pytest.raises(OSError) as err:
        dev.pwrite([b"x"], dev.client.size)
    assert err.value.errno == errno.ENOSPC


def test_unknown_export_is_refused(served):
    image, backend, _dev = served
    with pytest.raises(OSError, match="refused") as err:
        NbdClient(str(backend.socket_for(image)), export="nope")
    assert err.value.errno == errno.ENOENT


def test_closed_clients_refuse_calls(served):
    image, backend, _dev = served
    client = NbdClient(backend.socket_for(image))  # a path-like is accepted
    assert client.read(3, 0) == bytes(3)
    client.close()
    client.close()
    with pytest.raises(OSError, match="is closed") as err:
        client.read(3, 0)
    assert err.value.errno == errno.ENOTCONN


def test_a_missing_socket(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cannot connect to NBD server at .*nope\.sock"):
        NbdClient(str(tmp_path / "nope.sock"))


@needs_qemu_nbd
def test_a_server_that_goes_away_gives_typed_errors(tmp_path):
    backend = NbdBackend(capacity=8 << 20)
    store = UnitStore(tmp_path / "units", backend)
    try:
        unit = store.create(new_vm_id())
        unit.write("disk0", 0, b"before")
        unit.flush()
        backend.stop_server(unit.image_path)
        with pytest.raises(StorageError) as err:
            unit.write("disk0", 0, b"after")
            unit.flush()
        assert err.value.unit == unit.vm_id
    finally:
        store.close()
    again = UnitStore(tmp_path / "units", NbdBackend(capacity=8 << 20))
    try:
        assert again.get(unit.vm_id).read("disk0", 0, 6) == b"before"
    finally:
        again.close()


@needs_qemu_nbd
def test_servers_are_shared_between_stores_and_stopped_on_close(tmp_path):
    runtime = Path(tempfile.mkdtemp(prefix="vmknbd-"))
    a = UnitStore(tmp_path / "units", NbdBackend(runtime, capacity=8 << 20))
    vm = new_vm_id()
    a.create(vm).write("disk0", 0, b"shared")
    a.get(vm).flush()
    b = UnitStore(tmp_path / "units", NbdBackend(runtime, capacity=8 << 20))
    assert b.get(vm).read("disk0", 0, 6) == b"shared"  # through the first store's server
    assert len(list(runtime.glob("*.sock"))) == 1
    b.close()
    a.close()
    assert list(runtime.glob("*.sock")) == [] and list(runtime.glob("*.pid")) == []
    shutil.rmtree(runtime)


# ------------------------------------------------------- argument checking


def bad_calls(client):
    return {
        "parts is one buffer": lambda: client.write(b"abc", 0),
        "parts not iterable": lambda: client.write(5, 0),
        "a part is not a buffer": lambda: client.write([b"ok", "text"], 0),
        "a part is not contiguous": lambda: client.write([memoryview(b"abcdef")[::2]], 0),
        "read-only target": lambda: client.readinto(b"abc", 0),
        "strided target": lambda: client.readinto(memoryview(bytearray(8))[::2], 0),
        "target not a buffer": lambda: client.readinto([0, 0], 0),
        "negative offset": lambda: client.read(1, -1),
        "float length": lambda: client.read(1.5, 0),
        "offset past 2**64": lambda: client.write_zeroes(2**64, 0),
        "range past 2**64": lambda: client.readinto(bytearray(2), 2**64 - 1),
        "zeroes past 2**64": lambda: client.write_zeroes(2**63, 2**63 + 1),
        "max_payload too small": lambda: setattr(client, "max_payload", 4095),
        "max_payload too large": lambda: setattr(client, "max_payload", (32 << 20) + 1),
        "max_payload not an int": lambda: setattr(client, "max_payload", "big"),
    }


def bad_connects(impl, path):
    return {
        "export not a str": lambda: impl.NbdClient(path, export=b"unit"),
        "export too long": lambda: impl.NbdClient(path, export="x" * 4097),
        "export not encodable": lambda: impl.NbdClient(path, export="\udcff"),
        "timeout zero": lambda: impl.NbdClient(path, timeout=0),
        "timeout nan": lambda: impl.NbdClient(path, timeout=float("nan")),
        "timeout a str": lambda: impl.NbdClient(path, timeout="5"),
        "path not a path": lambda: impl.NbdClient(5),
        "path with NUL": lambda: impl.NbdClient("a\0b"),
        "path too long": lambda: impl.NbdClient("/tmp/" + "x" * 200),
    }


def outcome(call):
    try:
        call()
    except (InvalidArgument, OSError) as exc:
        return type(exc), getattr(exc, "errno", None), str(exc)
    return None


def test_bad_arguments_are_refused_before_anything_is_sent(served, impl):
    image, backend, dev = served
    for name, call in bad_calls(dev.client).items():
        got = outcome(call)
        assert got is not None, name
        assert got[0] in (InvalidArgument, BufferLayoutError), (name, got)
    for name, call in bad_connects(impl, str(backend.socket_for(image))).items():
        got = outcome(call)
        assert got is not None, name
        if name == "path too long":
            assert got[1] == errno.EINVAL, got
        else:
            assert got[0] is InvalidArgument, (name, got)
    assert dev.pread(4, 0) == bytes(4)  # nothing reached the server


def test_both_clients_refuse_bad_arguments_alike(impl):
    import vmkernel.fast
    import vmkernel.reference

    fake = FakeNbd()
    try:
        clients = [m.NbdClient(fake.path) for m in (vmkernel.fast, vmkernel.reference)]
        calls = [bad_calls(c) for c in clients]
        connects = [bad_connects(m, fake.path) for m in (vmkernel.fast, vmkernel.reference)]
        for fast_calls, ref_calls in ((calls[0], calls[1]), (connects[0], connects[1])):
            for name in fast_calls:
                got = outcome(fast_calls[name])
                assert got is not None and got == outcome(ref_calls[name]), name
        for c in clients:
            c.close()
    finally:
        fake.stop()


# ------------------------------------------------------- a scripted server


class FakeNbd:
    """A small NBD server on a unix socket (a thread per connection): serves an in-memory disk,
    records every request, and misbehaves when told to."""

    def __init__(
        self,
        size: int = 1 << 20,
        flags: int = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_WRITE_ZEROES,
        max_block: int = 32 << 20,
    ) -> None:
        self.disk = bytearray(size)
        self.flags = flags
        self.max_block = max_block
        self.requests: list[tuple[int, int, int]] = []
        self.misbehave: str | None = None  # "stall" or "bad-handle" for the next request
        self.path = tempfile.mktemp(prefix="vmkfake-", suffix=".sock", dir="/tmp")
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(self.path)
        self._srv.listen(4)
        self._sessions: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._srv.shutdown(socket.SHUT_RDWR)
        self._srv.close()
        self._thread.join(10)
        for session in self._sessions:
            session.join(10)
        os.unlink(self.path)
        assert not any(t.is_alive() for t in [self._thread, *self._sessions])

    @staticmethod
    def _exact(conn: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            got = conn.recv(n - len(buf))
            if not got:
                raise EOFError
            buf += got
        return bytes(buf)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._srv.accept()
            except OSError:
                return
            session = threading.Thread(target=self._run_session, args=(conn,), daemon=True)
            self._sessions.append(session)
            session.start()

    def _run_session(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(20)
            with contextlib.suppress(EOFError, OSError):
                self._session(conn)

    def _session(self, conn: socket.socket) -> None:
        def opt_reply(rtype: int, payload: bytes) -> bytes:
            return struct.pack(">QIII", REPLY_MAGIC, OPT_GO, rtype, len(payload)) + payload

        conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE))
        self._exact(conn, 4)
        _magic, option, length = struct.unpack(">QII", self._exact(conn, 16))
        assert option == OPT_GO
        self._exact(conn, length)
        conn.sendall(
            opt_reply(REP_INFO, struct.pack(">HQH", INFO_EXPORT, len(self.disk), self.flags))
            + opt_reply(REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, self.max_block))
            + opt_reply(REP_ACK, b"")
        )
        while True:
            _magic, _flags, cmd, handle, offset, length = struct.unpack(">IHHQQI", self._exact(conn, 28))
            if cmd == CMD_DISC:
                return
            self.requests.append((cmd, offset, length))
            payload = self._exact(conn, length) if cmd == CMD_WRITE else b""
            if self.misbehave == "stall":
                while conn.recv(65536):  # until the client gives up and hangs up
                    pass
                return
            if self.misbehave == "bad-handle":
                handle += 1
            if offset + length > len(self.disk):
                conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, errno.EINVAL, handle))
                continue
            if cmd == CMD_WRITE:
                self.disk[offset : offset + length] = payload
            elif cmd == CMD_WRITE_ZEROES:
                self.disk[offset : offset + length] = bytes(length)
            reply = struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, handle)
            if cmd == CMD_READ:
                reply += self.disk[offset : offset + length]
            conn.sendall(reply)


@pytest.fixture
def fake():
    server = FakeNbd()
    yield server
    server.stop()


def test_requests_are_split_at_the_advertised_block_size(impl):
    fake = FakeNbd(max_block=1)  # below the client's floor of 4096
    try:
        client = impl.NbdClient(fake.path)
        assert client.max_payload == 4096
        data = os.urandom(10_000)
        client.write([data[:3], data[3:]], 100)
        assert client.read(10_000, 100) == data
        assert fake.requests == [
            (CMD_WRITE, 100, 4096),
            (CMD_WRITE, 4196, 4096),
            (CMD_WRITE, 8292, 1808),
            (CMD_READ, 100, 4096),
            (CMD_READ, 4196, 4096),
            (CMD_READ, 8292, 1808),
        ]
        client.close()
    finally:
        fake.stop()


def test_zeroes_without_write_zeroes_are_written_and_flush_needs_its_flag(impl):
    fake = FakeNbd(flags=TF_HAS_FLAGS, max_block=8192)
    try:
        client = impl.NbdClient(fake.path)
        fake.disk[:] = b"\xff" * len(fake.disk)
        client.write_zeroes(1000, 20_000)
        assert fake.requests == [(CMD_WRITE, 1000, 8192), (CMD_WRITE, 9192, 8192), (CMD_WRITE, 17384, 3616)]
        assert fake.disk[1000:21000] == bytes(20_000) and fake.disk[999] == fake.disk[21000] == 0xFF
        with pytest.raises(OSError, match="does not support FLUSH") as err:
            client.flush()
        assert err.value.errno == errno.ENOTSUP
        assert client.read(1, 0) == b"\xff"  # the session goes on
        client.close()
    finally:
        fake.stop()


def test_write_zeroes_and_flush_reach_the_server(impl, fake):
    client = impl.NbdClient(fake.path)
    client.write_zeroes(4096, 65536)
    client.flush()
    client.write([], 0)  # nothing to send
    client.write_zeroes(0, 0)
    assert fake.requests == [(CMD_WRITE_ZEROES, 4096, 65536), (CMD_FLUSH, 0, 0)]
    client.close()


def test_a_stalled_server_times_out_and_the_connection_is_dropped(impl, fake):
    client = impl.NbdClient(fake.path, timeout=0.3)
    fake.misbehave = "stall"
    with pytest.raises(TimeoutError, match=r"stalled for 0.3 s \(the timeout\)") as err:
        client.read(10, 0)
    assert err.value.errno == errno.ETIMEDOUT
    with pytest.raises(OSError, match=r"dropped after an error \(errno 110\)") as err:
        client.read(10, 0)
    assert err.value.errno == errno.ENOTCONN
    client.close()


def test_a_reply_out_of_step_is_a_protocol_error(impl, fake):
    client = impl.NbdClient(fake.path)
    assert client.read(4, 0) == bytes(4)
    fake.misbehave = "bad-handle"
    with pytest.raises(NbdProtocolError, match="handle 3, expected handle 2") as err:
        client.read(4, 0)
    assert err.value.errno == errno.EPROTO
    assert isinstance(err.value, vmkernel.errors.VmkError)
    with pytest.raises(OSError) as again:
        client.flush()
    assert again.value.errno == errno.ENOTCONN
    client.close()


def test_a_server_that_does_not_speak_nbd(impl):
    path = tempfile.mktemp(prefix="vmkbad-", suffix=".sock", dir="/tmp")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def answer() -> None:
        conn, _ = srv.accept()
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n" + bytes(40))
        conn.close()

    t = threading.Thread(target=answer)
    t.start()
    try:
        with pytest.raises(NbdProtocolError, match="greeting 0x5353482d322e302d"):
            impl.NbdClient(path, timeout=5)
    finally:
        t.join(5)
        srv.close()
        os.unlink(path)


def test_threads_sharing_a_client_take_turns(impl, fake):
    if impl.__name__ == "vmkernel.reference":
        pytest.skip("the reference client is not thread-safe; the Rust one serialises calls")
    client = impl.NbdClient(fake.path)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            block = bytes([k]) * 4096
            for i in range(50):
                client.write([block], (k * 50 + i) * 4096 % (1 << 20))
                assert client.read(4096, (k * 50 + i) * 4096 % (1 << 20)) == block
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    client.close()
