"""JournalChain: the same suite against the Rust fast path and the Python reference."""

from __future__ import annotations

import array
import hashlib
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import vmkernel.fast
import vmkernel.reference
from vmkernel.errors import BufferLayoutError, InvalidArgument, VmkError

IMPLEMENTATIONS = [vmkernel.fast, vmkernel.reference]


@pytest.fixture(params=IMPLEMENTATIONS, ids=["fast", "reference"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    module: ModuleType = request.param
    return module


def expected_step(head: bytes, line: bytes) -> bytes:
    """The chain rule, written out independently of both implementations."""
    return hashlib.sha256(head + len(line).to_bytes(8, "little") + line).digest()


def split(lines: list[bytes]) -> tuple[bytes, array.array[int], array.array[int]]:
    offsets = array.array("Q")
    lengths = array.array("Q")
    position = 0
    for line in lines:
        offsets.append(position)
        lengths.append(len(line))
        position += len(line)
    return b"".join(lines), offsets, lengths


LINES = [b"vm boot web-1", b"", b"migrate web-1 host-a -> host-b", b"\x00\xff" * 40, b"x"]


# --- construction and known vectors -------------------------------------------


def test_default_genesis_is_32_zero_bytes(impl: ModuleType) -> None:
    chain = impl.JournalChain()
    assert chain.head == bytes(32)
    assert chain.count == 0
    assert impl.JournalChain(None).head == bytes(32)


def test_known_vectors(impl: ModuleType) -> None:
    chain = impl.JournalChain()
    # sha256 of 40 zero bytes: zero head + u64 LE length 0.
    assert chain.update(b"").hex() == "2c34ce1df23b838c5abf2a7f6437cca3d3067ed509ff25f11df6b11b582b51eb"
    genesis = bytes(range(32))
    chain = impl.JournalChain(genesis)
    head = chain.update(b"hello")
    assert head == expected_step(genesis, b"hello")
    assert chain.head == head
    assert isinstance(head, bytes)
    assert len(head) == 32
    assert chain.count == 1


def test_update_follows_the_rule_over_a_sequence(impl: ModuleType) -> None:
    chain = impl.JournalChain(b"\x07" * 32)
    expected = b"\x07" * 32
    for line in LINES:
        expected = expected_step(expected, line)
        assert chain.update(line) == expected
    assert chain.count == len(LINES)


@pytest.mark.parametrize(
    "make",
    [
        bytes,
        bytearray,
        memoryview,
        lambda b: np.frombuffer(b, dtype=np.uint8),
        lambda b: array.array("B", b),
        lambda b: np.frombuffer(b, dtype=np.uint8).reshape(2, -1),
        lambda b: memoryview(b).cast("Q"),
    ],
    ids=["bytes", "bytearray", "memoryview", "numpy", "array", "numpy-2d", "memoryview-Q"],
)
def test_update_accepts_bytes_like(impl: ModuleType, make: Callable[[bytes], Any]) -> None:
    line = bytes(range(64))
    assert impl.JournalChain().update(make(line)) == expected_step(bytes(32), line)
    assert impl.JournalChain(make(bytes(range(32)))).head == bytes(range(32))


def test_large_line(impl: ModuleType) -> None:
    line = bytes(range(256)) * 1024
    assert impl.JournalChain().update(line) == expected_step(bytes(32), line)


# --- batches ---------------------------------------------------------------------


def test_batch_equals_sequence_of_scalar_updates(impl: ModuleType) -> None:
    scalar = impl.JournalChain(b"\x01" * 32)
    for line in LINES:
        scalar.update(line)
    batch = impl.JournalChain(b"\x01" * 32)
    assert batch.update_batch(*split(LINES)) == scalar.head
    assert batch.head == scalar.head
    assert batch.count == scalar.count == len(LINES)


def test_empty_batch_changes_nothing(impl: ModuleType) -> None:
    chain = impl.JournalChain()
    assert chain.update_batch(b"", array.array("Q"), array.array("Q")) == bytes(32)
    assert chain.count == 0


def test_overlapping_and_repeated_spans(impl: ModuleType) -> None:
    chain = impl.JournalChain()
    chain.update_batch(b"abc", array.array("Q", [0, 0, 1]), array.array("Q", [3, 3, 2]))
    expected = bytes(32)
    for line in (b"abc", b"abc", b"bc"):
        expected = expected_step(expected, line)
    assert chain.head == expected
    assert chain.count == 3


def _as_numpy(values: array.array[int]) -> Any:
    return np.array(values.tolist(), dtype=np.uint64)


def _unaligned(values: array.array[int]) -> Any:
    raw = b"\x00" + values.tobytes()
    return np.frombuffer(raw, dtype=np.uint64, offset=1)


@pytest.mark.parametrize(
    ("make_buffer", "make_index"),
    [
        (bytes, lambda a: a),
        (bytearray, _as_numpy),
        (memoryview, lambda a: memoryview(a.tobytes()).cast("Q")),
        (lambda b: np.frombuffer(b, dtype=np.uint8), _as_numpy),
        (lambda b: np.frombuffer(b, dtype=np.uint8), lambda a: memoryview(_as_numpy(a))),
        (bytes, _unaligned),
        (bytes, lambda a: np.array(a.tolist(), dtype="=u8")),
    ],
    ids=["array", "numpy", "memoryview-Q", "numpy-u8", "memoryview-of-numpy", "unaligned", "explicit-order"],
)
def test_batch_buffer_kinds(
    impl: ModuleType, make_buffer: Callable[[bytes], Any], make_index: Callable[[array.array[int]], Any]
) -> None:
    buffer, offsets, lengths = split(LINES)
    expected = impl.JournalChain()
    for line in LINES:
        expected.update(line)
    chain = impl.JournalChain()
    assert chain.update_batch(make_buffer(buffer), make_index(offsets), make_index(lengths)) == expected.head


def test_copy_is_independent(impl: ModuleType) -> None:
    chain = impl.JournalChain()
    chain.update(b"a")
    twin = chain.copy()
    assert type(twin) is type(chain)
    assert (twin.head, twin.count) == (chain.head, chain.count)
    twin.update(b"b")
    assert chain.count == 1
    assert twin.count == 2
    assert twin.head != chain.head


def test_repr(impl: ModuleType) -> None:
    chain = impl.JournalChain()
    chain.update(b"a")
    assert repr(chain) == f"<JournalChain count=1 head={chain.head.hex()}>"


def test_readers_during_batch_in_another_thread(impl: ModuleType) -> None:
    lines = [bytes([i % 251]) * (i % 300) for i in range(20_000)]
    chain = impl.JournalChain()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            chain.update_batch(*split(lines))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    while worker.is_alive():
        assert chain.count in (0, len(lines))
        assert len(chain.head) == 32
    worker.join()
    assert errors == []
    assert chain.count == len(lines)


# --- bad input: typed errors, all-or-nothing ------------------------------------


def q(*values: int) -> array.array[int]:
    return array.array("Q", values)


# (id, arguments of update_batch, error class, thing, value, expected-substring)
BAD_BATCHES: list[tuple[str, tuple[Any, ...], type[InvalidArgument], str, Any, str]] = [
    ("mismatched", (b"abcdef", q(0, 1), q(1)), BufferLayoutError, "len(lengths)", 1, "2 (len(offsets))"),
    (
        "out-of-bounds",
        (b"abcdef", q(0, 2, 4), q(2, 2, 3)),
        BufferLayoutError,
        "offsets[2] + lengths[2]",
        7,
        "at most 6 (len(buffer))",
    ),
    (
        "overflow",
        (b"abc", q(0, 2**64 - 1), q(1, 1)),
        BufferLayoutError,
        "offsets[1] + lengths[1]",
        2**64,
        "below 2**64",
    ),
    (
        "offsets-itemsize-4",
        (b"abc", array.array("I", [0]), q(1)),
        BufferLayoutError,
        "offsets.itemsize",
        4,
        "8 (",
    ),
    (
        "lengths-float64",
        (b"abc", q(0), np.array([1.0])),
        BufferLayoutError,
        "lengths.format",
        "d",
        "'Q'",
    ),
    (
        "offsets-signed",
        (b"abc", np.array([0], dtype=np.int64), q(1)),
        BufferLayoutError,
        "offsets.format",
        "l",
        "'Q'",
    ),
    (
        "offsets-big-endian",
        (b"abc", np.array([0], dtype=">u8"), q(1)),
        BufferLayoutError,
        "offsets.format",
        ">Q",
        "'Q'",
    ),
    (
        "offsets-2d",
        (b"abc", np.zeros((1, 1), dtype=np.uint64), q(1)),
        BufferLayoutError,
        "offsets.ndim",
        2,
        "1",
    ),
    (
        "lengths-strided",
        (b"abc", q(0, 0), np.zeros(4, dtype=np.uint64)[::2]),
        BufferLayoutError,
        "lengths.c_contiguous",
        False,
        "True",
    ),
    (
        "buffer-strided",
        (np.zeros(8, dtype=np.uint8)[::2], q(0), q(1)),
        BufferLayoutError,
        "buffer.c_contiguous",
        False,
        "True",
    ),
    ("buffer-str", ("abc", q(0), q(1)), InvalidArgument, "buffer", "abc", "bytes-like"),
    ("offsets-list", (b"abc", [0], q(1)), InvalidArgument, "offsets", [0], "unsigned 64-bit"),
    ("lengths-none", (b"abc", q(0), None), InvalidArgument, "lengths", None, "unsigned 64-bit"),
]


def _check(exc: InvalidArgument, error: type[InvalidArgument], thing: str, value: Any, expected: str) -> None:
    assert type(exc) is error
    assert exc.thing == thing
    assert exc.value == value
    assert expected in exc.expected
    assert thing in str(exc)


@pytest.mark.parametrize(
    ("args", "error", "thing", "value", "expected"),
    [case[1:] for case in BAD_BATCHES],
    ids=[case[0] for case in BAD_BATCHES],
)
def test_bad_batch_raises_typed_error_and_changes_nothing(
    impl: ModuleType,
    args: tuple[Any, ...],
    error: type[InvalidArgument],
    thing: str,
    value: Any,
    expected: str,
) -> None:
    chain = impl.JournalChain()
    chain.update(b"before")
    head, count = chain.head, chain.count
    with pytest.raises(error) as info:
        chain.update_batch(*args)
    _check(info.value, error, thing, value, expected)
    assert isinstance(info.value, ValueError)
    assert (chain.head, chain.count) == (head, count)


@pytest.mark.parametrize("size", [0, 31, 33])
def test_wrong_genesis_length(impl: ModuleType, size: int) -> None:
    with pytest.raises(InvalidArgument) as info:
        impl.JournalChain(bytes(size))
    _check(info.value, InvalidArgument, "genesis", size, "32 bytes")


def test_non_buffer_genesis_and_line(impl: ModuleType) -> None:
    with pytest.raises(InvalidArgument) as info:
        impl.JournalChain("0" * 32)
    _check(info.value, InvalidArgument, "genesis", "0" * 32, "bytes-like")
    chain = impl.JournalChain()
    with pytest.raises(InvalidArgument) as info:
        chain.update("text")
    _check(info.value, InvalidArgument, "line", "text", "bytes-like")
    with pytest.raises(BufferLayoutError) as layout:
        chain.update(memoryview(b"abcd")[::2])
    _check(layout.value, BufferLayoutError, "line.c_contiguous", False, "True")
    assert (chain.head, chain.count) == (bytes(32), 0)


def _outcome(call: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        return ("ok", call())
    except VmkError as exc:
        return (type(exc), str(exc))


@pytest.mark.parametrize("case", BAD_BATCHES, ids=[case[0] for case in BAD_BATCHES])
def test_both_implementations_raise_the_same_message(case: tuple[Any, ...]) -> None:
    args = case[1]
    fast = _outcome(lambda: vmkernel.fast.JournalChain().update_batch(*args))
    reference = _outcome(lambda: vmkernel.reference.JournalChain().update_batch(*args))
    assert fast == reference
