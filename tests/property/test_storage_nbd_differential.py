"""The Rust NBD client and the reference against one real qemu-nbd export: random reads, writes,
zeroes, flushes and split sizes, issued through either client, must leave both clients reading
identical bytes, equal to a model and to the image file; reads past the end fail alike."""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmk_storage.nbd import NbdServer, qemu_nbd_path
from vmk_storage.testing import NBD_MISSING

import vmkernel.fast
import vmkernel.reference
from vmkernel.testing.profiles import scaled

pytestmark = pytest.mark.skipif(qemu_nbd_path() is None, reason=NBD_MISSING)

SIZE = 1 << 20
PAYLOADS = (4096, 5000, 65536, 32 << 20)


@pytest.fixture(scope="module")
def export() -> Iterator[tuple[str, Path]]:
    runtime = Path(tempfile.mkdtemp(prefix="vmknbdd-"))
    image = runtime / "img.raw"
    image.write_bytes(bytes(SIZE))
    server = NbdServer(image, runtime / "d.sock")
    server.start()
    try:
        yield str(server.socket_path), image
    finally:
        server.stop()
        shutil.rmtree(runtime, ignore_errors=True)


who = st.sampled_from(["fast", "reference"])
span = st.tuples(st.integers(0, SIZE), st.integers(0, 200_000))
op = st.one_of(
    st.tuples(st.just("write"), who, span, st.integers(0, 2**32)),
    st.tuples(st.just("zeroes"), who, span),
    st.tuples(st.just("flush"), who),
    st.tuples(st.just("read"), span),
    st.tuples(st.just("readinto"), span),
    st.tuples(st.just("max_payload"), who, st.sampled_from(PAYLOADS)),
    st.tuples(st.just("past_end"), st.integers(1, 100_000), st.integers(1, 10_000)),
)


def in_range(offset: int, length: int) -> tuple[int, int]:
    offset = min(offset, SIZE)
    return offset, min(length, SIZE - offset)


def failure(call: Callable[[], bytes]) -> tuple[str, int | None, str]:
    try:
        call()
    except OSError as exc:
        return type(exc).__name__, exc.errno, str(exc)
    raise AssertionError("a read past the end of the export succeeded")


@settings(max_examples=scaled(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=25))
def test_both_clients_see_identical_bytes(export, ops):
    path, image = export
    clients = {"fast": vmkernel.fast.NbdClient(path), "reference": vmkernel.reference.NbdClient(path)}
    try:
        fast, ref = clients["fast"], clients["reference"]
        fast.write_zeroes(0, SIZE)
        model = bytearray(SIZE)
        for o in ops:
            kind = o[0]
            if kind == "write":
                offset, length = in_range(*o[2])
                data = random.Random(o[3]).randbytes(length)
                clients[o[1]].write([data[: length // 3], memoryview(data)[length // 3 :]], offset)
                model[offset : offset + length] = data
            elif kind == "zeroes":
                offset, length = in_range(*o[2])
                clients[o[1]].write_zeroes(offset, length)
                model[offset : offset + length] = bytes(length)
            elif kind == "flush":
                clients[o[1]].flush()
            elif kind == "read":
                offset, length = in_range(*o[1])
                want = bytes(model[offset : offset + length])
                assert fast.read(length, offset) == want == ref.read(length, offset)
            elif kind == "readinto":
                offset, length = in_range(*o[1])
                bufs = [bytearray(length), bytearray(length)]
                fast.readinto(bufs[0], offset)
                ref.readinto(memoryview(bufs[1]), offset)
                assert bufs[0] == bufs[1] == model[offset : offset + length]
            elif kind == "max_payload":
                clients[o[1]].max_payload = o[2]
            elif kind == "past_end":
                offset, length = SIZE - o[1], o[1] + o[2]
                got = failure(lambda: fast.read(length, offset))  # noqa: B023 - called right here
                # The messages name the failing request, which depends on each client's split size.
                assert got[:2] == failure(lambda: ref.read(length, offset))[:2]  # noqa: B023
                assert got[1] is not None and got[1] > 0
        fast.flush()
        assert fast.read(SIZE, 0) == model == ref.read(SIZE, 0)
        assert image.read_bytes() == model  # qemu-nbd writes through to the file before it answers
    finally:
        for client in clients.values():
            client.close()
