"""Non-commingling, proven by scanning: random multi-VM workloads with clone, snapshot,
revert, discard, compaction, delete and reopen; afterwards every stored record's stamp names its
unit's owner, every read matches a model, and deleting a unit leaves every other unit's
reads byte-identical.  Same property on the local backend and through qemu-nbd."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import blake3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmk_storage import NbdBackend, UnitStore
from vmk_storage import testing as storage_testing
from vmk_storage.format import BLOCK
from vmk_storage.testing import unit_digest

from vmkernel.errors import CommingleRefused
from vmkernel.testing.profiles import scaled

SPAN = 12 * BLOCK
VOLUMES = ("disk0", "disk1", "swap")

vm_ref = st.integers(0, 7)
ops = st.one_of(
    st.tuples(
        st.just("write"),
        vm_ref,
        st.sampled_from(VOLUMES),
        st.integers(0, SPAN - 1),
        st.integers(1, 3 * BLOCK),
        st.integers(0, 255),
    ),
    st.tuples(st.just("flush"), vm_ref),
    st.tuples(
        st.just("discard"),
        vm_ref,
        st.sampled_from(VOLUMES),
        st.integers(0, SPAN - 1),
        st.integers(1, 4 * BLOCK),
    ),
    st.tuples(st.just("snapshot"), vm_ref),
    st.tuples(st.just("revert"), vm_ref),
    st.tuples(st.just("clone"), vm_ref, st.booleans()),
    st.tuples(st.just("delete"), vm_ref),
    st.tuples(st.just("compact"), vm_ref),
    st.tuples(st.just("cross_write"), vm_ref, vm_ref),
    st.tuples(st.just("reopen")),
)

# Fixtures shared by the storage suites (storage_backend runs each test on local and NBD).
storage_backend = storage_testing.storage_backend


class Model:
    def __init__(self) -> None:
        self.volumes: dict[str, bytearray] = {}
        self.snaps: dict[str, dict[str, bytearray]] = {}

    def write(self, volume: str, offset: int, data: bytes) -> None:
        vol = self.volumes.setdefault(volume, bytearray())
        if len(vol) < offset + len(data):
            vol.extend(bytes(offset + len(data) - len(vol)))
        vol[offset : offset + len(data)] = data

    def copy_state(self, source: dict[str, bytearray]) -> dict[str, bytearray]:
        return {k: bytearray(v) for k, v in source.items()}


def vm_id_for(n: int) -> str:
    return f"00000000-0000-4000-8000-{n:012x}"


def run_workload(kind: str, workload: list[tuple]) -> None:
    root = Path(tempfile.mkdtemp(prefix="vmkprop-"))
    runtime = Path(tempfile.mkdtemp(prefix="vmknbd-"))

    def open_store() -> UnitStore:
        return UnitStore(root / "units", NbdBackend(runtime, capacity=32 << 20) if kind == "nbd" else "local")

    store = open_store()
    models: dict[str, Model] = {}
    counter = 0
    try:
        for n in range(3):
            vm = vm_id_for(n)
            store.create(vm)
            models[vm] = Model()
            counter += 1
        for step in workload:
            live = sorted(models)
            if not live and step[0] != "reopen":
                continue
            pick = live[step[1] % len(live)] if len(step) > 1 and live else None
            if step[0] == "write":
                _, _, volume, offset, length, byte = step
                data = bytes([byte]) * min(length, SPAN - offset)
                store.get(pick).write(volume, offset, data)
                models[pick].write(volume, offset, data)
            elif step[0] == "flush":
                store.get(pick).flush()
            elif step[0] == "discard":
                _, _, volume, offset, length = step
                store.get(pick).discard(volume, offset, length)
                vol = models[pick].volumes.get(volume)
                if vol is not None:
                    vol[offset : offset + length] = bytes(len(vol[offset : offset + length]))
            elif step[0] == "snapshot":
                name = f"s{len(models[pick].snaps)}"
                store.get(pick).snapshot(name)
                models[pick].snaps[name] = models[pick].copy_state(models[pick].volumes)
            elif step[0] == "revert" and models[pick].snaps:
                name = sorted(models[pick].snaps)[-1]
                store.get(pick).revert(name)
                models[pick].volumes = models[pick].copy_state(models[pick].snaps[name])
            elif step[0] == "clone" and len(models) < 8:
                new = vm_id_for(counter)
                counter += 1
                snap = sorted(models[pick].snaps)[-1] if step[2] and models[pick].snaps else None
                store.get(pick).clone(new, snapshot=snap)
                model = Model()
                model.volumes = model.copy_state(models[pick].snaps[snap] if snap else models[pick].volumes)
                models[new] = model
            elif step[0] == "delete":
                others = {vm: unit_digest(store.get(vm)) for vm in live if vm != pick}
                store.get(pick).delete()
                del models[pick]
                assert {vm: unit_digest(store.get(vm)) for vm in others} == others
            elif step[0] == "compact":
                store.get(pick).compact()
            elif step[0] == "cross_write":
                target = live[step[2] % len(live)]
                data = store.get(pick).read("disk0", 0, 100)
                if target != pick:
                    try:
                        store.get(target).write("disk0", 0, data)
                    except CommingleRefused:
                        pass
                    else:
                        raise AssertionError("a write of another VM's data was accepted")
            elif step[0] == "reopen":
                store.close()
                store = open_store()
        for vm, model in models.items():
            unit = store.get(vm)
            unit.flush()
            for volume in VOLUMES:
                expect = bytes(model.volumes.get(volume, b"")).ljust(SPAN, b"\0")[:SPAN]
                assert unit.read(volume, 0, SPAN) == expect, (vm, volume)
            for volume, info in unit.volumes().items():
                # The content id is BLAKE3 of the logical bytes; past the logical size the model is zeros.
                model_bytes = bytes(model.volumes.get(volume, b""))
                assert not any(model_bytes[info["size"] :])
                assert (
                    unit.content_id(volume)
                    == blake3.blake3(model_bytes.ljust(info["size"], b"\0")).hexdigest()
                )
            stamps = list(unit.stamps())
            assert {s.owner for s in stamps} <= {vm}
            assert unit.check() == []
        assert sorted(u.vm_id for u in store.units()) == sorted(models)
    finally:
        store.close()
        NbdBackend(runtime).stop_all()
        shutil.rmtree(runtime, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)


@settings(
    max_examples=scaled(60), suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(workload=st.lists(ops, max_size=25))
def test_units_never_commingle(storage_backend, workload):
    run_workload(storage_backend, workload)
