"""Differential tests: the Rust JournalChain against the pure-Python reference."""

from __future__ import annotations

import array
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

import vmkernel.fast
import vmkernel.reference
from vmkernel.errors import VmkError

genesis_st = st.binary(min_size=32, max_size=32)
lines_st = st.lists(st.binary(max_size=300), max_size=40)


def _layout(lines: list[bytes]) -> tuple[bytes, array.array[int], array.array[int]]:
    offsets = array.array("Q")
    lengths = array.array("Q")
    position = 0
    for line in lines:
        offsets.append(position)
        lengths.append(len(line))
        position += len(line)
    return b"".join(lines), offsets, lengths


def _outcome(call: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        return ("ok", call())
    except VmkError as exc:
        return (type(exc), str(exc))


@settings(deadline=None)
@given(genesis=genesis_st, lines=lines_st, data=st.data())
def test_random_lines_and_batch_splits_agree(genesis: bytes, lines: list[bytes], data: st.DataObject) -> None:
    fast = vmkernel.fast.JournalChain(genesis)
    reference = vmkernel.reference.JournalChain(genesis)
    empty = array.array("Q")
    position = 0
    while position < len(lines):
        if data.draw(st.booleans(), label="empty batch first"):
            assert fast.update_batch(b"", empty, empty) == reference.update_batch(b"", empty, empty)
        size = data.draw(st.integers(min_value=1, max_value=len(lines) - position), label="batch size")
        chunk = lines[position : position + size]
        if size == 1 and data.draw(st.booleans(), label="scalar update"):
            assert fast.update(chunk[0]) == reference.update(chunk[0])
        else:
            assert fast.update_batch(*_layout(chunk)) == reference.update_batch(*_layout(chunk))
        position += size
        assert (fast.head, fast.count) == (reference.head, reference.count)
    assert repr(fast) == repr(reference)


@settings(deadline=None)
@given(
    genesis=genesis_st,
    buffer=st.binary(max_size=64),
    spans=st.lists(
        st.tuples(
            st.one_of(st.integers(0, 80), st.integers(2**64 - 80, 2**64 - 1)),
            st.one_of(st.integers(0, 80), st.integers(2**64 - 80, 2**64 - 1)),
        ),
        max_size=8,
    ),
    extra_lengths=st.lists(st.integers(0, 8), max_size=2),
)
def test_arbitrary_spans_agree_including_errors(
    genesis: bytes, buffer: bytes, spans: list[tuple[int, int]], extra_lengths: list[int]
) -> None:
    offsets = array.array("Q", [offset for offset, _ in spans])
    lengths = array.array("Q", [length for _, length in spans] + extra_lengths)
    fast = vmkernel.fast.JournalChain(genesis)
    reference = vmkernel.reference.JournalChain(genesis)
    assert _outcome(lambda: fast.update_batch(buffer, offsets, lengths)) == _outcome(
        lambda: reference.update_batch(buffer, offsets, lengths)
    )
    assert (fast.head, fast.count) == (reference.head, reference.count)
