"""Pure-Python reference model of per-block CRC-32C tables.

A storage unit keeps one CRC-32C (Castagnoli) per 4 KiB block.  The table of
an extent is the checksum of each block as a little-endian ``u32``, in block
order; :func:`crc32c_first_mismatch` names the first block that disagrees
with a table.  The checksum primitive is the ``crc32c`` package; the loop
over blocks is the behaviour the Rust fast path must reproduce, errors
included.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import crc32c as _crc32c

from vmkernel.errors import BufferLayoutError, InvalidArgument
from vmkernel.reference.journal_chain import _bytes_of, _export

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["crc32c_blocks", "crc32c_first_mismatch"]

_BUFFER_EXPECTED = "bytes, bytearray, memoryview or another C-contiguous buffer"


def _blocks(data: Buffer, block_size: int) -> tuple[memoryview, int]:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size must be an int, not {type(block_size).__name__}")
    if block_size <= 0 or block_size % 512:
        raise InvalidArgument("block_size", block_size, "a positive multiple of 512")
    view = _bytes_of(_export(data, "data", _BUFFER_EXPECTED), "data")
    if len(view) % block_size:
        raise BufferLayoutError("len(data)", len(view), f"a multiple of the block size {block_size}")
    return view, len(view) // block_size


def crc32c_blocks(data: Buffer, block_size: int = 4096) -> bytes:
    """CRC-32C of each ``block_size``-byte block of ``data``, as little-endian u32s."""
    view, count = _blocks(data, block_size)
    return struct.pack(
        f"<{count}I",
        *(_crc32c.crc32c(view[i * block_size : (i + 1) * block_size]) for i in range(count)),
    )


def crc32c_first_mismatch(data: Buffer, table: Buffer, block_size: int = 4096) -> int | None:
    """Index of the first block of ``data`` whose CRC-32C differs from ``table``, or ``None``."""
    view, count = _blocks(data, block_size)
    tview = _bytes_of(_export(table, "table", _BUFFER_EXPECTED), "table")
    if len(tview) != 4 * count:
        raise BufferLayoutError("len(table)", len(tview), f"{4 * count} (4 bytes per block of data)")
    want = struct.unpack(f"<{count}I", tview)
    for i in range(count):
        if _crc32c.crc32c(view[i * block_size : (i + 1) * block_size]) != want[i]:
            return i
    return None
