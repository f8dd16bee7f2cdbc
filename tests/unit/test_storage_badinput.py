"""Damaged and hostile unit images: each gets a typed error naming the unit and the offset,
and no other unit changes.  Run on the local backend and through a real qemu-nbd."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from vmk_storage import UnitStore
from vmk_storage import format as fmt
from vmk_storage import testing as storage_testing
from vmk_storage.testing import new_vm_id, unit_digest
from vmk_storage.unit import IMAGE

from vmkernel.errors import (
    BadMagic,
    CorruptUnit,
    DiskFull,
    OwnerMismatch,
    TruncatedUnit,
    UnitDestroyed,
    UnknownFeature,
    UnknownResource,
)

# Fixtures shared by the storage suites (storage_backend runs each test on local and NBD).
make_store = storage_testing.make_store
storage_backend = storage_testing.storage_backend


def newest_superblock(image: Path) -> fmt.Superblock:
    raw = image.read_bytes()[: fmt.LOG_START]
    found = []
    for slot in (0, 1):
        with contextlib.suppress(fmt.SuperblockProblem):
            found.append(fmt.unpack_superblock(raw[slot * fmt.SB_SLOT : (slot + 1) * fmt.SB_SLOT]))
    return max(found, key=lambda s: s.generation)


def write_superblock(image: Path, sb: fmt.Superblock) -> None:
    """Write ``sb`` as the next generation (valid checksum), like a writer would."""
    sb.generation += 1
    with open(image, "r+b") as f:
        f.seek(sb.slot_offset)
        f.write(sb.pack())


def flip(image: Path, offset: int, bit: int = 0) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def append_record(
    image: Path, rtype: int, *, owner: bytes, volume: int, offset: int, count: int, body: bytes
) -> int:
    """Append a record with valid checksums inside the checkpoint; returns its image offset."""
    sb = newest_superblock(image)
    pos = sb.checkpoint_pos
    if rtype == fmt.T_BLOCKS:
        table = fmt.crc_table(body)
        head = fmt.pack_header(rtype, sb.epoch, count, sb.checkpoint_seq + 1, owner, volume, offset, 0, table)
        rec = head + table + body
    else:
        head = fmt.pack_header(
            rtype, sb.epoch, count, sb.checkpoint_seq + 1, owner, volume, offset, len(body), body
        )
        rec = head + body
    with open(image, "r+b") as f:
        f.seek(pos)
        f.write(rec)
    sb.checkpoint_pos = sb.durable_pos = pos + len(rec)
    sb.checkpoint_seq += 1
    sb.durable_seq = sb.checkpoint_seq
    write_superblock(image, sb)
    return pos


class Pair:
    """A victim unit and a bystander unit, both with acknowledged data, stores closed."""

    def __init__(self, make_store):
        self.make_store = make_store
        store = make_store()
        self.victim = store.create(new_vm_id()).vm_id
        self.other = store.create(new_vm_id()).vm_id
        for i, vm in enumerate((self.victim, self.other)):
            u = store.get(vm)
            u.write("disk0", 0, bytes([65 + i]) * (3 * fmt.BLOCK))
            u.put_object("meta", b"m")
            u.flush()
        self.other_digest = unit_digest(store.get(self.other))
        store.close()
        self.root = store.root
        self.image = self.root / self.victim / IMAGE
        self.other_image = (self.root / self.other / IMAGE).read_bytes()

    def first_record_pos(self, rtype: int) -> int:
        raw = self.image.read_bytes()
        pos = fmt.LOG_START
        while True:
            h = fmt.unpack_header(raw[pos : pos + fmt.REC_HEADER])
            assert h is not None
            if h.rtype == rtype:
                return pos
            pos += h.total_len

    def reopen(self) -> UnitStore:
        return self.make_store(self.root)

    def assert_bystander_untouched(self, store: UnitStore) -> None:
        assert (self.root / self.other / IMAGE).read_bytes() == self.other_image
        unit = store.get(self.other)
        assert unit_digest(unit) == self.other_digest
        assert unit.check() == []
        unit.write("disk0", 0, b"still writable")
        unit.flush()


@pytest.fixture
def pair(make_store):
    return Pair(make_store)


def test_bit_flip_in_data_is_reported_with_its_offset(pair):
    pos = pair.first_record_pos(fmt.T_BLOCKS)
    data_pos = pos + fmt.REC_HEADER + 4 * 3 + fmt.BLOCK  # second block of the record
    flip(pair.image, data_pos + 17, 3)
    store = pair.reopen()
    unit = store.get(pair.victim)
    assert unit.read("disk0", 0, fmt.BLOCK) == b"A" * fmt.BLOCK  # intact blocks still read
    with pytest.raises(CorruptUnit) as err:
        unit.read("disk0", fmt.BLOCK, 10)
    assert err.value.unit == pair.victim and err.value.offset == data_pos
    assert pair.victim in str(err.value) and str(data_pos) in str(err.value)
    problems = unit.check()
    assert [(p.kind, p.offset) for p in problems] == [("checksum", data_pos)]
    pair.assert_bystander_untouched(store)


def test_bit_flip_in_record_header_refuses_open(pair):
    pos = pair.first_record_pos(fmt.T_BLOCKS)
    flip(pair.image, pos + 30, 1)  # inside the owner stamp
    store = pair.reopen()
    with pytest.raises(CorruptUnit) as err:
        store.get(pair.victim).read("disk0", 0, 1)
    assert err.value.offset == pos and "checksum" in str(err.value)
    assert [p.offset for p in store.get(pair.victim).check()] == [pos]
    pair.assert_bystander_untouched(store)


def test_bit_flip_in_crc_table_refuses_open(pair):
    pos = pair.first_record_pos(fmt.T_BLOCKS)
    flip(pair.image, pos + fmt.REC_HEADER + 2, 0)
    store = pair.reopen()
    with pytest.raises(CorruptUnit) as err:
        store.get(pair.victim).objects()
    assert err.value.offset == pos
    pair.assert_bystander_untouched(store)


def test_truncated_log_is_typed(pair):
    checkpoint = newest_superblock(pair.image).checkpoint_pos
    os.truncate(pair.image, checkpoint - 100)
    store = pair.reopen()
    with pytest.raises(TruncatedUnit) as err:
        store.get(pair.victim).read("disk0", 0, 1)
    assert err.value.unit == pair.victim and err.value.offset is not None
    assert err.value.offset < checkpoint
    pair.assert_bystander_untouched(store)


def test_truncated_header_is_typed(pair):
    os.truncate(pair.image, 100)
    store = pair.reopen()
    with pytest.raises(TruncatedUnit) as err:
        store.get(pair.victim).read("disk0", 0, 1)
    assert err.value.offset in (100, 512)  # NBD exports round a size up to 512 bytes
    pair.assert_bystander_untouched(store)


def test_bad_magic_in_both_superblocks(pair):
    for slot in (0, 1):
        flip(pair.image, slot * fmt.SB_SLOT, 2)
    store = pair.reopen()
    with pytest.raises(BadMagic) as err:
        store.get(pair.victim).objects()
    assert err.value.offset == 0 and "magic" in str(err.value)
    assert isinstance(err.value, CorruptUnit)
    pair.assert_bystander_untouched(store)


def test_one_damaged_superblock_falls_back_to_the_other(pair):
    sb = newest_superblock(pair.image)
    flip(pair.image, sb.slot_offset + 40, 5)  # checksum no longer matches
    store = pair.reopen()
    unit = store.get(pair.victim)
    assert unit.read("disk0", 0, 3) == b"AAA"
    assert [(p.kind, p.offset) for p in unit.check()] == [("superblock", sb.slot_offset)]
    unit.write("disk0", 0, b"Z")  # a writer rewrites the bad slot next
    unit.flush()
    unit.flush()
    unit.write("disk0", 1, b"Z")
    unit.flush()
    assert unit.check() == []
    pair.assert_bystander_untouched(store)


def test_unknown_incompatible_feature_refuses_open(pair):
    sb = newest_superblock(pair.image)
    sb.incompat |= 1 << 17
    write_superblock(pair.image, sb)
    store = pair.reopen()
    with pytest.raises(UnknownFeature) as err:
        store.get(pair.victim).read("disk0", 0, 1)
    assert err.value.offset == sb.slot_offset and hex(1 << 17) in str(err.value)
    pair.assert_bystander_untouched(store)


def test_unknown_compatible_feature_is_ignored(pair):
    sb = newest_superblock(pair.image)
    sb.compat |= 1 << 9
    write_superblock(pair.image, sb)
    store = pair.reopen()
    assert store.get(pair.victim).read("disk0", 0, 2) == b"AA"


def test_out_of_range_index_entries(pair):
    owner = fmt.owner_bytes(pair.victim)
    pos = append_record(
        pair.image, fmt.T_BLOCKS, owner=owner, volume=77, offset=0, count=1, body=bytes(fmt.BLOCK)
    )
    store = pair.reopen()
    with pytest.raises(CorruptUnit) as err:
        store.get(pair.victim).read("disk0", 0, 1)
    assert err.value.offset == pos and "undeclared volume" in str(err.value)
    pair.assert_bystander_untouched(store)


def test_block_index_beyond_the_volume_limit(pair):
    owner = fmt.owner_bytes(pair.victim)
    pos = append_record(
        pair.image,
        fmt.T_BLOCKS,
        owner=owner,
        volume=0,
        offset=fmt.MAX_VOLUME_BLOCKS,
        count=1,
        body=bytes(fmt.BLOCK),
    )
    store = pair.reopen()
    with pytest.raises(CorruptUnit) as err:
        store.get(pair.victim).objects()
    assert err.value.offset == pos and "out of range" in str(err.value)


def test_image_of_another_vm_in_this_units_directory(pair):
    shutil.copyfile(pair.root / pair.other / IMAGE, pair.image)
    store = pair.reopen()
    with pytest.raises(OwnerMismatch) as err:
        store.get(pair.victim).read("disk0", 0, 1)
    assert err.value.unit == pair.victim and pair.other in str(err.value)
    assert err.value.offset in (0, fmt.SB_SLOT)
    pair.assert_bystander_untouched(store)


def test_record_stamped_with_another_vm(pair):
    pos = append_record(
        pair.image,
        fmt.T_BLOCKS,
        owner=fmt.owner_bytes(pair.other),
        volume=0,
        offset=9,
        count=1,
        body=b"B" * fmt.BLOCK,
    )
    store = pair.reopen()
    with pytest.raises(OwnerMismatch) as err:
        store.get(pair.victim).read("disk0", 0, 1)
    assert err.value.offset == pos and pair.other in str(err.value)
    assert [p.kind for p in store.get(pair.victim).check()] == ["OwnerMismatch"]
    pair.assert_bystander_untouched(store)


def test_unit_directory_of_a_destroyed_vm(pair):
    sb = newest_superblock(pair.image)
    sb.flags |= fmt.FLAG_DESTROYED  # a deletion interrupted after its first durable step
    write_superblock(pair.image, sb)
    store = pair.reopen()
    with pytest.raises(UnitDestroyed) as err:
        store.get(pair.victim).read("disk0", 0, 1)
    assert err.value.unit == pair.victim
    assert [u.vm_id for u in store.units()] == [pair.other]
    assert store.purge() == [pair.victim]
    assert not (pair.root / pair.victim).exists()
    pair.assert_bystander_untouched(store)


def test_torn_tail_is_ignored_and_cut(pair):
    sb = newest_superblock(pair.image)
    with open(pair.image, "r+b") as f:  # half a record after the checkpoint, as a crash leaves it
        f.seek(sb.checkpoint_pos)
        f.write(
            fmt.pack_header(
                fmt.T_BLOCKS,
                sb.epoch,
                1,
                sb.checkpoint_seq + 1,
                fmt.owner_bytes(pair.victim),
                0,
                5,
                0,
                b"\0" * 4,
            )
            + b"\1\2\3"
        )
    store = pair.reopen()
    unit = store.get(pair.victim)
    assert [p.kind for p in unit.check()] == ["torn-tail"]
    assert unit.read("disk0", 5 * fmt.BLOCK, 4) == bytes(4)
    unit.write("disk0", 0, b"A")  # a writer cuts the tail
    unit.flush()
    assert unit.check() == []
    pair.assert_bystander_untouched(store)


def test_injected_enospc_is_disk_full_and_loses_nothing_acknowledged(tmp_path):
    """No small file system needed: the local device's write function fails like a full disk."""
    full = {"on": False}

    def pwritev(fd, buffers, offset):
        if full["on"]:
            total = sum(len(b) for b in buffers)
            if total > 200:  # superblock updates still fit, data does not
                os.pwritev(fd, [memoryview(buffers[0])[:37]], offset)  # a partial write first
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.pwritev(fd, buffers, offset)

    store = UnitStore(tmp_path / "units", pwritev=pwritev)
    unit, other = store.create(new_vm_id()), store.create(new_vm_id())
    unit.write("disk0", 0, b"acked" * 1000)
    unit.flush()
    other.write("disk0", 0, b"other")
    other.flush()
    full["on"] = True
    with pytest.raises(DiskFull) as err:
        unit.write("disk0", 8192, b"x" * 9000)
    assert err.value.unit == unit.vm_id and err.value.offset == 8192 and "No space" in str(err.value)
    full["on"] = False
    assert unit.read("disk0", 0, 5000) == b"acked" * 1000
    unit.write("disk0", 100_000, b"after")
    unit.flush()
    vm = unit.vm_id
    store.close()
    again = UnitStore(tmp_path / "units").get(vm)
    assert again.read("disk0", 0, 5000) == b"acked" * 1000
    assert again.read("disk0", 8192, 10) == bytes(10)  # the failed write left nothing behind
    assert again.read("disk0", 100_000, 5) == b"after"
    assert again.check() == []


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs: a real full disk.  Needs mount permission (root in CI)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs here ({done.stderr.strip()}); "
            "test_injected_enospc_is_disk_full_and_loses_nothing_acknowledged covers ENOSPC"
        )
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_full_filesystem(make_store, small_fs, tmp_path):
    store = make_store(small_fs / "units", capacity=64 << 20)
    elsewhere = make_store(tmp_path / "elsewhere")
    bystander = elsewhere.create(new_vm_id())
    bystander.write("disk0", 0, b"b" * 10_000)
    bystander.flush()
    before = unit_digest(bystander)
    unit = store.create(new_vm_id())
    acked = 0
    with pytest.raises(DiskFull) as err:
        for i in range(100):
            unit.write("disk0", i * 65536, bytes([i % 251 + 1]) * 65536)
            unit.flush()
            acked = i + 1
    assert err.value.unit == unit.vm_id
    assert 10 < acked < 40
    vm = unit.vm_id
    store.close()
    again = make_store(small_fs / "units", capacity=64 << 20).get(vm)
    for i in range(acked):
        assert again.read("disk0", i * 65536, 65536) == bytes([i % 251 + 1]) * 65536
    assert [p.kind for p in again.check() if p.kind != "torn-tail"] == []
    assert unit_digest(bystander) == before and bystander.check() == []


def test_unit_store_rejects_a_stray_directory_name(tmp_path):
    root = tmp_path / "units"
    store = UnitStore(root)
    (root / "not-a-unit").mkdir()
    (root / str(uuid.uuid4())).mkdir()  # no image: not a unit
    assert store.unit_ids() == []
    with pytest.raises(UnknownResource):
        store.get(str(uuid.uuid4())).read("disk0", 0, 1)


def test_power_loss_during_the_last_flush_is_a_torn_tail(make_store):
    """A flush writes its superblock and syncs once; if power fails mid-sync the superblock may
    be durable while the flush's records are not.  The records of that flush (after the durable
    point) are then missing: the unit opens with the previous flush's data, never an error."""
    store = make_store()
    vm = new_vm_id()
    unit = store.create(vm)
    unit.write("disk0", 0, b"first flush" * 100)
    unit.flush()
    unit.write("disk0", 0, b"second flush" * 100)
    unit.flush()
    unit._close_device()  # the process dies here: no clean close
    image = store.root / vm / IMAGE
    sb = newest_superblock(image)
    assert sb.durable_pos < sb.checkpoint_pos
    with open(image, "r+b") as f:  # the second flush's records never reached the disk
        f.seek(sb.durable_pos)
        f.write(bytes(sb.checkpoint_pos - sb.durable_pos))
    store.close()
    again = make_store().get(vm)
    assert again.read("disk0", 0, 1100) == b"first flush" * 100
    assert [p.kind for p in again.check()] == ["torn-tail"]
    with open(image, "r+b") as f:  # but losing records before the durable point is corruption
        f.seek(sb.durable_pos - 50)
        f.write(b"\xff" * 50)
    with pytest.raises(CorruptUnit):
        make_store().get(vm).read("disk0", 0, 1)


def test_ordered_sync_mode_round_trip(tmp_path):
    store = UnitStore(tmp_path / "units", sync="ordered")
    unit = store.create(new_vm_id())
    unit.write("disk0", 0, b"ordered")
    unit.flush()
    sb = newest_superblock(unit.image_path)
    assert sb.durable_pos == sb.checkpoint_pos  # records were synced before the superblock
    store.close()
    assert UnitStore(tmp_path / "units", sync="ordered").get(unit.vm_id).read("disk0", 0, 7) == b"ordered"
