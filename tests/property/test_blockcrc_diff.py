"""Differential tests: the Rust per-block CRC-32C tables against the pure-Python reference."""

from __future__ import annotations

import array
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vmkernel.fast
import vmkernel.reference
from vmkernel.errors import BufferLayoutError, InvalidArgument, VmkError

IMPLS = [vmkernel.fast, vmkernel.reference]


def crc32c_bitwise(data: bytes) -> int:
    """CRC-32C by its definition (reflected polynomial 0x82F63B78), independent of both."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def _outcome(call: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        return ("ok", call())
    except VmkError as exc:
        return (type(exc), str(exc))


block_sizes = st.sampled_from([512, 1024, 4096])


@settings(deadline=None)
@given(block=block_sizes, blocks=st.lists(st.binary(min_size=0, max_size=64), max_size=6), data=st.data())
def test_tables_and_mismatches_agree(block: int, blocks: list[bytes], data: st.DataObject) -> None:
    raw = b"".join(b.ljust(block, b"\x5a") for b in blocks)
    table = vmkernel.fast.crc32c_blocks(raw, block)
    assert table == vmkernel.reference.crc32c_blocks(raw, block)
    assert len(table) == 4 * len(blocks)
    if raw and data.draw(st.booleans(), label="check the definition"):
        i = data.draw(st.integers(0, len(blocks) - 1), label="block")
        assert struct.unpack_from("<I", table, 4 * i)[0] == crc32c_bitwise(raw[i * block : (i + 1) * block])
    for impl in IMPLS:
        assert impl.crc32c_first_mismatch(raw, table, block) is None
    if raw:
        flip = data.draw(st.integers(0, 8 * len(raw) - 1), label="bit to flip")
        bad = bytearray(raw)
        bad[flip // 8] ^= 1 << (flip % 8)
        found = {impl.crc32c_first_mismatch(bad, table, block) for impl in IMPLS}
        assert found == {flip // 8 // block}  # CRC-32C catches every single-bit error


@settings(deadline=None)
@given(
    length=st.integers(0, 9000),
    block=st.one_of(block_sizes, st.integers(-5, 5000)),
    table_len=st.integers(0, 40),
)
def test_bad_arguments_agree(length: int, block: int, table_len: int) -> None:
    raw = bytes(length)
    assert _outcome(lambda: vmkernel.fast.crc32c_blocks(raw, block)) == _outcome(
        lambda: vmkernel.reference.crc32c_blocks(raw, block)
    )
    table = bytes(table_len)
    assert _outcome(lambda: vmkernel.fast.crc32c_first_mismatch(raw, table, block)) == _outcome(
        lambda: vmkernel.reference.crc32c_first_mismatch(raw, table, block)
    )


@pytest.mark.parametrize("impl", IMPLS, ids=["fast", "reference"])
def test_named_errors_and_buffer_kinds(impl: Any) -> None:
    with pytest.raises(InvalidArgument) as bad_size:
        impl.crc32c_blocks(bytes(4096), 1000)
    assert (bad_size.value.thing, bad_size.value.value) == ("block_size", 1000)
    with pytest.raises(BufferLayoutError) as partial:
        impl.crc32c_blocks(bytes(5000))
    assert (partial.value.thing, partial.value.value) == ("len(data)", 5000)
    with pytest.raises(BufferLayoutError) as short_table:
        impl.crc32c_first_mismatch(bytes(8192), bytes(4))
    assert (short_table.value.thing, short_table.value.value) == ("len(table)", 4)
    with pytest.raises(InvalidArgument):
        impl.crc32c_blocks("not bytes")  # type: ignore[arg-type]
    raw = bytes(range(256)) * 32
    want = impl.crc32c_blocks(raw)
    # Any C-contiguous buffer is read as its bytes.
    assert impl.crc32c_blocks(bytearray(raw)) == want
    assert impl.crc32c_blocks(memoryview(raw)) == want
    assert impl.crc32c_blocks(array.array("Q", raw)) == want
    assert impl.crc32c_blocks(np.frombuffer(raw, dtype=np.uint32).reshape(64, 32)) == want
    with pytest.raises(BufferLayoutError):
        impl.crc32c_blocks(memoryview(raw * 2)[::2])
