"""The processor plugin inside a kernel: VM ids, stage-2 tables over owned
frames, scheduling without flushes, guest memory through translation,
isolation invariant, destroy and rollback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import vmk_processor.plugin as processor_plugin
from vmk_processor.plugin import PROCESSOR

from vmkernel import Kernel, hookimpl
from vmkernel.errors import CapacityError, HookFailed, InvalidArgument


def make(tmp_path: Path, *extra: Any, mib: int = 64) -> Kernel:
    return Kernel(
        plugins=[processor_plugin, *extra],
        autoload=False,
        data_dir=tmp_path,
        config={"processor.memory_mib": mib},
    )


def test_launch_maps_owned_frames_and_guest_memory_translates(tmp_path: Path) -> None:
    with make(tmp_path) as k:
        a, b = k.create_vm("a", memory_mib=4), k.create_vm("b", memory_mib=6)
        k.launch_vm(a)
        k.launch_vm(b)
        state = k.stash[PROCESSOR]
        ids = {state.vms[a.id].vm_id, state.vms[b.id].vm_id}
        assert ids == {1, 2}
        ma, mb = k.guest_memory(a), k.guest_memory(b)
        ma.write(0x1FFE, b"across a page")
        mb.write(0, b"other")
        assert ma.read(0x1FFE, 13) == b"across a page"
        assert mb.read(0, 5) == b"other"
        for vm, mem in ((a, ma), (b, mb)):
            hpa = mem.translate(0x1FFE)
            assert state.cpu.frame_owner(hpa) == state.vms[vm.id].vm_id
            assert state.cpu.read_phys(hpa, 2) == mem.read(0x1FFE, 2)
        assert all(inv.check() is None for inv in k.invariants())
        with pytest.raises(InvalidArgument):
            ma.read(4 << 20, 1)


def test_scheduling_writes_vmr_without_flush(tmp_path: Path) -> None:
    with make(tmp_path) as k:
        vms = [k.create_vm(f"v{i}", memory_mib=2) for i in range(3)]
        for vm in vms:
            k.launch_vm(vm)  # frame ownership changes flush the TLB
        for vm in vms:
            k.guest_memory(vm).write(0, b"x")
        cpu = k.stash[PROCESSOR].cpu
        seen = set()
        for _ in range(6):
            k.clock.advance(1)
            seen.add(cpu.vm_register)
        assert seen == {1, 2, 3}
        cpu.reset_stats()
        for vm in vms:  # each VM's entry survived the switches: all hits
            k.guest_memory(vm).read(0, 1)
        assert cpu.stats()["tlb_misses"] == 0 and cpu.stats()["tlb_hits"] == 3


def test_destroy_frees_zeroes_and_invalidates(tmp_path: Path) -> None:
    with make(tmp_path, mib=16) as k:
        a = k.create_vm("a", memory_mib=6)
        k.launch_vm(a)
        k.guest_memory(a).write(0, b"secret")
        state = k.stash[PROCESSOR]
        free_before = len(state.free_chunks)
        k.destroy_vm(a, force=True)
        assert len(state.free_chunks) == free_before + 4
        assert a.id not in state.vms
        b = k.create_vm("b", memory_mib=6)
        k.launch_vm(b)
        assert k.guest_memory(b).read(0, 6) == bytes(6)  # reused frames were zeroed
        assert all(inv.check() is None for inv in k.invariants())
        assert [e.kind for e in k.journal.events].count("processor.unmap") == 1


def test_capacity_and_rollback(tmp_path: Path) -> None:
    class Veto:
        @hookimpl(trylast=True)
        def vmk_vm_launch(self, kernel: Kernel, vm: Any) -> None:
            if vm.name == "vetoed":
                raise RuntimeError("no")

    with make(tmp_path, Veto(), mib=8) as k:
        state = k.stash[PROCESSOR]
        free = len(state.free_chunks)
        with pytest.raises(HookFailed):
            k.launch_vm(k.create_vm("vetoed", memory_mib=2))
        assert len(state.free_chunks) == free and not state.vms
        with pytest.raises(CapacityError):
            k.launch_vm(k.create_vm("big", memory_mib=64))
        assert len(state.free_chunks) == free and not state.vms


def test_isolation_invariant_catches_a_corrupted_stage2(tmp_path: Path) -> None:
    with make(tmp_path) as k:
        a, b = k.create_vm("a", memory_mib=2), k.create_vm("b", memory_mib=2)
        k.launch_vm(a)
        k.launch_vm(b)
        state = k.stash[PROCESSOR]
        cpu = state.cpu
        # Point one of a's stage-2 leaves at b's first data chunk.
        root = state.vms[a.id].stage2_root
        l3 = int.from_bytes(cpu.read_phys(root, 8), "little") & 0x000F_FFFF_FFFF_F000
        l2 = int.from_bytes(cpu.read_phys(l3, 8), "little") & 0x000F_FFFF_FFFF_F000
        leaf = int.from_bytes(cpu.read_phys(l2, 8), "little")
        stolen = state.vms[b.id].chunks[1]
        cpu.write_phys(l2, ((leaf & ~0x000F_FFFF_FFFF_F000) | stolen).to_bytes(8, "little"))
        cpu.invalidate_all()
        problems = {inv.name: inv.check() for inv in k.invariants()}
        assert problems["processor.isolation"] is not None
        with pytest.raises(Exception) as info:
            k.guest_memory(a).read(0, 1)
        assert getattr(info.value, "kind", None) == "isolation"


def test_report_and_demo(tmp_path: Path) -> None:
    class Demo:
        def __init__(self) -> None:
            self.steps: list[str] = []
            self.records: dict[str, Any] = {}

        def step(self, text: str) -> None:
            self.steps.append(text)

        def record(self, key: str, value: Any) -> None:
            self.records[key] = value

    with make(tmp_path) as k:
        for i in range(2):
            k.launch_vm(k.create_vm(f"d{i}", memory_mib=2))
        demo = Demo()
        processor_plugin.vmk_demo(k, demo)
        assert demo.records["processor.invariants_violated"] == []
        assert demo.records["processor.tlb_hits_after_switches"] >= 2
        section = next(s for s in k.report() if s.title == "processor")
        assert any("VM id 1" in line for line in section.lines)


def test_bad_config(tmp_path: Path) -> None:
    with pytest.raises(Exception) as info:
        make(tmp_path, mib=3)
    assert "processor.memory_mib" in str(info.value)
