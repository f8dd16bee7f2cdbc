"""The NBD clients against a hostile server: any byte stream gives an ``OSError`` (never a hang, an
over-allocation or another exception) or a correct session, and the Rust client and the reference
agree on every stream: same results, same exception classes, errnos and messages, call by call.

The server is a thread on a unix socket that sends a greeting, option replies and transmission
replies (valid, then mutated at random) and hangs up its sending side.  Each client runs the same
session: handshake, READ, WRITE, WRITE_ZEROES, FLUSH, and a READ after the last reply, which must
fail; a call after a failure shows whether the connection was dropped."""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import threading
from types import ModuleType

from hypothesis import event, given, settings
from hypothesis import strategies as st

import vmkernel.fast
import vmkernel.reference
from vmkernel.reference.nbd import (
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
from vmkernel.testing.profiles import scaled

READ_LEN = 512
WRITE_LEN = 100
ZEROES_LEN = 4096


def option_reply(rtype: int, payload: bytes, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return struct.pack(">QIII", REPLY_MAGIC, OPT_GO, rtype, size) + payload


def simple_reply(handle: int, error: int = 0) -> bytes:
    return struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, handle)


def valid_script(size: int, data: bytes) -> list[bytes]:
    """What qemu-nbd would send: greeting, info replies, ack, then the replies of the session."""
    flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_WRITE_ZEROES
    return [
        struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE),
        option_reply(REP_INFO, struct.pack(">HQH", INFO_EXPORT, size, flags)),
        option_reply(REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, 4096, 32 << 20)),
        option_reply(REP_ACK, b""),
        simple_reply(1) + data,  # READ
        simple_reply(2),  # WRITE
        simple_reply(3),  # WRITE_ZEROES
        simple_reply(4),  # FLUSH
    ]


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 7)),
    st.tuples(st.just("cut"), st.integers(0, 10_000)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("huge_length"), st.integers(1, 3)),
    st.tuples(st.just("short_info"), st.integers(1, 2), st.integers(0, 11)),
    st.tuples(st.just("error_reply"), st.integers(4, 7), st.integers(1, 2**32 - 1)),
    st.tuples(st.just("drop_part"), st.integers(1, 7)),
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
        elif m[0] == "error_reply":
            handle = m[1] - 3
            parts[m[1]] = simple_reply(handle, m[2])  # an error reply carries no data
        elif m[0] == "drop_part":
            parts[m[1]] = b""
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


def serve_once(path: str, stream: bytes) -> tuple[threading.Thread, socket.socket]:
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
    return t, srv


Outcome = tuple[object, ...]


def attempt(call) -> Outcome:
    try:
        return ("ok", call())
    except OSError as exc:
        return ("error", type(exc).__name__, exc.errno, str(exc))


def session(impl: ModuleType, path: str, stream: bytes) -> list[Outcome]:
    """Runs the session of one client against ``stream``; one outcome per call."""
    t, srv = serve_once(path, stream)
    try:
        try:
            client = impl.NbdClient(path, timeout=5)
        except OSError as exc:
            return [("error", type(exc).__name__, exc.errno, str(exc))]
        try:
            assert client.size >= 0 and 4096 <= client.max_payload <= 32 << 20
            outcomes: list[Outcome] = [("ok", (client.size, client.transmission_flags, client.max_payload))]
            outcomes.append(attempt(lambda: client.read(READ_LEN, 0)))
            outcomes.append(attempt(lambda: client.write([bytes(range(WRITE_LEN))], 7)))
            outcomes.append(attempt(lambda: client.write_zeroes(4096, ZEROES_LEN)))
            outcomes.append(attempt(client.flush))
            outcomes.append(attempt(lambda: client.read(1, 0)))  # no reply left for this one
            for outcome in outcomes[1:]:
                assert outcome[0] == "ok" or isinstance(outcome[2], int), outcome
            read = outcomes[1]
            if read[0] == "ok":
                assert isinstance(read[1], bytes) and len(read[1]) == READ_LEN
            assert outcomes[-1][0] == "error"
            return outcomes
        finally:
            client.close()
    finally:
        srv.close()
        t.join(10)
        assert not t.is_alive()
        os.unlink(path)


@settings(max_examples=scaled(300), deadline=None)
@given(
    mutations=st.lists(mutation, max_size=3),
    size=st.integers(0, 1 << 40),
    data=st.binary(min_size=READ_LEN, max_size=READ_LEN),
)
def test_any_server_stream_gives_oserror_or_a_correct_session_and_both_clients_agree(mutations, size, data):
    stream = mutate(valid_script(size, data), mutations)
    path = tempfile.mktemp(prefix="vmkhostile-", suffix=".sock", dir="/tmp")
    fast = session(vmkernel.fast, path, stream)
    reference = session(vmkernel.reference, path, stream)
    assert fast == reference
    failed = next((i for i, o in enumerate(fast) if o[0] == "error"), None)
    event(f"first failure at call {failed}: {fast[failed][1]}" if failed is not None else "no failure")
    if not mutations:
        assert fast[1] == ("ok", data)
        assert [o[0] for o in fast[2:5]] == ["ok", "ok", "ok"]
