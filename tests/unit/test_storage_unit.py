"""Storage unit API, run against the local backend and a real qemu-nbd (same tests)."""

from __future__ import annotations

import os
import random

import pytest
from vmk_storage import OwnedBytes, UnitStore
from vmk_storage import testing as storage_testing
from vmk_storage.format import BLOCK, LOG_START, MAX_EXTENT_BLOCKS
from vmk_storage.testing import new_vm_id, unit_digest

from vmkernel.errors import (
    CommingleRefused,
    DuplicateResource,
    InvalidArgument,
    QuotaExceeded,
    UnitBusy,
    UnitDestroyed,
    UnknownResource,
)

# Fixtures shared by the storage suites (storage_backend runs each test on local and NBD).
make_store = storage_testing.make_store
storage_backend = storage_testing.storage_backend


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_write_read_roundtrip_aligned_unaligned_and_holes(make_store):
    store = make_store()
    unit = store.create(new_vm_id())
    unit.write("disk0", 0, pattern(1, 3 * BLOCK))
    unit.write("disk0", 100, b"hello")  # inside a block
    unit.write("disk0", BLOCK - 3, b"across")  # straddles two blocks
    unit.write("disk0", 10 * BLOCK, b"")  # nothing
    unit.flush()
    expect = bytearray(pattern(1, 3 * BLOCK))
    expect[100:105] = b"hello"
    expect[BLOCK - 3 : BLOCK + 3] = b"across"
    assert unit.read("disk0", 0, 3 * BLOCK) == bytes(expect)
    assert unit.read("disk0", 5 * BLOCK, 10) == bytes(10)  # never written
    assert unit.read("swap", 0, 7) == bytes(7)  # volume never written
    assert unit.read("disk0", 7, 0) == b""


def test_large_write_spans_several_extents_and_survives_reopen(make_store, tmp_path):
    store = make_store()
    vm = new_vm_id()
    unit = store.create(vm)
    data = pattern(2, (MAX_EXTENT_BLOCKS * 2 + 5) * BLOCK + 123)
    unit.write("disk1", 777, data)
    unit.flush()
    store.close()
    again = make_store().get(vm)
    assert again.read("disk1", 777, len(data)) == data
    assert again.volumes()["disk1"]["role"] == "data"


def test_reads_carry_the_owner_and_refuse_to_commingle(make_store):
    store = make_store()
    a, b = store.create(new_vm_id()), store.create(new_vm_id())
    b.write("disk0", 0, b"secret of b" * 100)
    b.flush()
    a.write("disk0", 0, b"a" * BLOCK)
    a.flush()
    before = unit_digest(a)
    data = b.read("disk0", 0, 100)
    assert isinstance(data, OwnedBytes) and data.vm_id == b.vm_id
    with pytest.raises(CommingleRefused) as err:
        a.write("disk0", 4096, data)
    assert err.value.unit == a.vm_id and err.value.offset == 4096 and b.vm_id in str(err.value)
    with pytest.raises(CommingleRefused):
        a.write("disk0", 0, b"plain bytes", vm_id=b.vm_id)
    with pytest.raises(CommingleRefused):
        a.put_object("meta", data)
    with pytest.raises(CommingleRefused):
        a.write_config({"id": b.vm_id, "name": "b"})
    assert unit_digest(a) == before
    a.write("disk0", 0, bytes(data))  # an explicit untagged copy is the caller's decision
    a.write("disk0", BLOCK, a.read("disk0", 0, 10))  # own data is fine


def test_named_objects_and_config_persist(make_store):
    store = make_store()
    vm = new_vm_id()
    unit = store.create(vm)
    with pytest.raises(UnknownResource):
        unit.read_config()
    unit.put_object("meta.json", b"{}")
    unit.put_object("meta.json", b'{"v": 2}')
    unit.put_object("other", b"x")
    unit.delete_object("other")
    unit.write_config({"id": vm, "name": "web", "memory_mib": 64})
    unit.flush()
    store.close()
    unit = make_store().get(vm)
    assert unit.objects() == ["meta.json", "vm.config"]
    assert unit.get_object("meta.json") == b'{"v": 2}'
    assert unit.read_config() == {"id": vm, "name": "web", "memory_mib": 64}
    with pytest.raises(UnknownResource):
        unit.get_object("other")
    with pytest.raises(InvalidArgument):
        unit.put_object("../escape", b"")


def test_snapshot_revert_delete_snapshot_persist(make_store):
    store = make_store()
    vm = new_vm_id()
    unit = store.create(vm)
    unit.write("disk0", 0, b"1" * BLOCK)
    unit.put_object("o", b"v1")
    unit.snapshot("s1")
    unit.write("disk0", 0, b"2" * BLOCK)
    unit.write("disk0", BLOCK, b"new block" * 10)
    unit.put_object("o", b"v2")
    unit.snapshot("s2")
    unit.flush()
    store.close()
    unit = make_store().get(vm)
    assert unit.snapshots() == ["s1", "s2"]
    assert unit.read("disk0", 0, 1, snapshot="s1") == b"1"
    assert unit.read("disk0", 0, 1) == b"2"
    assert unit.get_object("o", snapshot="s1") == b"v1"
    unit.revert("s1")
    assert unit.read("disk0", 0, 1) == b"1"
    assert unit.read("disk0", BLOCK, 9) == bytes(9)
    assert unit.get_object("o") == b"v1"
    unit.delete_snapshot("s1")
    with pytest.raises(UnknownResource):
        unit.read("disk0", 0, 1, snapshot="s1")
    with pytest.raises(InvalidArgument):
        unit.snapshot("s2")
    unit.flush()
    store.close()
    unit = make_store().get(vm)
    assert unit.snapshots() == ["s2"]
    assert unit.read("disk0", 0, 1) == b"1"
    assert unit.read("disk0", BLOCK, 9) == b"new block"[:9] or unit.read("disk0", BLOCK, 9, snapshot="s2")
    assert unit.read("disk0", BLOCK, 9, snapshot="s2") == b"new block"


def test_clone_restamps_every_block_and_is_independent(make_store):
    store = make_store()
    src = store.create(new_vm_id())
    src.write("disk0", 0, pattern(3, 5 * BLOCK))
    src.put_object("meta", b"m")
    src.write_config({"id": src.vm_id, "name": "src"})
    src.snapshot("base")
    src.write("disk0", 0, b"later" * 1000)
    src.flush()
    clone = src.clone(new_vm_id(), snapshot="base")
    assert clone.read("disk0", 0, 5 * BLOCK) == pattern(3, 5 * BLOCK)
    assert clone.objects() == ["meta"]  # the config names the source VM and stays behind
    assert all(s.owner == clone.vm_id for s in clone.stamps())
    assert all(s.owner == src.vm_id for s in src.stamps())
    before = unit_digest(src)
    clone.write("disk0", 0, b"changed")
    clone.flush()
    assert unit_digest(src) == before
    with pytest.raises(DuplicateResource):
        src.clone(clone.vm_id)


def test_delete_removes_only_that_unit(make_store):
    store = make_store()
    keep, gone = store.create(new_vm_id()), store.create(new_vm_id())
    for u in (keep, gone):
        u.write("disk0", 0, pattern(4, 2 * BLOCK))
        u.flush()
    before = unit_digest(keep)
    gone.delete()
    assert not gone.path.exists()
    assert [u.vm_id for u in store.units()] == [keep.vm_id]
    assert unit_digest(keep) == before
    with pytest.raises(UnitDestroyed):
        gone.read("disk0", 0, 1)
    store.close()
    assert unit_digest(make_store().get(keep.vm_id)) == before


def test_quota_refuses_growth_and_compaction_reclaims_overwrites(make_store):
    store = make_store()
    unit = store.create(new_vm_id())
    other = store.create(new_vm_id())
    other.write("disk0", 0, b"o" * BLOCK)
    other.flush()
    before = unit_digest(other)
    unit.set_quota(LOG_START + 20 * BLOCK)
    assert unit.quota == LOG_START + 20 * BLOCK
    for i in range(40):  # overwrites: compaction keeps the image under the quota
        unit.write("disk0", 0, pattern(i, 4 * BLOCK))
        unit.flush()
    assert unit.read("disk0", 0, 4 * BLOCK) == pattern(39, 4 * BLOCK)
    assert unit.usage() <= LOG_START + 20 * BLOCK
    with pytest.raises(QuotaExceeded) as err:
        unit.write("disk0", 8 * BLOCK, bytes(30 * BLOCK))
    assert err.value.unit == unit.vm_id and err.value.offset == 8 * BLOCK
    assert unit.read("disk0", 0, 4 * BLOCK) == pattern(39, 4 * BLOCK)
    assert unit_digest(other) == before
    vm = unit.vm_id
    store.close()
    again = make_store().get(vm)
    assert again.quota == LOG_START + 20 * BLOCK
    assert again.check() == []


def test_compaction_keeps_snapshots_and_objects(make_store):
    store = make_store()
    unit = store.create(new_vm_id())
    unit.write("disk0", 0, b"a" * 3 * BLOCK)
    unit.put_object("k", b"1")
    unit.snapshot("one")
    unit.write("disk0", BLOCK, b"b" * BLOCK)
    unit.snapshot("two")
    unit.revert("one")
    unit.write("disk2", 0, b"c" * 10)
    before = {s: unit_digest_at(unit, s) for s in [None, "one", "two"]}
    unit.compact()
    assert {s: unit_digest_at(unit, s) for s in [None, "one", "two"]} == before
    assert unit.check() == []


def unit_digest_at(unit, snapshot):
    return [unit.read(v, 0, 3 * BLOCK, snapshot=snapshot) for v in ("disk0", "disk2")], unit.get_object(
        "k", snapshot=snapshot
    )


def test_second_writer_is_refused_readers_are_not(make_store):
    store = make_store()
    vm = new_vm_id()
    unit = store.create(vm)
    unit.write("disk0", 0, b"x" * 10)
    unit.flush()
    other = make_store()  # another kernel on the same data directory
    assert other.get(vm).read("disk0", 0, 10) == b"x" * 10
    with pytest.raises(UnitBusy) as err:
        other.get(vm).write("disk0", 0, b"y")
    assert err.value.unit == vm
    unit.close()
    other.get(vm).write("disk0", 0, b"y")


def test_bad_arguments_are_typed(make_store):
    store = make_store()
    unit = store.create(new_vm_id())
    for call, exc in [
        (lambda: unit.write("disk", 0, b"x"), InvalidArgument),
        (lambda: unit.write("disk0", -1, b"x"), InvalidArgument),
        (lambda: unit.write("disk0", 0, "text"), InvalidArgument),
        (lambda: unit.write("disk0", 1 << 48, b"x"), InvalidArgument),
        (lambda: unit.read("disk0", 0, -1), InvalidArgument),
        (lambda: unit.read("disk0", True, 1), InvalidArgument),
        (lambda: unit.write_config(["not", "a", "dict"]), InvalidArgument),
        (lambda: unit.write_config({"x": object()}), InvalidArgument),
        (lambda: unit.set_quota(5), InvalidArgument),
        (lambda: store.create("not-a-uuid"), InvalidArgument),
        (lambda: store.create(unit.vm_id), DuplicateResource),
        (lambda: UnitStore(store.root, backend="tape"), InvalidArgument),
    ]:
        with pytest.raises(exc):
            call()
    assert unit.check() == []


def test_flush_is_durable_order_and_noop_without_writes(make_store):
    store = make_store()
    unit = store.create(new_vm_id())
    unit.write("memory", 0, b"opens the unit for writing")
    unit.flush()
    gen = unit.info()["generation"]
    unit.flush()
    assert unit.info()["generation"] == gen  # nothing pending: no superblock write
    unit.write("memory", 0, os.urandom(BLOCK))
    unit.flush()
    assert unit.info()["generation"] == gen + 1
    assert unit.info()["clean"] is False  # open for writing
    vm = unit.vm_id
    store.close()
    assert make_store().get(vm).info()["clean"] is True
