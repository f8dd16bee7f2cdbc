"""The storage plugin inside a kernel: units per VM, save/restore across processes,
destroy policy, invariants that can fail, report, demo and the `storage` CLI."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import click
import pytest
import vmk_storage.plugin as storage_plugin
from click.testing import CliRunner
from vmk_storage import format as fmt
from vmk_storage.unit import IMAGE

from vmkernel import Kernel, hookimpl
from vmkernel.errors import CommingleRefused, CorruptUnit, HookFailed, InvalidArgument, UnknownResource


class FakeMemory:
    """Guest memory as a processor plugin would expose it (read/write at guest-physical addresses)."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.data[gpa : gpa + n])

    def write(self, gpa: int, data: bytes) -> None:
        self.data[gpa : gpa + len(data)] = data


class FakeProcessor:
    """Provides guest memory for launched VMs only, like the real processor plugin."""

    def __init__(self) -> None:
        self.memory: dict[str, FakeMemory] = {}

    @hookimpl
    def vmk_vm_launch(self, kernel, vm):
        self.memory.setdefault(vm.id, FakeMemory(vm.memory_mib << 20))

    @hookimpl
    def vmk_guest_memory(self, kernel, vm):
        return self.memory.get(vm.id)


def kernel(tmp_path, *extra, **config):
    return Kernel(
        plugins=[storage_plugin, *extra],
        autoload=False,
        data_dir=tmp_path / "data",
        config={"storage": config} if config else None,
    )


def test_unit_per_vm_and_contract_across_processes(tmp_path):
    with kernel(tmp_path) as k:
        vm = k.create_vm("web", memory_mib=32, role="frontend")
        other = k.create_vm("db")
        unit = k.storage_unit(vm)
        assert unit.vm_id == vm.id and k.storage_unit(vm.id) is unit
        unit.write("disk0", 4096, b"acknowledged")
        unit.flush()
        k.storage_unit(other).write("disk0", 0, b"db data")
        k.storage_unit(other).flush()
        with pytest.raises(CommingleRefused):
            unit.write("disk0", 0, k.storage_unit(other).read("disk0", 0, 7))
        k.save_vm(vm)
        k.check_invariants()
    script = textwrap.dedent(f"""
        import vmkernel, vmk_storage.plugin as p
        k2 = vmkernel.Kernel(data_dir={str(tmp_path / "data")!r}, plugins=[p], autoload=False)
        units = k2.storage_units()
        print(sorted(u.owner for u in units))
        vm = k2.restore_vm({vm.id!r})
        print(vm.name, vm.memory_mib, vm.options["role"], vm.state.value)
        print(k2.storage_unit(vm).read("disk0", 4096, 12).decode())
        k2.close()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == str(sorted([vm.id, other.id]))
    assert lines[1] == "web 32 frontend stopped"
    assert lines[2] == "acknowledged"


def test_unknown_vm_has_no_unit(tmp_path):
    with kernel(tmp_path) as k:
        with pytest.raises(UnknownResource):
            k.storage_unit("00000000-0000-4000-8000-000000000001")
        with pytest.raises(InvalidArgument):
            k.storage_unit("not-a-vm-id")


def test_save_and_restore_guest_memory_round_trip(tmp_path):
    proc = FakeProcessor()
    with kernel(tmp_path, proc) as k:
        vm = k.create_vm("mem", memory_mib=2)
        k.launch_vm(vm)
        image = bytes(range(256)) * (8 << 10)  # 2 MiB with zero runs stored explicitly
        proc.memory[vm.id].write(0, image)
        k.save_vm(vm)
        assert k.storage_unit(vm).read("memory", 0, len(image)) == image
        vm_id = vm.id
    proc2 = FakeProcessor()
    with kernel(tmp_path, proc2) as k2:
        restored = k2.restore_vm(vm_id)
        assert vm_id not in proc2.memory  # stopped: the image waits for guest memory
        k2.launch_vm(restored)
        assert proc2.memory[vm_id].read(0, len(image)) == image
        assert any(e.kind == "storage.memory_restored" for e in k2.journal.events)


def test_save_without_processor_keeps_config_and_disks(tmp_path):
    with kernel(tmp_path) as k:
        vm = k.create_vm("plain")
        k.save_vm(vm)
        assert "memory" not in k.storage_unit(vm).volumes()
        assert k.storage_unit(vm).read_config()["name"] == "plain"


def test_destroy_retains_by_default_and_deletes_when_asked(tmp_path):
    with kernel(tmp_path) as k:
        keep = k.create_vm("keep")
        gone = k.create_vm("gone", storage_on_destroy="delete")
        for vm in (keep, gone):
            k.storage_unit(vm).write("disk0", 0, b"x")
            k.save_vm(vm)
        k.destroy_vm(keep)
        k.destroy_vm(gone)
        assert [u.vm_id for u in k.storage_units()] == [keep.id]
        assert k.restore_vm(keep.id).name == "keep"
        with pytest.raises((InvalidArgument, HookFailed)) as err:
            k.create_vm("bad", storage_on_destroy="shred")
        assert isinstance(err.value, InvalidArgument) or isinstance(err.value.__cause__, InvalidArgument)
        assert "bad" not in [v.name for v in k.vms()]  # the creation was vetoed
    with kernel(tmp_path / "b", on_destroy="delete") as k:
        vm = k.create_vm("v")
        k.storage_unit(vm).write("disk0", 0, b"x")
        k.destroy_vm(vm)
        assert k.storage_units() == []


def test_nbd_backend_through_the_kernel(tmp_path):
    if storage_plugin.NbdBackend is None or __import__("shutil").which("qemu-nbd") is None:
        pytest.skip("qemu-nbd not found: install Debian's qemu-utils")
    with kernel(tmp_path, backend="nbd", nbd_capacity=16 << 20) as k:
        vm = k.create_vm("n")
        unit = k.storage_unit(vm)
        assert unit.backend == "nbd"
        unit.write("disk0", 0, b"over nbd")
        k.save_vm(vm)
        k.check_invariants()
    with kernel(tmp_path) as k:  # the local backend reads what the NBD backend wrote
        assert k.storage_unit(vm.id).read("disk0", 0, 8) == b"over nbd"


def test_invariants_catch_a_lost_acknowledged_write(tmp_path):
    with kernel(tmp_path) as k:
        vm = k.create_vm("v")
        unit = k.storage_unit(vm)
        unit.write("disk0", 0, b"a" * 4096)
        unit.flush()
        k.check_invariants()
        block = unit._cur.blocks[0].at(0).pos
        with open(unit.image_path, "r+b") as f:  # the disk loses the block under the kernel
            f.seek(block)
            f.write(b"b")
        checks = {inv.name: inv.check() for inv in k.invariants()}
        assert "acknowledged block 0 of disk0" in checks["storage.acknowledged-readable"]


def test_invariants_catch_a_foreign_stamp(tmp_path):
    with kernel(tmp_path) as k:
        vm = k.create_vm("v")
        unit = k.storage_unit(vm)
        unit.write("disk0", 0, b"a")
        unit.flush()
        pos = fmt.LOG_START
        with open(unit.image_path, "r+b") as f:  # owner field of the first record
            f.seek(pos + 24)
            f.write(b"\xff" * 16)
        checks = {inv.name: inv.check() for inv in k.invariants()}
        assert "stamped" in checks["storage.no-commingling"]


def test_report_and_demo(tmp_path):
    from vmkernel.demo import DemoContext

    with kernel(tmp_path) as k:
        demo = DemoContext(io.StringIO(), plugin="storage")
        storage_plugin.vmk_demo(k, demo)
        qcow2 = "identical" if __import__("shutil").which("qemu-img") else "skipped (qemu-img not installed)"
        assert demo.records["storage"] == {
            "units": 2,
            "clone_identical": True,
            "qcow2_round_trip": qcow2,
            "replica_identical": True,
            "check_problems": 0,
        }
        section = storage_plugin.vmk_report(k)
        assert section.title == "Storage units" and section.lines[0].startswith("2 units")


def cli_group():
    group = click.Group("vmkernel")
    storage_plugin.vmk_cli_commands(group)
    return group


def test_cli_ls_and_check(tmp_path):
    with kernel(tmp_path) as k:
        vm = k.create_vm("v")
        k.storage_unit(vm).write("disk0", 0, b"x" * 5000)
        k.save_vm(vm)
        image = k.storage_unit(vm).image_path
    runner = CliRunner()
    data = str(tmp_path / "data")
    res = runner.invoke(cli_group(), ["storage", "ls", "--data-dir", data])
    assert res.exit_code == 0, res.output
    assert vm.id in res.output and "disk0 8192" in res.output and "1 units" in res.output
    res = runner.invoke(cli_group(), ["storage", "check", "--data-dir", data])
    assert res.exit_code == 0 and "0 with problems" in res.output
    before = image.read_bytes()
    with open(image, "r+b") as f:
        f.seek(fmt.LOG_START + 200)
        f.write(b"\x00\x01")
    damaged = image.read_bytes()
    res = runner.invoke(cli_group(), ["storage", "check", "--data-dir", data])
    assert res.exit_code == 1 and "1 with problems" in res.output and vm.id in res.output
    assert image.read_bytes() == damaged != before  # check changed nothing
    assert (tmp_path / "data" / "storage" / vm.id / IMAGE).exists()


def test_save_records_content_ids_and_restore_returns_to_the_save(tmp_path):
    with kernel(tmp_path) as k:
        vm = k.create_vm("saved")
        unit = k.storage_unit(vm)
        unit.write("disk0", 0, b"at save time")
        k.save_vm(vm)
        manifest = __import__("orjson").loads(bytes(unit.get_object(storage_plugin.MANIFEST)))
        assert manifest["content"]["disk0"] == unit.content_id("disk0")
        assert storage_plugin.SAVED_SNAPSHOT in unit.snapshots()
        saved_event = [e for e in k.journal.events if e.kind == "storage.saved"][-1]
        assert saved_event.data["content"] == manifest["content"]
        unit.write("disk0", 0, b"after the save")  # the VM kept running
        unit.write("disk1", 0, b"a new disk")
        unit.flush()
        vm_id = vm.id
    with kernel(tmp_path) as k2:
        k2.restore_vm(vm_id)
        unit = k2.storage_unit(vm_id)
        assert unit.read("disk0", 0, 12) == b"at save time"
        assert unit.volumes()["disk1"]["size"] == 0
        # Nothing is lost: the later state is kept as a snapshot.
        assert unit.read("disk0", 0, 14, snapshot="vm.unsaved-1") == b"after the save"
        event = [e for e in k2.journal.events if e.kind == "storage.reverted_to_save"][-1]
        assert event.data == {"changed": ["disk0", "disk1"], "kept_as": "vm.unsaved-1"}
        k2.check_invariants()


def test_restore_refuses_a_saved_state_that_no_longer_matches_its_manifest(tmp_path):
    with kernel(tmp_path) as k:
        vm = k.create_vm("tampered")
        unit = k.storage_unit(vm)
        unit.write("disk0", 0, b"original")
        k.save_vm(vm)
        # Rewrite history: a saved state whose manifest names other content.
        unit.delete_snapshot(storage_plugin.SAVED_SNAPSHOT)
        unit.write("disk0", 0, b"replaced")
        unit.snapshot(storage_plugin.SAVED_SNAPSHOT)
        unit.flush()
        k.destroy_vm(vm)
        with pytest.raises(CorruptUnit) as err:
            k.restore_vm(vm.id)
        assert "disk0" in str(err.value) and err.value.unit == vm.id
        assert vm.id not in {v.id for v in k.vms()}
        assert unit.read("disk0", 0, 8) == b"replaced"  # the failed restore changed nothing


class FailingRestore:
    @hookimpl(trylast=True)
    def vmk_vm_restore(self, kernel, vm, unit):
        raise RuntimeError("this plugin cannot restore")


def test_a_failed_restore_puts_the_unit_back_as_it_was(tmp_path):
    with kernel(tmp_path) as k:
        vm = k.create_vm("v")
        unit = k.storage_unit(vm)
        unit.write("disk0", 0, b"saved")
        k.save_vm(vm)
        unit.write("disk0", 0, b"later")
        unit.flush()
        vm_id = vm.id
    with kernel(tmp_path, FailingRestore()) as k2:
        with pytest.raises(HookFailed):
            k2.restore_vm(vm_id)
        unit = k2.storage_unit(vm_id)
        assert unit.read("disk0", 0, 5) == b"later"
        assert unit.snapshots() == [storage_plugin.SAVED_SNAPSHOT]


@pytest.mark.skipif(
    __import__("shutil").which("qemu-img") is None, reason="qemu-img not found: install qemu-utils"
)
def test_cli_import_export_and_content_ids(tmp_path):
    with kernel(tmp_path) as k:
        vm = k.create_vm("v")
        k.storage_unit(vm).write("disk0", 0, b"boot" * 1024)
        k.storage_unit(vm).flush()
    raw = tmp_path / "in.raw"
    raw.write_bytes(b"\x17" * 8192 + bytes(8192))
    runner = CliRunner()
    data = str(tmp_path / "data")
    res = runner.invoke(cli_group(), ["storage", "import", "--data-dir", data, vm.id, "disk1", str(raw)])
    assert res.exit_code == 1 and "format unknown" in res.output  # raw is never guessed
    res = runner.invoke(
        cli_group(), ["storage", "import", "--data-dir", data, vm.id, "disk1", str(raw), "--format", "raw"]
    )
    assert res.exit_code == 0, res.output
    digest = __import__("blake3").blake3(raw.read_bytes()).hexdigest()
    assert res.output.split() == [digest, "disk1"]
    out = tmp_path / "out.qcow2"
    args = ["storage", "export", "--data-dir", data, vm.id, "disk1", str(out), "--format", "qcow2"]
    res = runner.invoke(cli_group(), args)
    assert res.exit_code == 0 and res.output.split()[0] == digest
    assert out.read_bytes()[:4] == b"QFI\xfb"
    res = runner.invoke(cli_group(), ["storage", "id", "--data-dir", data, vm.id])
    assert res.exit_code == 0 and f"{digest}  disk1" in res.output
    res = runner.invoke(cli_group(), ["storage", "export", "--data-dir", data, vm.id, "disk1", str(out)])
    assert res.exit_code == 1 and "does not exist yet" in res.output


def test_save_vm_replicates_when_configured_and_the_cli_replicates(tmp_path):
    replica_dir = tmp_path / "dr-site"
    with kernel(tmp_path, replicate_to=str(replica_dir)) as k:
        vm = k.create_vm("v")
        unit = k.storage_unit(vm)
        unit.write("disk0", 0, b"saved and replicated")
        k.save_vm(vm)
        unit.write("disk0", 4096, b"second save")
        k.save_vm(vm)
        events = [e.data for e in k.journal.events if e.kind == "storage.replicated"]
        assert [e["mode"] for e in events] == ["full", "incremental"] and events[1]["bytes"] > 0
        ids = unit.content_ids()
    # The replica site restores the VM on its own, exactly as saved.
    with Kernel(plugins=[storage_plugin], autoload=False, data_dir=replica_dir) as dr:
        restored = dr.restore_vm(vm.id)
        assert restored.name == "v"
        assert dr.storage_unit(vm.id).content_ids() == ids
        assert dr.storage_unit(vm.id).read("disk0", 4096, 11) == b"second save"
    runner = CliRunner()
    other = tmp_path / "other-site"
    args = ["storage", "replicate", "--data-dir", str(tmp_path / "data"), vm.id, "--to", str(other)]
    res = runner.invoke(cli_group(), args)
    assert res.exit_code == 0 and res.output.startswith("full:"), res.output
    res = runner.invoke(cli_group(), args)
    assert res.exit_code == 0 and res.output.startswith("up-to-date: 0 bytes")
