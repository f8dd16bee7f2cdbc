"""Replication of a unit into another store: same owner, same log, shipped incrementally.

Design note.  A unit's log is append-only, so a replica that holds a prefix
of the source's log catches up by receiving the bytes past its end: the
records written since the last replication, nothing else.  A replica is an
ordinary unit of the same VM in another store (another directory or the
other backend); it opens, reads, snapshots and checks like any unit.

One replication:

1. flushes the source (only acknowledged data is shipped) and reads what it
   ships under the source's lock, so no write interleaves;
2. decides the mode from the replica's bookkeeping file (``replica.json`` in
   its directory: the source position and sequence it holds):

   * no replica: create one and ship the whole log (``full``);
   * the replica's log is still a prefix of the source's (its last record is
     byte-identical at the same position): ship the suffix (``incremental``,
     or ``up-to-date`` when there is none);
   * the source's log was rewritten (compaction): delete the replica and ship
     everything again (``full``);
   * the replica was written since it was last replicated, or the unit there
     is not a replica: :class:`ReplicaDiverged`, unless ``force=True`` (then
     the replica is replaced);

3. verifies every shipped record (sequence chain, epoch, owner stamp, header
   and block checksums) *before* the replica's superblock names the new end,
   so a damaged source never damages a replica: the replica keeps its old
   state and the error names the source offset;
4. writes the replica's superblock (synced) and then its bookkeeping file.

A crash at any point leaves the replica at its old checkpoint or at the new
one; bytes shipped past an old checkpoint are a torn tail its next writer cuts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from vmk_storage import format as fmt
from vmk_storage.device import Device, fsync_dir
from vmk_storage.unit import IMAGE
from vmkernel.errors import CorruptUnit, InvalidArgument, ReplicaDiverged, UnitBusy

if TYPE_CHECKING:
    from vmk_storage.store import UnitStore
    from vmk_storage.unit import StorageUnit

STATE_FILE = "replica.json"
_SHIP_CHUNK = 8 << 20


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        value = orjson.loads((path / STATE_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _write_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path / (STATE_FILE + ".tmp")
    with open(tmp, "wb") as f:
        f.write(orjson.dumps(state, option=orjson.OPT_SORT_KEYS))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / STATE_FILE)
    fsync_dir(path)


def _newest_superblock(dev: Device) -> fmt.Superblock | None:
    raw = dev.pread(fmt.LOG_START, 0)
    found = []
    for slot in (0, 1):
        with contextlib.suppress(fmt.SuperblockProblem):
            found.append(fmt.unpack_superblock(raw[slot * fmt.SB_SLOT : (slot + 1) * fmt.SB_SLOT]))
    return max(found, key=lambda s: s.generation) if found else None


class ChainCheck:
    """Verifies shipped image bytes record by record as they stream past.

    ``feed`` takes the next bytes of the log (positions follow on), checks
    every record it completes (sequence chain, epoch, owner stamp, header and
    block checksums) and keeps an incomplete last record for the next call;
    any problem is :class:`CorruptUnit` naming its image offset.
    """

    def __init__(
        self, unit_id: str, base: int, seq: int, epoch: int, epoch_limit: int, digest: bytes = b""
    ) -> None:
        self.unit_id = unit_id
        self.owner = fmt.owner_bytes(unit_id)
        self.pos = base  # image position of the first byte of ``self.carry``
        self.carry = b""  # an incomplete record at the end of the last chunk
        self.seq, self.epoch, self.epoch_limit = seq, epoch, epoch_limit
        self.digest = digest  # chained over every record header so far (see log_digest)

    def _corrupt(self, at: int, problem: str, value: Any, expected: str) -> CorruptUnit:
        return CorruptUnit(self.unit_id, at, f"{problem} (while replicating)", value, expected)

    def feed(self, data: bytes) -> None:
        # Usually nothing is carried over and ``data`` (immutable) is read in place; otherwise the
        # incomplete record from the last chunk is joined to it.
        view = memoryview(self.carry + data if self.carry else data)
        off = 0
        while len(view) - off >= fmt.REC_HEADER:
            at = self.pos + off
            h = fmt.unpack_header(view[off : off + fmt.REC_HEADER])
            if h is None:
                raise self._corrupt(at, "no record header", bytes(view[off : off + 8]), "a record of the log")
            problem = fmt.chain_problem(h, self.seq, self.epoch, self.epoch_limit)
            if problem is not None:
                raise self._corrupt(
                    at, problem, (h.rtype, h.seq, h.epoch), f"the record after sequence {self.seq}"
                )
            if h.owner != self.owner:
                raise self._corrupt(
                    at, "record stamped with another VM", fmt.owner_str(h.owner), self.unit_id
                )
            if len(view) - off < h.total_len:
                break  # the rest of this record comes with the next chunk
            cover = h.covered_len
            covered = view[off + fmt.REC_HEADER : off + fmt.REC_HEADER + cover]
            if not fmt.header_crc_ok(view[off : off + fmt.REC_HEADER], covered):
                raise self._corrupt(at, "record header checksum mismatch", h.header_crc, "intact header")
            if h.rtype == fmt.T_BLOCKS:
                data_at = off + fmt.REC_HEADER + cover
                bad = fmt.first_bad_block(view[data_at : data_at + fmt.BLOCK * h.count], covered)
                if bad is not None:
                    raise self._corrupt(
                        self.pos + data_at + bad * fmt.BLOCK,
                        f"block {h.offset + bad} fails its checksum",
                        "crc32c mismatch",
                        "intact data",
                    )
            self.seq, self.epoch = h.seq, h.epoch
            self.digest = chain(self.digest, view[off : off + fmt.REC_HEADER])
            off += h.total_len
        self.carry = bytes(view[off:])
        self.pos += off

    def finish(self, end: int) -> None:
        if self.carry or self.pos != end:
            raise self._corrupt(
                self.pos, "log ends inside a record", len(self.carry), f"whole records up to {end}"
            )


def chain(digest: bytes, header: bytes | memoryview) -> bytes:
    """One step of the log identity: SHA-256 over the previous digest and one record header.

    A header carries the record's sequence, stamp and the checksum of its
    contents, so two logs with equal digests at a position hold the same
    records up to it (a compaction that rewrote the log changes it).
    """
    return hashlib.sha256(digest + bytes(header)).digest()


def log_digest(dev: Device, end: int) -> bytes | None:
    """The chained header digest of the log from its start to ``end``; ``None`` if no record ends there."""
    digest, pos = b"", fmt.LOG_START
    while pos < end:
        raw = dev.pread(fmt.REC_HEADER, pos)
        h = fmt.unpack_header(raw)
        if h is None:
            return None
        digest = chain(digest, raw)
        pos += h.total_len
    return digest if pos == end else None


def _take_lock(path: Path, vm_id: str) -> int:
    fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UnitBusy(
            vm_id, None, "the replica is open for writing", "locked", "no writer on the replica"
        ) from None
    return fd


def replicate(unit: StorageUnit, target: UnitStore, *, force: bool = False) -> dict[str, Any]:
    """Bring the replica of ``unit`` in ``target`` up to the unit's acknowledged state."""
    from vmk_storage.store import UnitStore

    if not isinstance(target, UnitStore):
        raise InvalidArgument("target", type(target).__name__, "a UnitStore (another directory or backend)")
    if target.root.resolve() == unit.store.root.resolve():
        raise InvalidArgument("target", str(target.root), "a store other than the unit's own")
    vm_id = unit.vm_id
    with unit._lock:
        src = unit._ensure()
        if unit._writable:
            unit.flush()
        source = _Source(src, unit._sb, unit._end, unit._seq)
        cached = target._units.get(vm_id)
        if cached is not None and cached._writable:
            raise UnitBusy(
                vm_id, None, "the replica is open for writing in the target store", "open", "no writer"
            )
        final = target.path_of(vm_id)
        mode = "full"
        if target.exists(vm_id):
            mode = _plan(unit, target, _read_state(final), src, source.end, force)
        if cached is not None:
            cached._close_device()  # a reader's index is about to be stale: it reopens on next use
        if mode == "full":
            shipped = _full_copy(vm_id, source, target)
        else:
            shipped = _catch_up(vm_id, source, target, final)
    if mode == "incremental" and shipped == 0:
        mode = "up-to-date"
    return {"mode": mode, "bytes": shipped, "log_end": source.end, "sequence": source.seq}


class _Source:
    """What a replication ships: the source device and its state, read under the source's lock."""

    def __init__(self, dev: Device, sb: fmt.Superblock, end: int, seq: int) -> None:
        self.dev, self.sb, self.end, self.seq = dev, sb, end, seq


def _ship(vm_id: str, source: _Source, dev: Device, check: ChainCheck, start: int, kind: str) -> int:
    """Copy and verify the log from ``start`` to the source's end, then name it in a superblock."""
    shipped = 0
    for pos in range(start, source.end, _SHIP_CHUNK):
        n = min(_SHIP_CHUNK, source.end - pos)
        data = source.dev.pread(n, pos)
        if len(data) != n:
            raise CorruptUnit(vm_id, pos + len(data), "source image ends early", len(data), f"{n} bytes")
        check.feed(data)  # before any superblock of the replica names these bytes
        dev.pwrite([data], pos)
        shipped += n
    check.finish(source.end)
    if check.seq != source.seq:
        raise CorruptUnit(vm_id, source.end, "shipped log ends early", check.seq, f"sequence {source.seq}")
    dev.flush()
    sb = _newest_superblock(dev)
    if sb is None:
        raise CorruptUnit(vm_id, 0, "replica has no valid superblock", None, "one valid superblock")
    sb.generation += 1
    sb.epoch = max(sb.epoch, source.sb.epoch)
    sb.incompat, sb.compat, sb.autoclear = source.sb.incompat, source.sb.compat, 0
    sb.flags = 0  # clean
    sb.quota = source.sb.quota
    sb.checkpoint_pos = sb.durable_pos = source.end
    sb.checkpoint_seq = sb.durable_seq = source.seq
    sb.backend = kind
    dev.pwrite([sb.pack().ljust(fmt.SB_SLOT, b"\0")], sb.slot_offset)
    dev.flush()
    if kind == "local" and dev.size() > source.end:
        dev.truncate(source.end)  # nothing past the log: a later scan finds no tail
    return shipped


def _state_of(source: _Source, check: ChainCheck) -> dict[str, Any]:
    return {"end": source.end, "seq": source.seq, "epoch": check.epoch, "digest": check.digest.hex()}


def _catch_up(vm_id: str, source: _Source, target: UnitStore, final: Path) -> int:
    state = _read_state(final)
    assert state is not None
    lock = _take_lock(final, vm_id)
    try:
        dev = target.open_device(final / IMAGE, writable=True)
        try:
            check = ChainCheck(
                vm_id,
                state["end"],
                state["seq"],
                state["epoch"],
                source.sb.epoch,
                bytes.fromhex(state["digest"]),
            )
            shipped = _ship(vm_id, source, dev, check, state["end"], target.backend_kind)
        finally:
            dev.close()
        _write_state(final, _state_of(source, check))
    finally:
        os.close(lock)
    return shipped


def _full_copy(vm_id: str, source: _Source, target: UnitStore) -> int:
    """Ship the whole log into a staging directory, then swap it in for any old replica."""
    staging = target.root / f".replica-{vm_id}"
    target.release_device(staging / IMAGE)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        target.new_image(staging, vm_id, quota=source.sb.quota or None)
        dev = target.open_device(staging / IMAGE, writable=True)
        try:
            check = ChainCheck(vm_id, fmt.LOG_START, 0, 0, source.sb.epoch)
            shipped = _ship(vm_id, source, dev, check, fmt.LOG_START, target.backend_kind)
        finally:
            dev.close()
        target.release_device(staging / IMAGE)
        _write_state(staging, _state_of(source, check))
        if target.exists(vm_id):
            target.get(vm_id).delete()  # takes its writer lock: UnitBusy while another writer has it
        os.rename(staging, target.path_of(vm_id))
        fsync_dir(target.root)
    except BaseException:
        target.release_device(staging / IMAGE)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return shipped


def _plan(
    unit: StorageUnit, target: UnitStore, state: dict[str, Any] | None, src: Device, src_end: int, force: bool
) -> str:
    """``incremental`` or ``full`` for an existing replica; ReplicaDiverged when it was written."""
    vm_id = unit.vm_id
    if state is None or not {"end", "seq", "epoch", "digest"} <= set(state):
        if force:
            return "full"
        raise ReplicaDiverged(
            vm_id,
            None,
            "the target store holds a unit of this VM that is not a replica",
            str(target.root),
            "a replica",
        )
    dev = target.open_device(target.path_of(vm_id) / IMAGE, writable=False)
    try:
        sb = _newest_superblock(dev)
    finally:
        dev.close()
    current = (sb.checkpoint_pos, sb.checkpoint_seq) if sb is not None else None
    if current != (state["end"], state["seq"]):
        if force:
            return "full"
        raise ReplicaDiverged(
            vm_id,
            state["end"],
            "the replica was written since it was last replicated",
            {"checkpoint": current},
            f"log end {state['end']} and sequence {state['seq']} (or force=True to replace it)",
        )
    if state["end"] > src_end:
        return "full"  # the source's log is shorter now: it was rewritten (compaction)
    mine = log_digest(src, state["end"])
    return "incremental" if mine is not None and mine.hex() == state["digest"] else "full"
