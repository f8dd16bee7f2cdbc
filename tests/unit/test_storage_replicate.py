"""Replication of units into another store: full, incremental, after compaction, refusals.

Each test runs with the source and the replica on the local backend and on a
real qemu-nbd (``storage_backend``); one test replicates across backends.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmk_storage import UnitStore
from vmk_storage import testing as storage_testing
from vmk_storage.format import BLOCK, REC_HEADER
from vmk_storage.nbd import qemu_nbd_path
from vmk_storage.replicate import STATE_FILE
from vmk_storage.testing import new_vm_id

from vmkernel.errors import CorruptUnit, InvalidArgument, ReplicaDiverged, UnitBusy
from vmkernel.testing.profiles import scaled

make_store = storage_testing.make_store
storage_backend = storage_testing.storage_backend


def everything(unit) -> dict[str, dict[str, str]]:
    """Content ids of the current state and of every snapshot."""
    out = {"": unit.content_ids()}
    for snap in unit.snapshots():
        out[snap] = unit.content_ids(snapshot=snap)
    return out


def test_full_then_incremental_then_up_to_date(make_store, tmp_path):
    source = make_store()
    replica_store = make_store(tmp_path / "replica")
    unit = source.create(new_vm_id())
    unit.write("disk0", 0, random.Random(1).randbytes(3 * 1024 * BLOCK))
    unit.put_object("meta", b"m")
    unit.snapshot("s1")
    first = unit.replicate_to(replica_store)
    assert first["mode"] == "full" and first["bytes"] == first["log_end"] - 8192
    replica = replica_store.get(unit.vm_id)
    assert everything(replica) == everything(unit) and replica.check() == []
    replica_store.close_units()
    before = unit.usage()
    unit.write("disk1", 5 * BLOCK, b"new data")  # one new volume, one block
    second = unit.replicate_to(replica_store)
    assert second["mode"] == "incremental"
    assert second["bytes"] == unit.usage() - before  # only the records written since
    assert unit.replicate_to(replica_store)["mode"] == "up-to-date"
    replica = replica_store.get(unit.vm_id)
    assert replica.read("disk1", 5 * BLOCK, 8) == b"new data"
    assert everything(replica) == everything(unit)


def test_a_compacted_source_is_shipped_again(make_store, tmp_path):
    source = make_store()
    replica_store = make_store(tmp_path / "replica")
    unit = source.create(new_vm_id())
    for i in range(4):
        unit.write("disk0", 0, bytes([i]) * (8 * BLOCK))  # overwrites leave dead records
    unit.replicate_to(replica_store)
    unit.compact()
    assert unit.replicate_to(replica_store)["mode"] == "full"
    replica_store.close_units()
    assert everything(replica_store.get(unit.vm_id)) == everything(unit)


def test_a_replica_written_on_its_own_is_not_overwritten(make_store, tmp_path):
    source = make_store()
    replica_store = make_store(tmp_path / "replica")
    unit = source.create(new_vm_id())
    unit.write("disk0", 0, b"source")
    unit.replicate_to(replica_store)
    replica = replica_store.get(unit.vm_id)
    replica.write("disk0", 0, b"local!")
    replica.close()
    unit.write("disk0", 0, b"newer source")
    with pytest.raises(ReplicaDiverged) as err:
        unit.replicate_to(replica_store)
    assert err.value.unit == unit.vm_id
    assert replica_store.get(unit.vm_id).read("disk0", 0, 6) == b"local!"
    replica_store.close_units()
    assert unit.replicate_to(replica_store, force=True)["mode"] == "full"
    assert replica_store.get(unit.vm_id).read("disk0", 0, 12) == b"newer source"


def test_a_unit_that_is_not_a_replica_is_refused(make_store, tmp_path):
    source = make_store()
    other = make_store(tmp_path / "other")
    vm = new_vm_id()
    unit = source.create(vm)
    unit.write("disk0", 0, b"a")
    mine = other.create(vm)
    mine.write("disk0", 0, b"independent")
    mine.close()
    with pytest.raises(ReplicaDiverged):
        unit.replicate_to(other)
    assert not (other.path_of(vm) / STATE_FILE).exists()


def test_a_damaged_source_never_damages_the_replica(make_store, tmp_path):
    source = make_store()
    replica_store = make_store(tmp_path / "replica")
    unit = source.create(new_vm_id())
    unit.write("disk0", 0, b"first" * 1000)
    unit.replicate_to(replica_store)
    replica_store.close_units()
    good = everything(replica_store.get(unit.vm_id))
    replica_store.close_units()
    end = unit.usage()
    unit.write("disk0", 8 * BLOCK, random.Random(2).randbytes(4 * BLOCK))
    unit.flush()
    with open(unit.image_path, "r+b") as f:  # bit rot in the new record's data
        f.seek(end + REC_HEADER + 16 + 2 * BLOCK + 5)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x20]))
    with pytest.raises(CorruptUnit) as err:
        unit.replicate_to(replica_store)
    assert err.value.offset == end + REC_HEADER + 16 + 2 * BLOCK
    replica = replica_store.get(unit.vm_id)
    assert everything(replica) == good and replica.check() == []


def test_refusals(make_store, tmp_path):
    source = make_store()
    unit = source.create(new_vm_id())
    unit.write("disk0", 0, b"x")
    with pytest.raises(InvalidArgument):
        unit.replicate_to(source)
    with pytest.raises(InvalidArgument):
        unit.replicate_to(str(tmp_path))  # type: ignore[arg-type]
    replica_store = make_store(tmp_path / "replica")
    unit.replicate_to(replica_store)
    holder = replica_store.get(unit.vm_id)
    holder.write("disk3", 0, b"held open for writing")  # takes the replica's writer lock
    with pytest.raises(UnitBusy):
        unit.replicate_to(replica_store)


@pytest.mark.skipif(qemu_nbd_path() is None, reason=storage_testing.NBD_MISSING)
def test_local_to_nbd_and_back(tmp_path):
    from vmk_storage import NbdBackend

    local = UnitStore(tmp_path / "local")
    remote = UnitStore(tmp_path / "remote", NbdBackend(capacity=32 << 20))
    try:
        unit = local.create(new_vm_id())
        unit.write("memory", 0, random.Random(3).randbytes(1 << 20))
        unit.snapshot("s")
        assert unit.replicate_to(remote)["mode"] == "full"
        replica = remote.get(unit.vm_id)
        assert everything(replica) == everything(unit) and replica.backend == "nbd"
        remote.close_units()
        back = UnitStore(tmp_path / "back")
        replica = remote.get(unit.vm_id)
        replica.replicate_to(back)
        assert everything(back.get(unit.vm_id)) == everything(unit)
        back.close()
    finally:
        local.close()
        remote.close()


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("write"), st.sampled_from(["disk0", "swap"]), st.integers(0, 40), st.integers(1, 6)
        ),
        st.tuples(
            st.just("discard"), st.sampled_from(["disk0", "swap"]), st.integers(0, 40), st.integers(1, 6)
        ),
        st.tuples(st.just("snapshot")),
        st.tuples(st.just("compact")),
        st.tuples(st.just("replicate")),
        st.tuples(st.just("reopen")),
    ),
    max_size=20,
)


@settings(max_examples=scaled(40), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workload=ops, seed=st.integers(0, 1 << 30))
def test_replicas_always_equal_their_source(tmp_path_factory, workload, seed):
    root = tmp_path_factory.mktemp("rep")
    source, target = UnitStore(root / "src"), UnitStore(root / "dst")
    rng = random.Random(seed)
    try:
        unit = source.create(new_vm_id(rng))
        snaps = 0
        for op in workload:
            if op[0] == "write":
                unit.write(op[1], op[2] * BLOCK + rng.randrange(BLOCK), rng.randbytes(op[3] * BLOCK))
            elif op[0] == "discard":
                unit.discard(op[1], op[2] * BLOCK, op[3] * BLOCK)
            elif op[0] == "snapshot":
                unit.snapshot(f"s{snaps}")
                snaps += 1
            elif op[0] == "compact":
                unit.compact()
            elif op[0] == "replicate":
                result = unit.replicate_to(target)
                target.close_units()
                assert everything(target.get(unit.vm_id)) == everything(unit), result
                target.close_units()
            else:
                source.close()
                source = UnitStore(root / "src")
                unit = source.get(unit.vm_id)
        unit.replicate_to(target)
        target.close_units()
        replica = target.get(unit.vm_id)
        assert everything(replica) == everything(unit)
        assert replica.check() == []
    finally:
        source.close()
        target.close()


def test_a_failed_full_copy_keeps_the_old_replica(make_store, tmp_path):
    source = make_store()
    replica_store = make_store(tmp_path / "replica")
    unit = source.create(new_vm_id())
    for i in range(3):
        unit.write("disk0", 0, bytes([i + 1]) * (4 * BLOCK))
    unit.replicate_to(replica_store)
    replica_store.close_units()
    good = everything(replica_store.get(unit.vm_id))
    replica_store.close_units()
    unit.compact()  # the next replication must ship everything again
    unit.flush()
    with open(unit.image_path, "r+b") as f:  # ... and the source has rotted since
        f.seek(unit.usage() - 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(CorruptUnit):
        unit.replicate_to(replica_store)
    assert everything(replica_store.get(unit.vm_id)) == good
    assert not any(p.name.startswith(".replica-") for p in replica_store.root.iterdir())
