"""The NBD client against a hostile server: any byte stream gives an ``OSError``, never a hang,
an over-allocation or another exception.  The server is a thread on a unix socket that
sends a greeting (valid or not), then option replies and transmission replies mutated at random."""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import threading

from hypothesis import given, settings
from hypothesis import strategies as st
from vmk_storage.nbd import (
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
    NbdClient,
)

from vmkernel.testing.profiles import scaled


def option_reply(rtype: int, payload: bytes, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return struct.pack(">QIII", REPLY_MAGIC, OPT_GO, rtype, size) + payload


def valid_script(size: int) -> list[bytes]:
    """What qemu-nbd would send: greeting, info replies, ack, then one read reply."""
    return [
        struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE),
        option_reply(REP_INFO, struct.pack(">HQH", INFO_EXPORT, size, TF_HAS_FLAGS | TF_SEND_FLUSH)),
        option_reply(REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, 32 << 20)),
        option_reply(REP_ACK, b""),
        struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, 0, 1) + bytes(512),
    ]


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 7)),
    st.tuples(st.just("cut"), st.integers(0, 10_000)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("huge_length"), st.integers(1, 2)),
    st.tuples(st.just("short_info"), st.integers(1, 2), st.integers(0, 11)),
)


def mutate(parts: list[bytes], mutations: list[tuple]) -> bytes:
    parts = list(parts)
    for m in mutations:
        if m[0] == "huge_length":
            parts[m[1]] = parts[m[1]][:16] + struct.pack(">I", 0xFFFFFFF0) + parts[m[1]][20:]
        elif m[0] == "short_info":
            head, body = parts[m[1]][:20], parts[m[1]][20:]
            body = body[: m[2]]
            parts[m[1]] = head[:16] + struct.pack(">I", len(body)) + body
    stream = bytearray(b"".join(parts))
    for m in mutations:
        if m[0] == "flip" and stream:
            stream[m[1] % len(stream)] ^= 1 << m[2]
        elif m[0] == "cut":
            del stream[m[1] % (len(stream) + 1) :]
        elif m[0] == "insert":
            at = m[1] % (len(stream) + 1)
            stream[at:at] = m[2]
    return bytes(stream)


def serve_once(stream: bytes) -> tuple[str, threading.Thread, socket.socket]:
    path = tempfile.mktemp(prefix="vmkhostile-", suffix=".sock", dir="/tmp")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def run() -> None:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            try:
                conn.sendall(stream)
                conn.shutdown(socket.SHUT_WR)  # then the client sees end of stream, not a stall
                while conn.recv(65536):
                    pass
            except OSError:
                pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return path, t, srv


@settings(max_examples=scaled(300), deadline=None)
@given(mutations=st.lists(mutation, max_size=3), size=st.integers(0, 1 << 40))
def test_any_server_stream_gives_oserror_or_a_correct_session(mutations, size):
    stream = mutate(valid_script(size), mutations)
    path, t, srv = serve_once(stream)
    try:
        try:
            client = NbdClient(path, timeout=5)
        except OSError:
            return
        try:
            assert client.size >= 0 and client.max_payload <= 32 << 20
            try:
                data = client.read(512, 0)
            except OSError:
                return
            assert len(data) == 512
        finally:
            client.close()
    finally:
        srv.close()
        t.join(10)
        assert not t.is_alive()
        os.unlink(path)
