"""Pure-Python reference model of the journal hash chain.

Convention: every fast path exists twice with the same names and identical
APIs, errors included: the Rust one in :mod:`vmkernel.fast` and this readable
model in :mod:`vmkernel.reference`.  The reference defines the behaviour; the
differential tests check that the Rust one matches it.

Rule: ``head' = sha256(head || len(line) as u64 little-endian || line)``.
Buffers are read through ``memoryview`` (no copy) and every rejection raises
the same ``vmkernel.errors`` class with the same ``thing``/``value``/``expected``
as the extension.
"""

from __future__ import annotations

import hashlib
import sys
from typing import TYPE_CHECKING

from vmkernel.errors import BufferLayoutError, InvalidArgument

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["JournalChain"]

_BYTES_LIKE = "a bytes-like object"
_U64_EXPECTED = "a buffer of unsigned 64-bit integers (array('Q'), numpy uint64, memoryview cast 'Q')"
_NATIVE_ORDER = "<" if sys.byteorder == "little" else ">"
# Native unsigned 64-bit formats (the item size is checked separately).
_U64_FORMATS = frozenset(
    {"Q", "L", "N", "@Q", "@L", "@N", "=Q", f"{_NATIVE_ORDER}Q"}
    | ({"!Q"} if sys.byteorder == "big" else set())
)
_EMPTY = memoryview(b"")


def _export(obj: object, thing: str, expected: str) -> memoryview:
    """A view of ``obj``; a non-buffer is ``InvalidArgument(thing, obj, expected)``."""
    try:
        return memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgument(thing, obj, expected) from None


def _bytes_of(view: memoryview, thing: str) -> memoryview:
    """The raw bytes of a C-contiguous view, as a flat ``'B'`` view (no copy)."""
    if not view.c_contiguous:
        raise BufferLayoutError(f"{thing}.c_contiguous", False, "True (a C-contiguous buffer)")
    if view.nbytes == 0:
        return _EMPTY
    return view.cast("B")


def _u64s_of(view: memoryview, thing: str) -> memoryview:
    """A 1-D native unsigned 64-bit view as a ``'Q'`` view (no copy)."""
    if view.ndim != 1:
        raise BufferLayoutError(f"{thing}.ndim", view.ndim, "1")
    if view.itemsize != 8:
        raise BufferLayoutError(f"{thing}.itemsize", view.itemsize, f"8 ({_U64_EXPECTED})")
    if view.format not in _U64_FORMATS:
        raise BufferLayoutError(f"{thing}.format", view.format, f"'Q' ({_U64_EXPECTED})")
    return _bytes_of(view, thing).cast("Q")


def _step(head: bytes, line: memoryview) -> bytes:
    hasher = hashlib.sha256(head)
    hasher.update(len(line).to_bytes(8, "little"))
    hasher.update(line)
    return hasher.digest()


class JournalChain:
    """Tamper-evident hash chain over journal lines:
    ``head' = sha256(head || u64-LE len(line) || line)``."""

    __slots__ = ("_count", "_head")

    def __init__(self, genesis: Buffer | None = None) -> None:
        """Starts a chain at ``genesis`` (32 bytes; ``None`` means 32 zero bytes)."""
        if genesis is None:
            head = bytes(32)
        else:
            data = _bytes_of(_export(genesis, "genesis", "a bytes-like object of 32 bytes"), "genesis")
            if len(data) != 32:
                raise InvalidArgument("genesis", len(data), "32 bytes")
            head = data.tobytes()
        self._head = head
        self._count = 0

    @property
    def head(self) -> bytes:
        """The current head (32 bytes)."""
        return self._head

    @property
    def count(self) -> int:
        """How many lines have been folded in."""
        return self._count

    def update(self, line: Buffer) -> bytes:
        """Folds one line (any bytes-like object) into the chain; returns the new head."""
        data = _bytes_of(_export(line, "line", _BYTES_LIKE), "line")
        self._head = _step(self._head, data)
        self._count += 1
        return self._head

    def update_batch(self, buffer: Buffer, offsets: Buffer, lengths: Buffer) -> bytes:
        """Folds ``buffer[offsets[i]:offsets[i] + lengths[i]]`` for each ``i``, in
        order; returns the new head.  All-or-nothing: on error nothing changes."""
        buffer_view = _export(buffer, "buffer", _BYTES_LIKE)
        offsets_view = _export(offsets, "offsets", _U64_EXPECTED)
        lengths_view = _export(lengths, "lengths", _U64_EXPECTED)
        data = _bytes_of(buffer_view, "buffer")
        starts = _u64s_of(offsets_view, "offsets")
        sizes = _u64s_of(lengths_view, "lengths")
        if len(starts) != len(sizes):
            raise BufferLayoutError("len(lengths)", len(sizes), f"{len(starts)} (len(offsets))")
        limit = len(data)
        for index, (start, size) in enumerate(zip(starts, sizes, strict=True)):
            end = start + size
            thing = f"offsets[{index}] + lengths[{index}]"
            if end >= 2**64:
                raise BufferLayoutError(thing, end, f"below 2**64 and at most {limit} (len(buffer))")
            if end > limit:
                raise BufferLayoutError(thing, end, f"at most {limit} (len(buffer))")
        head = self._head
        for start, size in zip(starts, sizes, strict=True):
            head = _step(head, data[start : start + size])
        self._head = head
        self._count += len(starts)
        return head

    def copy(self) -> JournalChain:
        """An independent chain with the same head and count."""
        twin = JournalChain(self._head)
        twin._count = self._count
        return twin

    def __repr__(self) -> str:
        return f"<JournalChain count={self._count} head={self._head.hex()}>"
