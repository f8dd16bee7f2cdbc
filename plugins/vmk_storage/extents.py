"""The block index of one volume: where each written block's data lives in the image.

Design note.  A unit's log holds block records of up to 4 MiB; each record
writes a run of consecutive blocks whose data sits back to back in the
image, with one crc32c per block.  The index therefore keeps *extents*
(first block, count, image position of the first block's data, the
crc32c table slice, the record's sequence) rather than one entry per block:
a volume written sequentially in 1 MiB records costs one small object per
MiB, however large it grows, and indexing a write is one list operation.

Extents never overlap.  Writing over part of an extent trims it (or splits
it in two); the pieces keep pointing at their original data, so snapshots
that still see the older record are unaffected.  Extents are immutable, so
copying a map for a snapshot copies two lists of references.
"""

from __future__ import annotations

import struct
from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass

from vmk_storage.format import BLOCK


@dataclass(frozen=True, slots=True)
class Extent:
    """Blocks ``start .. start + count`` of a volume, stored contiguously from image position ``pos``."""

    start: int
    count: int
    pos: int
    crcs: bytes  # little-endian u32 crc32c per block, 4 * count bytes
    seq: int

    @property
    def end(self) -> int:
        return self.start + self.count

    def clip(self, lo: int, hi: int) -> Extent:
        """The part of this extent covering blocks ``[lo, hi)`` (which must intersect it)."""
        lo, hi = max(lo, self.start), min(hi, self.end)
        if lo == self.start and hi == self.end:
            return self
        skip = lo - self.start
        return Extent(
            lo, hi - lo, self.pos + skip * BLOCK, self.crcs[4 * skip : 4 * (skip + hi - lo)], self.seq
        )

    def crc_at(self, block: int) -> int:
        value: int = struct.unpack_from("<I", self.crcs, 4 * (block - self.start))[0]
        return value

    def data_base(self) -> int:
        """Image position block 0 would have if this record had started there (same record, same base)."""
        return self.pos - self.start * BLOCK


class ExtentMap:
    """Non-overlapping extents of one volume, sorted by first block."""

    __slots__ = ("_exts", "_starts")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._exts: list[Extent] = []

    def copy(self) -> ExtentMap:
        other = ExtentMap()
        other._starts = list(self._starts)
        other._exts = list(self._exts)
        return other

    def __iter__(self) -> Iterator[Extent]:
        return iter(self._exts)

    def __len__(self) -> int:
        return len(self._exts)

    def __bool__(self) -> bool:
        return bool(self._exts)

    @property
    def block_count(self) -> int:
        """Blocks written (and not trimmed)."""
        return sum(e.count for e in self._exts)

    @property
    def end_block(self) -> int:
        """One past the last written block (0 when nothing is written)."""
        return self._exts[-1].end if self._exts else 0

    def _span(self, lo: int, hi: int) -> tuple[int, int]:
        """Indices ``i..j`` of the extents that intersect blocks ``[lo, hi)``."""
        i = bisect_right(self._starts, lo) - 1
        if i < 0 or self._exts[i].end <= lo:
            i += 1
        j = bisect_left(self._starts, hi, lo=max(i, 0))
        return i, j

    def _replace(self, i: int, j: int, lo: int, hi: int, middle: list[Extent]) -> None:
        """Replace extents ``i..j`` by their parts outside ``[lo, hi)`` around ``middle``."""
        new: list[Extent] = []
        if i < j and self._exts[i].start < lo:
            new.append(self._exts[i].clip(self._exts[i].start, lo))
        new.extend(middle)
        if i < j and self._exts[j - 1].end > hi:
            new.append(self._exts[j - 1].clip(hi, self._exts[j - 1].end))
        self._exts[i:j] = new
        self._starts[i:j] = [e.start for e in new]

    def put(self, ext: Extent) -> None:
        """Index a write: ``ext`` replaces whatever covered its blocks."""
        if not self._exts or self._exts[-1].end <= ext.start:  # the common, sequential case
            self._exts.append(ext)
            self._starts.append(ext.start)
            return
        i, j = self._span(ext.start, ext.end)
        self._replace(i, j, ext.start, ext.end, [ext])

    def trim(self, start: int, count: int) -> None:
        """Blocks ``start .. start + count`` become unwritten."""
        i, j = self._span(start, start + count)
        if i < j:
            self._replace(i, j, start, start + count, [])

    def lookup(self, lo: int, hi: int) -> list[Extent]:
        """The written parts of blocks ``[lo, hi)``, clipped, in block order."""
        i, j = self._span(lo, hi)
        return [e.clip(lo, hi) for e in self._exts[i:j]]

    def at(self, block: int) -> Extent | None:
        """The extent holding ``block``, or ``None`` when it is unwritten."""
        found = self.lookup(block, block + 1)
        return found[0] if found else None


def same_data(a: Extent, b: Extent) -> bool:
    """Whether two extents covering the same blocks point at the same stored data."""
    return a.seq == b.seq and a.data_base() == b.data_base()


def changed_runs(old: ExtentMap, new: ExtentMap) -> Iterator[Extent]:
    """Parts of ``new`` whose data differs from ``old`` (or that ``old`` lacks)."""
    for ext in new:
        cursor = ext.start
        for prev in old.lookup(ext.start, ext.end):
            if prev.start > cursor:
                yield ext.clip(cursor, prev.start)
            if not same_data(prev, ext.clip(prev.start, prev.end)):
                yield ext.clip(prev.start, prev.end)
            cursor = prev.end
        if cursor < ext.end:
            yield ext.clip(cursor, ext.end)


def gone_runs(old: ExtentMap, new: ExtentMap) -> Iterator[tuple[int, int]]:
    """Block runs ``(start, count)`` written in ``old`` and unwritten in ``new``."""
    for ext in old:
        cursor = ext.start
        for cur in new.lookup(ext.start, ext.end):
            if cur.start > cursor:
                yield cursor, cur.start - cursor
            cursor = cur.end
        if cursor < ext.end:
            yield cursor, ext.end - cursor
