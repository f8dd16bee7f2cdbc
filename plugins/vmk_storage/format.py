"""On-disk format of a storage unit image.

Design note.  A unit image is one linear byte space (a file for the local
backend, an NBD export for the network backend) laid out as::

    0      superblock slot A (4 KiB)
    4096   superblock slot B (4 KiB)
    8192   log: records appended back to back, never rewritten

A superblock names the owner VM, the feature bits, an *epoch* (bumped every
time the unit is opened for writing), a *checkpoint* (log end and sequence
number that the flush writing it makes durable) and a *durable point* (the
checkpoint of the flush before, already durable when this superblock was
written).  A flush writes the superblock and syncs once: records and
superblock become durable together, and the durable point is only ever a
position an earlier completed sync covered.  The two slots
alternate by generation, so a torn superblock write leaves the other slot
valid.  Bits in ``incompat`` that this module does not know make the unit
refuse to open (qcow2's rule); ``compat`` bits are ignored; ``autoclear``
bits are dropped by a writer.

Every record carries its owner VM, its volume, its block offset, a global
sequence number and the epoch that wrote it: that is the stamp of each block
it holds.  A block record's header checksum covers the header and a table of
per-block crc32c values, so each 4 KiB block can be verified on its own and
is bound to its stamp.  Recovery follows the chain (sequence +1, epoch never
decreasing, never above the superblock's): the first record that breaks it
ends the log.  Before the durable point a break is corruption (typed error);
after it, it is a torn tail (a flush that never completed) and is ignored.  The
epoch rule keeps stale records of an earlier crashed session from being
picked up behind newer ones that happen to line up.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

import crc32c as _crc32c

from vmkernel import implementation

BLOCK = 4096
SB_SLOT = 4096
LOG_START = 2 * SB_SLOT
MAX_EXTENT_BLOCKS = 1024  # 4 MiB of data per block record
MAX_VOLUME_BYTES = 1 << 48
MAX_VOLUME_BLOCKS = MAX_VOLUME_BYTES // BLOCK
MAX_OBJECT_BYTES = 16 << 20
MAX_VOLUMES = 1024

SB_MAGIC = b"VMKUNIT\x00"
SB_VERSION = 1
# magic, version, hdr size, block size, generation, owner, incompat, compat, autoclear,
# flags, epoch, checkpoint pos/seq, durable pos/seq, quota, capacity, backend tag
_SB = struct.Struct("<8sHHIQ16sQQQIIQQQQQQ8s")
_SB_CRC = struct.Struct("<I")

FLAG_DIRTY = 1
FLAG_DESTROYED = 2

INCOMPAT_LOG_V1 = 1 << 0  # stamped extent records as described here
KNOWN_INCOMPAT = INCOMPAT_LOG_V1
KNOWN_AUTOCLEAR = 0

REC_MAGIC = 0x524B4D56  # "VMKR"
# magic, type, flags, epoch, count, seq, owner, volume, reserved, offset, payload len, header crc
_REC = struct.Struct("<IHHIIQ16sIIQII")
REC_HEADER = _REC.size  # 64

T_BLOCKS = 1  # count blocks of volume at block offset; crc table + data
T_VOLUME = 2  # declare volume id (volume field) named by the payload
T_OBJECT_PUT = 3  # payload: u16 name length, name, data
T_OBJECT_DEL = 4  # payload: name
T_SNAPSHOT = 5  # payload: snapshot name; freezes the current state
T_SNAPSHOT_DEL = 6
T_REVERT = 7  # payload: snapshot name; current state becomes the snapshot's
T_TRIM = 8  # count blocks of volume at block offset become unwritten (compaction only)
KNOWN_TYPES = frozenset(range(1, 9))


def crc(data: bytes | bytearray | memoryview, seed: int = 0) -> int:
    """crc32c of ``data`` continuing from ``seed`` (hardware accelerated where available)."""
    return int(_crc32c.crc32c(data, seed))


def owner_bytes(vm_id: str) -> bytes:
    """The 16-byte owner stamp of a VM id (a UUID string)."""
    return uuid.UUID(vm_id).bytes


def owner_str(raw: bytes) -> str:
    return str(uuid.UUID(bytes=bytes(raw)))


@dataclass
class Superblock:
    owner: bytes
    generation: int = 0
    incompat: int = INCOMPAT_LOG_V1
    compat: int = 0
    autoclear: int = 0
    flags: int = 0
    epoch: int = 0
    checkpoint_pos: int = LOG_START
    checkpoint_seq: int = 0
    durable_pos: int = LOG_START
    durable_seq: int = 0
    quota: int = 0
    capacity: int = 0
    backend: str = "local"

    def pack(self) -> bytes:
        body = _SB.pack(
            SB_MAGIC,
            SB_VERSION,
            _SB.size + _SB_CRC.size,
            BLOCK,
            self.generation,
            self.owner,
            self.incompat,
            self.compat,
            self.autoclear,
            self.flags,
            self.epoch,
            self.checkpoint_pos,
            self.checkpoint_seq,
            self.durable_pos,
            self.durable_seq,
            self.quota,
            self.capacity,
            self.backend.encode()[:8].ljust(8, b"\0"),
        )
        return body + _SB_CRC.pack(crc(body))

    @property
    def slot_offset(self) -> int:
        return (self.generation % 2) * SB_SLOT


class SuperblockProblem(Exception):
    """Internal: why one slot could not be used (``kind`` is magic, checksum or short)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def unpack_superblock(raw: bytes) -> Superblock:
    size = _SB.size + _SB_CRC.size
    if len(raw) < size:
        raise SuperblockProblem("short", f"{len(raw)} bytes")
    if raw[:8] != SB_MAGIC:
        raise SuperblockProblem("magic", f"magic {bytes(raw[:8])!r}")
    body = raw[: _SB.size]
    (stored,) = _SB_CRC.unpack_from(raw, _SB.size)
    if crc(body) != stored:
        raise SuperblockProblem("checksum", f"crc32c {stored:#010x} != computed {crc(body):#010x}")
    f = _SB.unpack(body)
    if f[1] != SB_VERSION or f[3] != BLOCK:
        raise SuperblockProblem("version", f"version {f[1]} block size {f[3]}")
    return Superblock(
        owner=f[5],
        generation=f[4],
        incompat=f[6],
        compat=f[7],
        autoclear=f[8],
        flags=f[9],
        epoch=f[10],
        checkpoint_pos=f[11],
        checkpoint_seq=f[12],
        durable_pos=f[13],
        durable_seq=f[14],
        quota=f[15],
        capacity=f[16],
        backend=f[17].rstrip(b"\0").decode(errors="replace"),
    )


@dataclass(frozen=True)
class RecordHeader:
    rtype: int
    flags: int
    epoch: int
    count: int
    seq: int
    owner: bytes
    volume: int
    offset: int
    payload_len: int
    header_crc: int

    @property
    def covered_len(self) -> int:
        """Bytes after the header that its checksum covers (crc table, or the payload)."""
        return 4 * self.count if self.rtype == T_BLOCKS else self.payload_len

    @property
    def body_len(self) -> int:
        """Bytes after the fixed header (crc table + data for block records)."""
        if self.rtype == T_BLOCKS:
            return 4 * self.count + BLOCK * self.count
        return self.payload_len

    @property
    def total_len(self) -> int:
        return REC_HEADER + self.body_len


def pack_header(
    rtype: int,
    epoch: int,
    count: int,
    seq: int,
    owner: bytes,
    volume: int,
    offset: int,
    payload_len: int,
    covered: bytes | bytearray | memoryview,
) -> bytes:
    """Pack a record header whose checksum covers the header and ``covered``.

    ``covered`` is the crc table of a block record or the payload of any other.
    """
    head = _REC.pack(REC_MAGIC, rtype, 0, epoch, count, seq, owner, volume, 0, offset, payload_len, 0)
    value = crc(covered, crc(head[: REC_HEADER - 4]))
    return head[: REC_HEADER - 4] + struct.pack("<I", value)


def unpack_header(raw: bytes | bytearray | memoryview) -> RecordHeader | None:
    """Parse a header; ``None`` when the magic is absent (end of log or garbage)."""
    if len(raw) < REC_HEADER:
        return None
    f = _REC.unpack_from(raw, 0)
    if f[0] != REC_MAGIC:
        return None
    return RecordHeader(
        rtype=f[1],
        flags=f[2],
        epoch=f[3],
        count=f[4],
        seq=f[5],
        owner=f[6],
        volume=f[7],
        offset=f[9],
        payload_len=f[10],
        header_crc=f[11],
    )


def chain_problem(h: RecordHeader, seq: int, epoch: int, epoch_limit: int) -> str | None:
    """Why ``h`` cannot follow the record of sequence ``seq`` and epoch ``epoch`` under a
    superblock of epoch ``epoch_limit``; ``None`` when it can.  The log's chain rule, used
    by every reader (open, check, replication)."""
    if h.rtype not in KNOWN_TYPES:
        return f"unknown record type {h.rtype}"
    if h.rtype in (T_BLOCKS, T_TRIM) and not 0 < h.count <= MAX_EXTENT_BLOCKS:
        return f"block count {h.count} out of range"
    if h.rtype != T_BLOCKS and h.payload_len > MAX_OBJECT_BYTES + 256:
        return f"payload length {h.payload_len} out of range"
    if h.seq != seq + 1 or not epoch <= h.epoch <= epoch_limit:
        return f"sequence {h.seq} epoch {h.epoch} breaks the chain after {seq}"
    return None


def header_crc_ok(
    raw_header: bytes | bytearray | memoryview, covered: bytes | bytearray | memoryview
) -> bool:
    (stored,) = struct.unpack_from("<I", raw_header, REC_HEADER - 4)
    return bool(crc(covered, crc(raw_header[: REC_HEADER - 4])) == stored)


def crc_table(data: bytes | bytearray | memoryview) -> bytes:
    """The per-block crc32c table of whole blocks (one call into the selected implementation)."""
    return bytes(implementation().crc32c_blocks(data, BLOCK))


def first_bad_block(
    data: bytes | bytearray | memoryview, table: bytes | bytearray | memoryview
) -> int | None:
    """Index of the first block of ``data`` that disagrees with ``table``, or ``None``."""
    found = implementation().crc32c_first_mismatch(data, table, BLOCK)
    return None if found is None else int(found)


def unpack_crc_table(raw: bytes | bytearray | memoryview, count: int) -> tuple[int, ...]:
    return struct.unpack_from(f"<{count}I", raw, 0)
