"""Saving and restoring a VM with the real processor plugin: guest memory survives a new kernel."""

from __future__ import annotations

import os

import pytest
from vmk_processor import plugin as processor
from vmk_storage import plugin as storage

import vmkernel

PLUGINS = [processor, storage]


def test_guest_memory_round_trips_through_the_storage_unit(tmp_path):
    data = tmp_path / "data"
    pattern = os.urandom(3 * 4096 + 123)
    with vmkernel.Kernel(seed=3, data_dir=data, plugins=PLUGINS, autoload=False) as k:
        vm = k.create_vm("saved", memory_mib=16)
        k.launch_vm(vm)
        k.guest_memory(vm).write(0x2000, pattern)
        k.stop_vm(vm)
        k.save_vm(vm)
        vm_id = vm.id
        k.destroy_vm(vm)

    # Another kernel on the same data directory finds the unit and brings the VM back.
    with vmkernel.Kernel(seed=4, data_dir=data, plugins=PLUGINS, autoload=False) as k2:
        owners = {u.vm_id for u in k2.storage_units()}
        assert vm_id in owners
        restored = k2.restore_vm(vm_id)
        assert restored.id == vm_id and restored.state is vmkernel.VMState.STOPPED
        k2.launch_vm(restored)
        assert k2.guest_memory(restored).read(0x2000, len(pattern)) == pattern
        assert k2.guest_memory(restored).read(0, 0x2000) == bytes(0x2000)


def test_restoring_a_live_vm_is_refused(tmp_path):
    with vmkernel.Kernel(seed=3, data_dir=tmp_path, plugins=PLUGINS, autoload=False) as k:
        vm = k.create_vm("live", memory_mib=16)
        k.launch_vm(vm)
        k.stop_vm(vm)
        k.save_vm(vm)
        with pytest.raises(vmkernel.errors.DuplicateResource):
            k.restore_vm(vm.id)
        assert [v.id for v in k.vms()] == [vm.id]


def test_only_pages_that_hold_data_are_saved_and_a_second_save_is_exact(tmp_path):
    with vmkernel.Kernel(seed=5, data_dir=tmp_path, plugins=PLUGINS, autoload=False) as k:
        vm = k.create_vm("sparse", memory_mib=64)
        k.launch_vm(vm)
        memory = k.guest_memory(vm)
        memory.write(5 << 20, b"first save")
        memory.write(9 << 20, b"will be zeroed")
        k.save_vm(vm)
        saved = [e.data for e in k.journal.events if e.kind == "storage.memory_saved"][-1]
        assert saved == {"bytes": 64 << 20, "written": 3 * 4096}  # two pages and the last one
        memory.write(9 << 20, bytes(4096))  # a whole zero page no longer holds data
        memory.write(7 << 20, b"second save")
        k.save_vm(vm)
        unit = k.storage_unit(vm)
        image = unit.read("memory", 0, 64 << 20)
        assert image == memory.read(0, 64 << 20)  # the volume is the memory, byte for byte
        assert unit.volumes()["memory"]["size"] == 64 << 20
