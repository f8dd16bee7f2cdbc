"""A storage unit: one VM's volumes, named objects and snapshots in one image.

Design note.  The unit keeps an in-memory index built by replaying its log
(:mod:`vmk_storage.format`) on open: per volume a map from block number to
(image position, crc32c, sequence), the named objects and, for every
snapshot, a frozen copy of both.  Writes append stamped records; ``flush``
makes them durable in the order the format needs (data, sync, superblock
checkpoint, sync) and only then are they acknowledged.  Every read verifies
the crc32c of each block it returns.

Non-commingling is enforced three ways: each record is stamped with the
owner and a foreign stamp makes the unit refuse to open; data read from a
unit comes back as :class:`OwnedBytes` that remembers its VM, and writing it
into another VM's unit raises :class:`CommingleRefused`; clone copies blocks
into a new unit and restamps them, so no extent is ever shared.

A unit opens read-only first and takes the writer lock (``flock`` on
``lock`` in its directory) on the first change; a second writer gets
:class:`UnitBusy`.  A unit that was not closed cleanly is recovered when it
is next opened for writing: the torn tail is cut and the epoch bumped.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3
import orjson

from vmk_storage import format as fmt
from vmk_storage.device import Buffer, Device, fsync_dir
from vmk_storage.extents import Extent, ExtentMap, changed_runs, gone_runs
from vmkernel.errors import (
    BadMagic,
    CommingleRefused,
    CorruptUnit,
    DiskFull,
    InvalidArgument,
    OwnerMismatch,
    QuotaExceeded,
    StorageError,
    TruncatedUnit,
    UnitBusy,
    UnitDestroyed,
    UnknownFeature,
    UnknownResource,
)

if TYPE_CHECKING:
    from vmk_storage.store import UnitStore

IMAGE = "unit.img"
LOCK = "lock"
CONFIG_OBJECT = "vm.config"
_VOLUME_RE = re.compile(r"^(config|swap|memory|disk[0-9]{1,3})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SCAN_WINDOW = 8 << 20
_ACK_LEDGER = 256
_CHUNK_BLOCKS = 1024  # 4 MiB per read when streaming a whole volume
_NOSPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def volume_role(name: str) -> str:
    if name.startswith("disk"):
        return "data"
    return name  # config, swap, memory


class OwnedBytes(bytes):
    """Bytes read from a unit; ``vm_id`` names the VM they belong to.

    Writing them into another VM's unit raises :class:`CommingleRefused`;
    ``bytes(x)`` makes an untagged copy when a caller means to move data
    between VMs on purpose.
    """

    vm_id: str

    def __new__(cls, data: Buffer, vm_id: str) -> OwnedBytes:
        obj = super().__new__(cls, data)
        obj.vm_id = vm_id
        return obj


@dataclass
class State:
    """What a snapshot freezes: the block maps and the named objects."""

    blocks: dict[int, ExtentMap] = field(default_factory=dict)  # volume id -> its block index
    objects: dict[str, bytes] = field(default_factory=dict)

    def copy(self) -> State:
        return State({v: m.copy() for v, m in self.blocks.items()}, dict(self.objects))


@dataclass(frozen=True)
class Problem:
    """One finding of :meth:`StorageUnit.check` (nothing is changed by a check)."""

    unit: str
    offset: int | None
    kind: str
    message: str

    def __str__(self) -> str:
        where = f" at offset {self.offset}" if self.offset is not None else ""
        return f"{self.unit}{where}: {self.kind}: {self.message}"


@dataclass
class Stamp:
    """The stamp of one log record as found by a scan."""

    pos: int
    rtype: int
    owner: str
    volume: str | None
    block: int
    count: int
    seq: int
    epoch: int


class _Window:
    """Sequential reads of an image through a large buffer."""

    def __init__(self, dev: Device) -> None:
        self.dev = dev
        self.start = 0
        self.buf = memoryview(b"")

    def get(self, pos: int, n: int) -> memoryview:
        if pos >= self.start and pos + n <= self.start + len(self.buf):
            return self.buf[pos - self.start : pos - self.start + n]
        raw = bytearray(max(n, _SCAN_WINDOW))
        got = self.dev.preadinto(memoryview(raw), pos)
        self.start = pos
        self.buf = memoryview(raw)[:got]
        return self.buf[:n]


class StorageUnit:
    """The storage unit of one VM.  Obtain units from a :class:`~vmk_storage.store.UnitStore`."""

    def __init__(self, store: UnitStore, vm_id: str, path: Path) -> None:
        self.store = store
        self.vm_id = vm_id
        self.path = path
        self._owner = fmt.owner_bytes(vm_id)
        self._lock = threading.RLock()
        self._dev: Device | None = None
        self._writable = False
        self._lock_fd = -1
        self._deleted = False
        self._reset_state()

    def _reset_state(self) -> None:
        self._sb = fmt.Superblock(owner=self._owner)
        self._sb_slot_ok = [True, True]
        self._cur = State()
        self._snapshots: dict[str, State] = {}
        self._volumes: dict[str, int] = {}
        self._volume_names: dict[int, str] = {}
        self._end = fmt.LOG_START
        self._seq = 0
        self._pending = False
        # Extents written since the last flush, then the newest acknowledged ones (bounded by
        # _ACK_LEDGER blocks): what the acknowledged-readable invariant re-reads.
        self._pending_extents: list[tuple[int, Extent]] = []
        self._acked: deque[tuple[int, Extent]] = deque()
        self._acked_blocks = 0
        self._new_epoch_needed = False
        self.torn_tail: tuple[int, str] | None = None
        self._stamps_verified = fmt.LOG_START

    # ------------------------------------------------------------ properties
    def __repr__(self) -> str:
        return f"StorageUnit(vm_id={self.vm_id!r}, backend={self.backend!r})"

    @property
    def backend(self) -> str:
        return self.store.backend_kind

    @property
    def image_path(self) -> Path:
        return self.path / IMAGE

    @property
    def owner(self) -> str:
        return self.vm_id

    # ----------------------------------------------------------- open, close
    def _err(
        self, cls: type[StorageError], offset: int | None, problem: str, value: Any, expected: str
    ) -> StorageError:
        return cls(self.vm_id, offset, problem, value, expected)

    def _ensure(self, writable: bool = False) -> Device:
        if self._deleted:
            raise self._err(UnitDestroyed, None, "the unit was deleted", "deleted", "a unit that exists")
        if self._dev is not None and (self._writable or not writable):
            return self._dev
        if self._dev is not None:
            self._close_device()
        if not self.image_path.exists():
            raise UnknownResource(
                "storage unit", self.vm_id, "a unit directory with an image under the store"
            )
        if writable:
            self._take_lock()
        try:
            self._open(writable)
        except OSError as exc:
            self._close_device()
            raise self._err(
                StorageError,
                None,
                f"the {self.backend} device could not be opened",
                str(exc),
                "a reachable image (for NBD: qemu-nbd installed and serving)",
            ) from exc
        except BaseException:
            self._close_device()
            raise
        assert self._dev is not None
        return self._dev

    def _take_lock(self) -> None:
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._err(
                UnitBusy,
                None,
                "another process or kernel has the unit open for writing",
                "locked",
                "no other writer",
            ) from None
        self._lock_fd = fd

    def _open(self, writable: bool) -> None:
        self._reset_state()
        self._dev = self.store.open_device(self.image_path, writable=writable)
        self._writable = writable
        self._read_superblock()
        self._scan()
        if writable:
            if self.torn_tail is not None:
                # Cut what no flush acknowledged so it can never be picked up behind newer records.
                self._dev.truncate(self._end)
            self._sb.autoclear = 0
            self._sb.flags |= fmt.FLAG_DIRTY
            self._sb.epoch += 1
            self._write_superblock()

    def _close_device(self) -> None:
        if self._dev is not None:
            with contextlib.suppress(OSError):
                self._dev.close()
            self._dev = None
        self._writable = False
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def close(self) -> None:
        """Flush, mark the image clean and release the device and the writer lock."""
        with self._lock:
            if self._dev is not None and self._writable:
                try:
                    self.flush()
                    self._sb.flags &= ~fmt.FLAG_DIRTY
                    self._write_superblock()
                except StorageError:
                    pass
            self._close_device()

    # ------------------------------------------------------------ superblock
    def _read_superblock(self) -> None:
        assert self._dev is not None
        raw = self._dev.pread(fmt.LOG_START, 0)
        if len(raw) < fmt.LOG_START:
            raise self._err(
                TruncatedUnit,
                len(raw),
                "image ends inside the superblocks",
                len(raw),
                f"{fmt.LOG_START} bytes",
            )
        found: list[fmt.Superblock] = []
        problems: list[fmt.SuperblockProblem] = []
        for slot in (0, 1):
            try:
                found.append(fmt.unpack_superblock(raw[slot * fmt.SB_SLOT : (slot + 1) * fmt.SB_SLOT]))
                self._sb_slot_ok[slot] = True
            except fmt.SuperblockProblem as exc:
                problems.append(exc)
                self._sb_slot_ok[slot] = False
        if not found:
            if all(p.kind == "magic" for p in problems):
                raise self._err(
                    BadMagic,
                    0,
                    "no superblock carries the unit magic",
                    problems[0].detail,
                    f"magic {fmt.SB_MAGIC!r} in slot 0 or 1",
                )
            raise self._err(
                CorruptUnit,
                0,
                "both superblocks are invalid",
                "; ".join(p.detail for p in problems),
                "one superblock with a valid crc32c",
            )
        sb = max(found, key=lambda s: s.generation)
        slot_off = sb.slot_offset
        unknown = sb.incompat & ~fmt.KNOWN_INCOMPAT
        if unknown:
            raise self._err(
                UnknownFeature,
                slot_off,
                "unknown incompatible feature bits",
                f"{unknown:#x}",
                f"only bits {fmt.KNOWN_INCOMPAT:#x}",
            )
        if not sb.incompat & fmt.INCOMPAT_LOG_V1:
            raise self._err(
                UnknownFeature,
                slot_off,
                "log format bit missing",
                f"{sb.incompat:#x}",
                f"bit {fmt.INCOMPAT_LOG_V1:#x} set",
            )
        if sb.owner != self._owner:
            raise self._err(
                OwnerMismatch,
                slot_off,
                "superblock names another owner",
                fmt.owner_str(sb.owner),
                f"owner {self.vm_id} (the unit directory's VM)",
            )
        if sb.flags & fmt.FLAG_DESTROYED:
            raise self._err(
                UnitDestroyed,
                slot_off,
                "the unit belongs to a destroyed VM and is being deleted",
                "destroyed",
                "a live unit (purge it with the store)",
            )
        if not fmt.LOG_START <= sb.durable_pos <= sb.checkpoint_pos or sb.durable_seq > sb.checkpoint_seq:
            raise self._err(
                CorruptUnit,
                slot_off,
                "checkpoint out of order",
                (sb.durable_pos, sb.checkpoint_pos),
                f"{fmt.LOG_START} <= durable point <= checkpoint",
            )
        self._sb = sb

    def _write_superblock(self) -> None:
        """Sync the log, then write the next superblock generation into the other slot and sync.

        Used at open, close and for settings: everything up to the end is durable first.
        """
        assert self._dev is not None
        self._device_flush()
        self._sb.durable_pos, self._sb.durable_seq = self._end, self._seq
        self._put_superblock()

    def _put_superblock(self) -> None:
        assert self._dev is not None
        self._sb.generation += 1
        self._sb.checkpoint_pos = self._end
        self._sb.checkpoint_seq = self._seq
        self._sb.backend = self.backend
        self._device_write([self._sb.pack().ljust(fmt.SB_SLOT, b"\0")], self._sb.slot_offset, None)
        self._device_flush()

    # ------------------------------------------------------------------ scan
    def _scan(
        self,
        visit: Callable[[Stamp], None] | None = None,
        verify_all: bool = False,
        problems: list[Problem] | None = None,
    ) -> None:
        """Replay the log into the index; see the format's chain rule."""
        assert self._dev is not None
        win = _Window(self._dev)
        sb = self._sb
        pos = fmt.LOG_START
        seq = 0
        epoch = 0
        hit_durable = False
        reason = "end of log"
        while True:
            if pos == sb.durable_pos and seq == sb.durable_seq:
                hit_durable = True
            before_cp = pos < sb.durable_pos
            raw = win.get(pos, fmt.REC_HEADER)
            if len(raw) < fmt.REC_HEADER:
                reason = "image ends inside a record header" if len(raw) else "end of log"
                break
            h = fmt.unpack_header(raw)
            if h is None:
                reason = "end of log" if not any(raw) else "bad record magic"
                break
            problem = fmt.chain_problem(h, seq, epoch, sb.epoch)
            if problem is not None:
                reason = problem
                break
            cover_len = h.covered_len
            covered = win.get(pos + fmt.REC_HEADER, cover_len)
            if len(covered) < cover_len:
                reason = "image ends inside a record"
                break
            if not fmt.header_crc_ok(raw, covered):
                reason = "record header checksum mismatch"
                break
            if h.owner != self._owner:
                raise self._err(
                    OwnerMismatch,
                    pos,
                    "record stamped with another VM",
                    fmt.owner_str(h.owner),
                    f"owner {self.vm_id}",
                )
            data = memoryview(b"")
            if h.rtype == fmt.T_BLOCKS:
                data_pos = pos + fmt.REC_HEADER + cover_len
                data = win.get(data_pos, fmt.BLOCK * h.count)
                if len(data) < fmt.BLOCK * h.count:
                    reason = "image ends inside block data"
                    break
                table = fmt.unpack_crc_table(covered, h.count)
                if not before_cp or verify_all:
                    bad = []
                    first = fmt.first_bad_block(data, covered)
                    if first is not None:
                        # Rare: name every bad block of the record, not only the first.
                        bad = [
                            i
                            for i in range(first, h.count)
                            if fmt.crc(data[i * fmt.BLOCK : (i + 1) * fmt.BLOCK]) != table[i]
                        ]
                    if bad and not before_cp:
                        reason = "block data checksum mismatch (torn write)"
                        break
                    for i in bad:
                        if problems is not None:
                            problems.append(
                                Problem(
                                    self.vm_id,
                                    data_pos + i * fmt.BLOCK,
                                    "checksum",
                                    f"block {h.offset + i} fails its crc32c",
                                )
                            )
            self._apply(h, pos, covered, data)
            if visit is not None:
                visit(
                    Stamp(
                        pos,
                        h.rtype,
                        fmt.owner_str(h.owner),
                        self._volume_names.get(h.volume),
                        h.offset,
                        h.count,
                        h.seq,
                        h.epoch,
                    )
                )
            pos += h.total_len
            seq = h.seq
            epoch = h.epoch
        if pos < sb.durable_pos or not hit_durable:
            size = self._dev.size()
            if size < sb.durable_pos or reason == "end of log" or reason.startswith("image ends"):
                # Missing bytes, or zeros where records should be (an NBD export pads to 512 bytes).
                raise self._err(
                    TruncatedUnit,
                    pos,
                    f"image truncated ({reason})",
                    size,
                    f"records up to the durable point {sb.durable_pos} of the superblock",
                )
            raise self._err(
                CorruptUnit,
                pos,
                reason,
                f"record sequence {seq + 1}",
                f"an intact record chain up to the durable point {sb.durable_pos}",
            )
        self._end = pos
        self._seq = seq
        if pos < sb.checkpoint_pos:
            self.torn_tail = (pos, f"the last flush (to {sb.checkpoint_pos}) did not complete: {reason}")
        elif reason != "end of log":
            self.torn_tail = (pos, reason)
        elif self.backend == "local" and self._dev.size() > pos:
            self.torn_tail = (pos, "bytes after the end of the log")

    def _apply(self, h: fmt.RecordHeader, pos: int, covered: memoryview, data: memoryview) -> None:
        def corrupt(problem: str, value: Any, expected: str) -> Any:
            return self._err(CorruptUnit, pos, problem, value, expected)

        if h.rtype in (fmt.T_BLOCKS, fmt.T_TRIM):
            name = self._volume_names.get(h.volume)
            if name is None:
                raise corrupt("index entry for an undeclared volume", h.volume, "a volume declared earlier")
            if h.offset + h.count > fmt.MAX_VOLUME_BLOCKS:
                raise corrupt(
                    "block index out of range", h.offset + h.count, f"at most {fmt.MAX_VOLUME_BLOCKS}"
                )
            emap = self._cur.blocks.setdefault(h.volume, ExtentMap())
            if h.rtype == fmt.T_TRIM:
                emap.trim(h.offset, h.count)
            else:
                emap.put(Extent(h.offset, h.count, pos + fmt.REC_HEADER + 4 * h.count, bytes(covered), h.seq))
            return
        payload = bytes(covered)
        if h.rtype == fmt.T_VOLUME:
            name = payload.decode(errors="replace")
            if not _VOLUME_RE.match(name) or h.volume >= fmt.MAX_VOLUMES or h.volume in self._volume_names:
                raise corrupt(
                    "bad volume declaration", (h.volume, name), "a new volume id below 1024 with a role name"
                )
            self._volumes[name] = h.volume
            self._volume_names[h.volume] = name
        elif h.rtype == fmt.T_OBJECT_PUT:
            (n,) = struct.unpack_from("<H", payload)
            self._cur.objects[payload[2 : 2 + n].decode(errors="replace")] = payload[2 + n :]
        elif h.rtype == fmt.T_OBJECT_DEL:
            self._cur.objects.pop(payload.decode(errors="replace"), None)
        else:
            name = payload.decode(errors="replace")
            if h.rtype == fmt.T_SNAPSHOT:
                self._snapshots[name] = self._cur.copy()
            elif name not in self._snapshots:
                raise corrupt("record names an unknown snapshot", name, "a snapshot created earlier")
            elif h.rtype == fmt.T_SNAPSHOT_DEL:
                del self._snapshots[name]
            else:  # T_REVERT
                self._cur = self._snapshots[name].copy()

    # ---------------------------------------------------------- device calls
    def _nospace(self, exc: OSError, offset: int | None, what: str) -> StorageError:
        return self._err(
            DiskFull,
            offset,
            f"no space left on the {self.backend} device {what}",
            os.strerror(exc.errno or 0),
            "free space on the device",
        )

    def _device_write(self, parts: list[Buffer], pos: int, api_offset: int | None) -> None:
        assert self._dev is not None
        try:
            self._dev.pwrite(parts, pos)
        except OSError as exc:
            self._new_epoch_needed = True
            if exc.errno in _NOSPACE:
                raise self._nospace(exc, api_offset, f"writing at image offset {pos}") from exc
            raise self._err(
                StorageError,
                api_offset,
                f"device write at image offset {pos} failed",
                str(exc),
                "a working device",
            ) from exc

    def _device_flush(self) -> None:
        assert self._dev is not None
        try:
            self._dev.flush()
        except OSError as exc:
            # Nothing since the last checkpoint is acknowledged; rescan from the device next time.
            self._close_device()
            if exc.errno in _NOSPACE:
                raise self._nospace(exc, None, "while flushing") from exc
            raise self._err(StorageError, None, "device flush failed", str(exc), "a working device") from exc

    def _prepare(self, total: int, api_offset: int | None) -> None:
        """Before packing records of ``total`` bytes: writer lock, epoch, quota (may compact)."""
        self._ensure(writable=True)
        if self._new_epoch_needed:
            # A failed write may have left intact records past the end: a new epoch disowns them.
            self._new_epoch_needed = False
            self._sb.epoch += 1
            self._write_superblock()
        quota = self._sb.quota
        if quota and self._end + total > quota:
            if self._compacted_size() + total <= quota:
                self.compact()
            if self._end + total > quota:
                raise self._err(
                    QuotaExceeded,
                    api_offset,
                    f"write of {total} bytes would grow the image to {self._end + total} bytes",
                    self._end + total,
                    f"at most the quota of {quota} bytes",
                )

    def _append(self, records: list[tuple[bytes, list[Buffer]]], api_offset: int | None) -> int:
        """Append packed records at the end of the log; returns the image position of the first."""
        total = sum(len(h) + sum(memoryview(p).nbytes for p in rest) for h, rest in records)
        parts: list[Buffer] = []
        for head, rest in records:
            parts.append(head)
            parts.extend(rest)
        pos = self._end
        try:
            self._device_write(parts, pos, api_offset)
        except StorageError:
            self._cut_tail()
            raise
        self._end += total
        self._pending = True
        return pos

    def _cut_tail(self) -> None:
        # Best effort: drop what a failed append left past the end (the new epoch covers the rest).
        if self._dev is not None:
            with contextlib.suppress(OSError):
                self._dev.truncate(self._end)

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _meta_record(self, rtype: int, payload: bytes, volume: int = 0) -> tuple[bytes, list[Buffer]]:
        head = fmt.pack_header(
            rtype, self._sb.epoch, 0, self._next_seq(), self._owner, volume, 0, len(payload), payload
        )
        return head, [payload]

    def _commit_meta(self, rtype: int, payload: bytes, volume: int = 0) -> None:
        seq0 = self._seq
        self._prepare(fmt.REC_HEADER + len(payload), None)
        try:
            head, rest = self._meta_record(rtype, payload, volume)
            pos = self._append([(head, rest)], None)
        except BaseException:
            self._seq = seq0
            raise
        h = fmt.unpack_header(head)
        assert h is not None
        self._apply(h, pos, memoryview(payload), memoryview(b""))

    # ------------------------------------------------------------- arguments
    def _check_volume(self, volume: object) -> str:
        if not isinstance(volume, str) or not _VOLUME_RE.match(volume):
            raise InvalidArgument("volume", volume, "config, swap, memory or disk<N> (N below 1000)")
        return volume

    def _check_range(self, offset: object, length: int) -> int:
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidArgument("offset", offset, "a byte offset >= 0")
        if offset + length > fmt.MAX_VOLUME_BYTES:
            raise InvalidArgument("offset + length", offset + length, f"at most {fmt.MAX_VOLUME_BYTES} bytes")
        return offset

    def _check_owner(self, data: object, vm_id: str | None, offset: int | None) -> None:
        source = vm_id if vm_id is not None else getattr(data, "vm_id", None)
        if source is not None and source != self.vm_id:
            raise self._err(
                CommingleRefused,
                offset,
                "data of another VM",
                source,
                f"only data of VM {self.vm_id} in its own unit",
            )

    @staticmethod
    def _as_view(name: str, data: object) -> memoryview:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidArgument(name, type(data).__name__, "bytes, bytearray or memoryview")
        return memoryview(data).cast("B")

    # ------------------------------------------------------------ block I/O
    def write(self, volume: str, offset: int, data: Buffer, *, vm_id: str | None = None) -> None:
        """Write ``data`` at byte ``offset`` of ``volume``; durable once :meth:`flush` returns.

        ``vm_id`` (or the ``vm_id`` of :class:`OwnedBytes` data) names whose
        data this is; anything but the unit's owner raises ``CommingleRefused``.
        """
        with self._lock:
            self._check_volume(volume)
            view = self._as_view("data", data)
            self._check_range(offset, len(view))
            self._check_owner(data, vm_id, offset)
            if not len(view):
                return
            self._ensure(writable=True)
            seq0 = self._seq
            try:
                self._write_locked(volume, offset, view)
            except BaseException:
                self._seq = seq0
                raise

    def _write_locked(self, volume: str, offset: int, view: memoryview) -> None:
        b0 = offset // fmt.BLOCK
        end = offset + len(view)
        b1 = -(-end // fmt.BLOCK)
        extents = -(-(b1 - b0) // fmt.MAX_EXTENT_BLOCKS)
        total = (b1 - b0) * (fmt.BLOCK + 4) + extents * fmt.REC_HEADER
        if volume not in self._volumes:
            total += fmt.REC_HEADER + len(volume)
        self._prepare(total, offset)
        records: list[tuple[bytes, list[Buffer]]] = []
        vol = self._volumes.get(volume)
        declare: bytes | None = None
        if vol is None:
            vol = len(self._volumes)
            if vol >= fmt.MAX_VOLUMES:
                raise InvalidArgument("volume", volume, f"at most {fmt.MAX_VOLUMES} volumes per unit")
            declare = volume.encode()
            records.append(self._meta_record(fmt.T_VOLUME, declare, vol))
        if offset % fmt.BLOCK or end % fmt.BLOCK:
            # Read-modify-write of the partial edge blocks (verified like any read).
            buf = bytearray(self._read_blocks(self._cur, volume, b0, b1))
            buf[offset - b0 * fmt.BLOCK : end - b0 * fmt.BLOCK] = view
            view = memoryview(buf)
        packed: list[tuple[int, int, bytes]] = []
        for start in range(b0, b1, fmt.MAX_EXTENT_BLOCKS):
            count = min(fmt.MAX_EXTENT_BLOCKS, b1 - start)
            chunk = view[(start - b0) * fmt.BLOCK : (start - b0 + count) * fmt.BLOCK]
            table = fmt.crc_table(chunk)
            seq = self._next_seq()
            head = fmt.pack_header(
                fmt.T_BLOCKS, self._sb.epoch, count, seq, self._owner, vol, start, 0, table
            )
            records.append((head + table, [chunk]))
            packed.append((start, seq, table))
        pos = self._append(records, offset)
        if declare is not None:
            self._volumes[volume] = vol
            self._volume_names[vol] = volume
            pos += fmt.REC_HEADER + len(declare)
        emap = self._cur.blocks.setdefault(vol, ExtentMap())
        for start, seq, table in packed:
            count = len(table) // 4
            ext = Extent(start, count, pos + fmt.REC_HEADER + 4 * count, table, seq)
            emap.put(ext)
            self._pending_extents.append((vol, ext))
            pos = ext.pos + count * fmt.BLOCK

    def read(self, volume: str, offset: int, length: int, *, snapshot: str | None = None) -> OwnedBytes:
        """Read ``length`` bytes at ``offset`` of ``volume`` (zeros where never written)."""
        with self._lock:
            self._check_volume(volume)
            if isinstance(length, bool) or not isinstance(length, int) or length < 0:
                raise InvalidArgument("length", length, "a byte count >= 0")
            self._check_range(offset, length)
            self._ensure()
            state = self._state(snapshot)
            b0 = offset // fmt.BLOCK
            b1 = -(-(offset + length) // fmt.BLOCK)
            buf = self._read_blocks(state, volume, b0, b1)
            skip = offset - b0 * fmt.BLOCK
            if skip == 0 and len(buf) == length:
                return OwnedBytes(buf, self.vm_id)
            return OwnedBytes(memoryview(buf)[skip : skip + length], self.vm_id)

    def _read_blocks(self, state: State, volume: str, b0: int, b1: int) -> bytearray:
        out = bytearray((b1 - b0) * fmt.BLOCK)
        vol = self._volumes.get(volume)
        emap = state.blocks.get(vol) if vol is not None else None
        if not emap:
            return out
        dev = self._dev
        assert dev is not None
        view = memoryview(out)
        for ext in emap.lookup(b0, b1):
            dst = view[(ext.start - b0) * fmt.BLOCK : (ext.end - b0) * fmt.BLOCK]
            try:
                got = dev.preadinto(dst, ext.pos)
            except OSError as exc:
                raise self._err(
                    StorageError, ext.pos, "device read failed", str(exc), "a working device"
                ) from exc
            if got < len(dst):
                raise self._err(
                    TruncatedUnit,
                    ext.pos + got,
                    f"image ends inside block {ext.start + got // fmt.BLOCK} of {volume}",
                    got,
                    f"{len(dst)} bytes",
                )
            i = fmt.first_bad_block(dst, ext.crcs)
            if i is not None:
                actual = fmt.crc(dst[i * fmt.BLOCK : (i + 1) * fmt.BLOCK])
                raise self._err(
                    CorruptUnit,
                    ext.pos + i * fmt.BLOCK,
                    f"block {ext.start + i} of {volume} fails its checksum",
                    f"crc32c {actual:#010x}",
                    f"crc32c {ext.crc_at(ext.start + i):#010x}",
                )
        return out

    def flush(self) -> None:
        """Make every write so far durable; it is acknowledged when this returns.

        ``sync="single"`` (default): write the superblock checkpoint, then one
        sync makes records and checkpoint durable together.  ``sync="ordered"``:
        sync the records, write the superblock, sync again (the textbook order,
        one more sync per flush).  Both recover the same acknowledged data.
        """
        with self._lock:
            if self._dev is None or not self._writable or not self._pending:
                return
            if self.store.sync == "ordered":
                self._write_superblock()
            else:
                self._sb.durable_pos, self._sb.durable_seq = self._sb.checkpoint_pos, self._sb.checkpoint_seq
                self._put_superblock()
            self._pending = False
            for item in self._pending_extents:
                self._acked.append(item)
                self._acked_blocks += item[1].count
            self._pending_extents.clear()
            while self._acked_blocks > _ACK_LEDGER and len(self._acked) > 1:
                self._acked_blocks -= self._acked.popleft()[1].count

    # -------------------------------------------------------- named objects
    def put_object(self, name: str, data: Buffer, *, vm_id: str | None = None) -> None:
        """Store a named object (config, metadata); replaces an object of that name."""
        with self._lock:
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise InvalidArgument("object name", name, "1-128 of letters, digits, '.', '_', '-'")
            view = self._as_view("data", data)
            if len(view) > fmt.MAX_OBJECT_BYTES:
                raise InvalidArgument("object size", len(view), f"at most {fmt.MAX_OBJECT_BYTES} bytes")
            self._check_owner(data, vm_id, None)
            raw = name.encode()
            self._commit_meta(fmt.T_OBJECT_PUT, struct.pack("<H", len(raw)) + raw + bytes(view))

    def get_object(self, name: str, *, snapshot: str | None = None) -> OwnedBytes:
        with self._lock:
            self._ensure()
            state = self._state(snapshot)
            if name not in state.objects:
                raise UnknownResource(
                    f"object of storage unit {self.vm_id}", name, f"one of {sorted(state.objects)}"
                )
            return OwnedBytes(state.objects[name], self.vm_id)

    def delete_object(self, name: str) -> None:
        with self._lock:
            self._ensure()
            if name not in self._cur.objects:
                raise UnknownResource(
                    f"object of storage unit {self.vm_id}", name, f"one of {sorted(self._cur.objects)}"
                )
            self._commit_meta(fmt.T_OBJECT_DEL, name.encode())

    def objects(self) -> list[str]:
        with self._lock:
            self._ensure()
            return sorted(self._cur.objects)

    def write_config(self, config: dict[str, Any]) -> None:
        """Store the VM's definition (a JSON-serialisable dict whose ``id`` is the owner)."""
        if not isinstance(config, dict):
            raise InvalidArgument("config", type(config).__name__, "a dict")
        if "id" in config and config["id"] != self.vm_id:
            raise self._err(
                CommingleRefused, None, "config of another VM", config["id"], f"the config of VM {self.vm_id}"
            )
        try:
            raw = orjson.dumps(config, option=orjson.OPT_SORT_KEYS)
        except TypeError as exc:
            raise InvalidArgument("config", config, f"JSON-serialisable values ({exc})") from None
        self.put_object(CONFIG_OBJECT, raw)

    def read_config(self) -> dict[str, Any]:
        with self._lock:
            self._ensure()
            raw = self._cur.objects.get(CONFIG_OBJECT)
            if raw is None:
                raise UnknownResource(
                    "saved config of storage unit", self.vm_id, "a unit that save_vm wrote to"
                )
            value = orjson.loads(raw)
            if not isinstance(value, dict):
                raise self._err(
                    CorruptUnit,
                    None,
                    "saved config is not a JSON object",
                    type(value).__name__,
                    "a JSON object",
                )
            return value

    # ------------------------------------------------------------ snapshots
    def _state(self, snapshot: str | None) -> State:
        if snapshot is None:
            return self._cur
        if snapshot not in self._snapshots:
            raise UnknownResource(
                f"snapshot of storage unit {self.vm_id}", snapshot, f"one of {sorted(self._snapshots)}"
            )
        return self._snapshots[snapshot]

    def snapshot(self, name: str) -> None:
        """Freeze the current volumes and objects under ``name``."""
        with self._lock:
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise InvalidArgument("snapshot name", name, "1-128 of letters, digits, '.', '_', '-'")
            self._ensure()
            if name in self._snapshots:
                raise InvalidArgument("snapshot name", name, f"a name not in {sorted(self._snapshots)}")
            self._commit_meta(fmt.T_SNAPSHOT, name.encode())

    def snapshots(self) -> list[str]:
        with self._lock:
            self._ensure()
            return sorted(self._snapshots)

    def delete_snapshot(self, name: str) -> None:
        with self._lock:
            self._ensure()
            self._state(name)
            self._commit_meta(fmt.T_SNAPSHOT_DEL, name.encode())

    def revert(self, name: str) -> None:
        """Make the current state the snapshot's again (writes since are dropped)."""
        with self._lock:
            self._ensure()
            self._state(name)
            self._commit_meta(fmt.T_REVERT, name.encode())
            self._acked.clear()
            self._acked_blocks = 0
            self._pending_extents.clear()

    def clone(self, new_vm_id: str, *, snapshot: str | None = None) -> StorageUnit:
        """Copy this unit (or one snapshot) into a new unit owned by ``new_vm_id``.

        Every block is read, verified and written again under the new owner's
        stamp; the saved VM config is not copied (it names this VM).
        """
        with self._lock:
            self._ensure()
            state = self._state(snapshot).copy()
            names = dict(self._volume_names)
        target = self.store.create(new_vm_id)
        try:
            for vol, emap in sorted(state.blocks.items()):
                volume = names[vol]
                for start, count in _runs(emap):
                    with self._lock:
                        data = self._read_blocks(state, volume, start, start + count)
                    target.write(volume, start * fmt.BLOCK, data)
            for name, value in sorted(state.objects.items()):
                if name != CONFIG_OBJECT:
                    target.put_object(name, value)
            target.flush()
        except BaseException:
            target.delete()
            raise
        return target

    # ------------------------------------------------------ quota, compaction
    @property
    def quota(self) -> int | None:
        with self._lock:
            self._ensure()
            return self._sb.quota or None

    def set_quota(self, quota: int | None) -> None:
        """Limit the image to ``quota`` bytes (``None``: no limit); persisted in the superblock."""
        with self._lock:
            if quota is not None and (
                isinstance(quota, bool) or not isinstance(quota, int) or quota < fmt.LOG_START
            ):
                raise InvalidArgument("quota", quota, f"None or a byte count >= {fmt.LOG_START}")
            self._ensure(writable=True)
            if quota is not None and self._compacted_size() > quota:
                raise self._err(
                    QuotaExceeded,
                    None,
                    "the unit already holds more than the new quota",
                    self._compacted_size(),
                    f"at most {quota} bytes",
                )
            self._sb.quota = quota or 0
            if quota is not None and self._end > quota:
                self.compact()
            self.flush()
            self._write_superblock()

    def usage(self) -> int:
        """Bytes of image in use (superblocks and log)."""
        with self._lock:
            self._ensure()
            return self._end

    def _live_states(self) -> list[State]:
        return [*self._snapshots.values(), self._cur]

    def _compacted_size(self) -> int:
        spans: list[tuple[int, int]] = []
        meta = 0
        for state in self._live_states():
            for emap in state.blocks.values():
                spans.extend((e.pos, e.pos + e.count * fmt.BLOCK) for e in emap)
            meta += sum(fmt.REC_HEADER + len(k) + len(v) + 2 for k, v in state.objects.items())
        meta += len(self._snapshots) * (fmt.REC_HEADER + 128) + len(self._volumes) * (fmt.REC_HEADER + 8)
        # Unique stored blocks (snapshots share them), a crc each, a header per extent.
        unique = 0
        reach = 0
        for lo, hi in sorted(spans):
            lo = max(lo, reach)
            if hi > lo:
                unique += hi - lo
                reach = hi
        return fmt.LOG_START + meta + (unique // fmt.BLOCK) * (fmt.BLOCK + 4) + len(spans) * fmt.REC_HEADER

    def compact(self) -> None:
        """Rewrite the image with only live data (current state and snapshots); crash safe.

        The new image is written beside the old one, made durable and renamed
        over it, so a crash leaves either image whole.
        """
        with self._lock:
            self._ensure(writable=True)
            self.flush()
            tmp = self.path / (IMAGE + ".compact")
            tmp.unlink(missing_ok=True)
            with open(tmp, "wb"):
                pass
            writer = StorageUnit(self.store, self.vm_id, self.path)
            writer._dev = self.store.open_device(tmp, writable=True)
            writer._writable = True
            writer._sb = fmt.Superblock(owner=self._owner, epoch=1, quota=0)
            try:
                writer._write_superblock()  # both slots valid from the start
                writer._write_superblock()
                self._emit_compacted(writer)
                writer.flush()
                writer._sb.quota = self._sb.quota
                writer._write_superblock()
            finally:
                writer._close_device()
            self.store.release_device(tmp)
            self._close_device_keep_lock()
            self.store.release_device(self.image_path)
            os.replace(tmp, self.image_path)
            fsync_dir(self.path)
            self._reopen_after_swap()

    def _emit_compacted(self, writer: StorageUnit) -> None:
        for volume in sorted(self._volumes, key=lambda n: self._volumes[n]):
            writer._commit_meta(fmt.T_VOLUME, volume.encode(), self._volumes[volume])
        prev = State()
        order: list[tuple[str | None, State]] = [*self._snapshots.items(), (None, self._cur)]
        for name, state in order:
            for vol in sorted(set(prev.blocks) | set(state.blocks)):
                old = prev.blocks.get(vol, ExtentMap())
                new = state.blocks.get(vol, ExtentMap())
                for start, count in gone_runs(old, new):
                    writer._commit_trim(vol, start, count)
                for ext in changed_runs(old, new):
                    data = self._read_blocks(state, self._volume_names[vol], ext.start, ext.end)
                    writer._write_locked(self._volume_names[vol], ext.start * fmt.BLOCK, memoryview(data))
            for obj in sorted(set(prev.objects) - set(state.objects)):
                writer._commit_meta(fmt.T_OBJECT_DEL, obj.encode())
            for obj, value in sorted(state.objects.items()):
                if prev.objects.get(obj) != value:
                    raw = obj.encode()
                    writer._commit_meta(fmt.T_OBJECT_PUT, struct.pack("<H", len(raw)) + raw + value)
            if name is not None:
                writer._commit_meta(fmt.T_SNAPSHOT, name.encode())
            prev = state

    def _commit_trim(self, vol: int, start: int, count: int) -> None:
        self._prepare(fmt.REC_HEADER, None)
        head = fmt.pack_header(
            fmt.T_TRIM, self._sb.epoch, count, self._next_seq(), self._owner, vol, start, 0, b""
        )
        pos = self._append([(head, [])], None)
        h = fmt.unpack_header(head)
        assert h is not None
        self._apply(h, pos, memoryview(b""), memoryview(b""))

    def _close_device_keep_lock(self) -> None:
        if self._dev is not None:
            with contextlib.suppress(OSError):
                self._dev.close()
            self._dev = None

    def _reopen_after_swap(self) -> None:
        # The writer lock (held on the directory's lock file) stays taken across the swap.
        self._dev = None
        self._open(writable=True)

    # --------------------------------------------------------------- delete
    def delete(self) -> None:
        """Delete the unit: mark it destroyed (durably), then remove its directory."""
        with self._lock:
            if self._deleted:
                return
            self._ensure(writable=True)
            self._sb.flags |= fmt.FLAG_DESTROYED
            self._write_superblock()
            self._close_device()
            self.store.release_device(self.image_path)
            self.store.remove_dir(self)
            self._deleted = True

    @property
    def deleted(self) -> bool:
        return self._deleted

    # ------------------------------------------------ discard, content identity
    def discard(self, volume: str, offset: int, length: int) -> None:
        """Make a byte range unwritten again (reads return zeros); durable at the next flush.

        Whole blocks in the range are dropped from the index with a trim
        record; partial blocks at its edges are written with zeros.
        """
        with self._lock:
            self._check_volume(volume)
            if isinstance(length, bool) or not isinstance(length, int) or length < 0:
                raise InvalidArgument("length", length, "a byte count >= 0")
            self._check_range(offset, length)
            vol = self._volumes.get(volume)
            if not length or vol is None:
                return
            end = offset + length
            first = -(-offset // fmt.BLOCK)
            last = end // fmt.BLOCK
            if first >= last:  # inside one block
                self.write(volume, offset, bytes(length))
                return
            if offset < first * fmt.BLOCK:
                self.write(volume, offset, bytes(first * fmt.BLOCK - offset))
            if end > last * fmt.BLOCK:
                self.write(volume, last * fmt.BLOCK, bytes(end - last * fmt.BLOCK))
            emap = self._cur.blocks.get(vol)
            written = emap.lookup(first, last) if emap else []
            for ext in written:
                for start, count in _split(ext.start, ext.end):
                    self._commit_trim(vol, start, count)

            # Discarded blocks read as zeros from now on: the invariant ledgers forget them.
            def outside(item: tuple[int, Extent]) -> bool:
                v, e = item
                return v != vol or e.end <= first or e.start >= last

            self._pending_extents = [item for item in self._pending_extents if outside(item)]
            self._acked = deque(item for item in self._acked if outside(item))
            self._acked_blocks = sum(e.count for _, e in self._acked)

    def iter_volume(
        self, volume: str, *, snapshot: str | None = None, chunk: int = _CHUNK_BLOCKS
    ) -> Iterator[tuple[int, OwnedBytes, bool]]:
        """The volume's logical bytes in order: ``(offset, data, written)`` per chunk of blocks.

        ``written`` is False for a chunk with no written block (its data is
        zeros), so exporters can leave holes.  Every written block is
        verified against its crc32c as it is read.
        """
        if isinstance(chunk, bool) or not isinstance(chunk, int) or not 0 < chunk <= fmt.MAX_EXTENT_BLOCKS:
            raise InvalidArgument("chunk", chunk, f"a block count in 1..{fmt.MAX_EXTENT_BLOCKS}")
        with self._lock:
            self._check_volume(volume)
            self._ensure()
            state = self._state(snapshot)
            vol = self._volumes.get(volume)
            emap = (state.blocks.get(vol) if vol is not None else None) or ExtentMap()
            end = emap.end_block
        for b in range(0, end, chunk):
            hi = min(b + chunk, end)
            with self._lock:
                self._ensure()
                written = bool(emap.lookup(b, hi))
                data = self._read_blocks(state, volume, b, hi) if written else bytearray((hi - b) * fmt.BLOCK)
            yield b * fmt.BLOCK, OwnedBytes(data, self.vm_id), written

    def changed_since(self, snapshot: str) -> list[str]:
        """Volumes and ``object:<name>`` entries whose current state differs from ``snapshot``.

        Decided from the index (which stored data each block points at), so
        nothing is read: a block written again with the same bytes counts as changed.
        """
        with self._lock:
            self._ensure()
            old = self._state(snapshot)
            cur = self._cur
            out: list[str] = []
            for name, vol in sorted(self._volumes.items()):
                before = old.blocks.get(vol) or ExtentMap()
                now = cur.blocks.get(vol) or ExtentMap()
                if next(changed_runs(before, now), None) or next(gone_runs(before, now), None):
                    out.append(name)
            for obj in sorted(set(old.objects) | set(cur.objects)):
                if old.objects.get(obj) != cur.objects.get(obj):
                    out.append(f"object:{obj}")
            return out

    def content_id(self, volume: str, *, snapshot: str | None = None) -> str:
        """BLAKE3 (hex) of the volume's logical bytes: equal to ``b3sum`` of its raw export.

        The logical size runs to the last written block; unwritten blocks
        before it count as zeros.  Two volumes (in any units, or a volume and
        a snapshot of it) hold the same data exactly when their ids are equal.
        """
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        for _, data, _ in self.iter_volume(volume, snapshot=snapshot):
            hasher.update(data)
        return str(hasher.hexdigest())

    def content_ids(self, *, snapshot: str | None = None) -> dict[str, str]:
        """Volume name and ``object:<name>`` -> BLAKE3 hex of every written volume and named object."""
        with self._lock:
            self._ensure()
            state = self._state(snapshot)
            # A volume with nothing written in this state has no content (an empty volume is no volume).
            names = sorted(name for name, vol in self._volumes.items() if state.blocks.get(vol))
            objects = dict(state.objects)
        out = {name: self.content_id(name, snapshot=snapshot) for name in names}
        for name, value in sorted(objects.items()):
            out[f"object:{name}"] = str(blake3.blake3(value).hexdigest())
        return out

    def export_volume(
        self,
        volume: str,
        path: str | os.PathLike[str],
        *,
        format: str = "raw",
        snapshot: str | None = None,
        overwrite: bool = False,
    ) -> str:
        """Write the volume to a raw or qcow2 image file; returns its content id (BLAKE3 hex)."""
        from vmk_storage import images

        return images.export_volume(
            self, volume, Path(path), image_format=format, snapshot=snapshot, overwrite=overwrite
        )

    def import_volume(self, volume: str, path: str | os.PathLike[str], *, format: str | None = None) -> str:
        """Make the volume a copy of a qcow2 (or, with ``format="raw"``, raw) image; returns its content id.

        The import is flushed (acknowledged) before this returns; see
        :func:`vmk_storage.images.import_volume` for the checks made on the file.
        """
        from vmk_storage import images

        return images.import_volume(self, volume, Path(path), image_format=format)

    def replicate_to(self, target: UnitStore, *, force: bool = False) -> dict[str, Any]:
        """Bring this unit's replica in another store up to date, shipping only new log records.

        Returns ``{"mode": "full" | "incremental" | "up-to-date", "bytes": n, "log_end": ...,
        "sequence": ...}``.  A replica written on its own since raises
        :class:`~vmkernel.errors.ReplicaDiverged` unless ``force=True``; see
        :mod:`vmk_storage.replicate`.
        """
        from vmk_storage import replicate

        return replicate.replicate(self, target, force=force)

    # ------------------------------------------------------- introspection
    def volumes(self) -> dict[str, dict[str, Any]]:
        """Volume name -> role, logical size (bytes up to the last written block) and block count."""
        with self._lock:
            self._ensure()
            out: dict[str, dict[str, Any]] = {}
            for name, vol in sorted(self._volumes.items()):
                emap = self._cur.blocks.get(vol, ExtentMap())
                out[name] = {
                    "role": volume_role(name),
                    "size": emap.end_block * fmt.BLOCK,
                    "blocks": emap.block_count,
                }
            return out

    def info(self) -> dict[str, Any]:
        with self._lock:
            self._ensure()
            return {
                "vm_id": self.vm_id,
                "backend": self.backend,
                "image_bytes": self._end,
                "quota": self._sb.quota or None,
                "volumes": self.volumes(),
                "objects": sorted(self._cur.objects),
                "snapshots": sorted(self._snapshots),
                "epoch": self._sb.epoch,
                "generation": self._sb.generation,
                "clean": not self._sb.flags & fmt.FLAG_DIRTY,
                "torn_tail": self.torn_tail,
            }

    def stamps(self) -> Iterator[Stamp]:
        """Every record's stamp, scanned from the image (a fresh read-only pass)."""
        found: list[Stamp] = []
        self.check(visit=found.append)
        return iter(found)

    def check(self, visit: Callable[[Stamp], None] | None = None) -> list[Problem]:
        """Scan the whole image: both superblocks, every checksum and owner stamp.

        Read-only: nothing is written, no lock is taken; an open writer is
        flushed first so the scan sees acknowledged state.  Typed errors that
        would stop an open are returned as problems.
        """
        with self._lock:
            if self._writable:
                self.flush()
        probe = StorageUnit(self.store, self.vm_id, self.path)
        problems: list[Problem] = []
        try:
            probe._dev = self.store.open_device(self.image_path, writable=False)
            probe._read_superblock()
            for slot, ok in enumerate(probe._sb_slot_ok):
                if not ok:
                    problems.append(
                        Problem(
                            self.vm_id,
                            slot * fmt.SB_SLOT,
                            "superblock",
                            f"slot {slot} is invalid (the other one is used)",
                        )
                    )

            def stamp_check(s: Stamp) -> None:
                if s.owner != self.vm_id:
                    problems.append(Problem(self.vm_id, s.pos, "owner", f"record stamped {s.owner}"))
                if visit is not None:
                    visit(s)

            probe._scan(visit=stamp_check, verify_all=True, problems=problems)
            if probe.torn_tail is not None:
                problems.append(
                    Problem(
                        self.vm_id,
                        probe.torn_tail[0],
                        "torn-tail",
                        f"{probe.torn_tail[1]}; never acknowledged, ignored on open",
                    )
                )
        except StorageError as exc:
            problems.append(Problem(self.vm_id, exc.offset, type(exc).__name__, str(exc)))
        except UnknownResource as exc:
            problems.append(Problem(self.vm_id, None, "missing", str(exc)))
        except OSError as exc:
            problems.append(Problem(self.vm_id, None, "device", str(exc)))
        finally:
            probe._close_device()
        return problems

    def verify_stamps(self) -> str | None:
        """Scan records appended since the last call; a violation string or ``None``."""
        with self._lock:
            if self._dev is None:
                return None
            pos = self._stamps_verified
            win = _Window(self._dev)
            while pos < self._end:
                h = fmt.unpack_header(win.get(pos, fmt.REC_HEADER))
                if h is None:
                    return f"unit {self.vm_id}: no record header at image offset {pos}"
                if h.owner != self._owner:
                    return f"unit {self.vm_id}: record at {pos} stamped {fmt.owner_str(h.owner)}"
                pos += h.total_len
            if pos != self._end:
                return f"unit {self.vm_id}: records end at {pos}, log end is {self._end}"
            self._stamps_verified = pos
            return None

    def verify_acknowledged(self) -> str | None:
        """Re-read recently acknowledged blocks; a violation string or ``None``."""
        with self._lock:
            if self._dev is None:
                return None
            # Newest first: a block written again later is judged by its latest acknowledged write;
            # blocks written again since the last flush are not acknowledged yet.
            seen = {(vol, b) for vol, e in self._pending_extents for b in range(e.start, e.end)}
            for vol, ext in reversed(self._acked):
                name = self._volume_names[vol]
                for b in range(ext.start, ext.end):
                    want = ext.crc_at(b)
                    if (vol, b) in seen:
                        continue
                    seen.add((vol, b))
                    try:
                        data = self._read_blocks(self._cur, name, b, b + 1)
                    except StorageError as exc:
                        return f"unit {self.vm_id}: acknowledged block {b} of {name} unreadable: {exc}"
                    if fmt.crc(data) != want:
                        return (
                            f"unit {self.vm_id}: acknowledged block {b} of {name} reads back different data"
                        )
            return None


def _runs(emap: ExtentMap) -> Iterator[tuple[int, int]]:
    """Runs ``(start, count)`` of consecutive written blocks, each at most one record long."""
    start = end = -1
    for ext in emap:
        if ext.start != end:
            if end > start:
                yield from _split(start, end)
            start = ext.start
        end = ext.end
    if end > start:
        yield from _split(start, end)


def _split(start: int, end: int) -> Iterator[tuple[int, int]]:
    for lo in range(start, end, fmt.MAX_EXTENT_BLOCKS):
        yield lo, min(fmt.MAX_EXTENT_BLOCKS, end - lo)
