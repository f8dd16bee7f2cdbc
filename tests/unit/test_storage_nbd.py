"""The NBD client against a real qemu-nbd, cross-checked with qemu-io (an independent client)."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from vmk_storage import NbdBackend, NbdClient, UnitStore
from vmk_storage.nbd import TF_SEND_FLUSH, NbdProtocolError, qemu_nbd_path
from vmk_storage.testing import NBD_MISSING, new_vm_id

from vmkernel.errors import StorageError

pytestmark = pytest.mark.skipif(qemu_nbd_path() is None, reason=NBD_MISSING)


@pytest.fixture
def served(tmp_path):
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


def test_handshake_reports_the_export(served):
    image, _backend, dev = served
    client = dev.client
    assert client.size == 8 << 20 == image.stat().st_size
    assert client.transmission_flags & TF_SEND_FLUSH
    assert 4096 <= client.max_payload <= 32 << 20


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


def test_server_errors_arrive_as_oserror_and_the_session_survives(served):
    _image, _backend, dev = served
    with pytest.raises(OSError) as err:
        dev.client.read(4096, dev.client.size)  # beyond the export
    assert err.value.errno == errno.EINVAL
    assert dev.pread(4, 0) == bytes(4)  # replies stay in step
    with pytest.raises(OSError) as err:
        dev.pwrite([b"x"], dev.client.size)
    assert err.value.errno == errno.ENOSPC


def test_unknown_export_is_refused(served):
    image, backend, _dev = served
    with pytest.raises(OSError, match="refused"):
        NbdClient(str(backend.socket_for(image)), export="nope")


def test_a_server_that_does_not_speak_nbd(tmp_path):
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
        with pytest.raises(NbdProtocolError):
            NbdClient(path, timeout=5)
    finally:
        t.join(5)
        srv.close()
        os.unlink(path)


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
