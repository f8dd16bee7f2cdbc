"""The storage plugin: one storage unit per VM under the kernel's data directory.

Design note.  The plugin's only state is a :class:`UnitStore` on the kernel's
stash, made on first use (a kernel that never touches storage creates no
files and starts no servers).  A VM's unit is created the first time it is
asked for and outlives the VM record: ``restore_vm`` finds it by id, from a
later kernel too.  ``save_vm`` adds the guest memory image (from the
processor plugin, when one is loaded) to the config the kernel writes; a
restore writes it back, at once if the VM has guest memory, else when it
next launches.  What happens to a unit when the kernel destroys its VM is an
option: ``retain`` (default) or ``delete``.

Settings (``Kernel(config={"storage": {...}})``): ``backend`` (``local`` or
``nbd``), ``on_destroy`` (``retain``/``delete``; per VM:
``create_vm(..., storage_on_destroy=...)``), ``quota`` (bytes, per new unit),
``nbd_capacity`` (bytes of a new NBD-served image), ``sync`` (``single`` or
``ordered``, see :meth:`StorageUnit.flush`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from vmk_storage.nbd import NbdBackend
from vmk_storage.store import UnitStore, canonical_vm_id
from vmk_storage.unit import StorageUnit
from vmkernel import VM, Invariant, Kernel, ReportSection, StashKey, hookimpl
from vmkernel.errors import FeatureUnavailable, InvalidArgument, UnknownResource, VmkError

ON_DESTROY = ("retain", "delete")
MEMORY_CHUNK = 4 << 20


@dataclass
class StorageState:
    store: UnitStore
    pending_memory: set[str] = field(default_factory=set)


KEY: StashKey[StorageState] = StashKey("storage")


def settings(kernel: Kernel) -> Mapping[str, Any]:
    value = kernel.config.get("storage", {})
    if not isinstance(value, Mapping):
        raise InvalidArgument("config['storage']", value, "a mapping of storage settings")
    return value


def state(kernel: Kernel) -> StorageState:
    found = kernel.stash.get(KEY, None)
    if found is not None:
        return found
    conf = settings(kernel)
    kind = conf.get("backend", "local")
    if kind not in ("local", "nbd"):
        raise InvalidArgument("config['storage']['backend']", kind, "'local' or 'nbd'")
    quota = conf.get("quota")
    backend: str | NbdBackend = "local"
    if kind == "nbd":
        backend = NbdBackend(capacity=int(conf.get("nbd_capacity", 1 << 30)))
    made = StorageState(
        UnitStore(kernel.data_dir / "storage", backend, quota=quota, sync=conf.get("sync", "single"))
    )
    kernel.stash[KEY] = made
    return made


def store_of(kernel: Kernel) -> UnitStore:
    return state(kernel).store


def on_destroy_policy(kernel: Kernel, vm: VM) -> str:
    policy = vm.options.get("storage_on_destroy", settings(kernel).get("on_destroy", "retain"))
    if policy not in ON_DESTROY:
        raise InvalidArgument("storage_on_destroy", policy, "'retain' or 'delete'")
    return str(policy)


# --------------------------------------------------------------------- plugin life


@hookimpl
def vmk_configure(kernel: Kernel) -> None:
    settings(kernel)  # refuse a malformed setting at start rather than at first use


@hookimpl
def vmk_unconfigure(kernel: Kernel) -> None:
    found = kernel.stash.get(KEY, None)
    if found is not None:
        found.store.close()


# ------------------------------------------------------------------------- units


@hookimpl
def vmk_storage_unit(kernel: Kernel, vm_id: str) -> StorageUnit:
    vm_id = canonical_vm_id(vm_id)
    store = store_of(kernel)
    if store.exists(vm_id):
        return store.get(vm_id)
    if any(vm.id == vm_id for vm in kernel.vms()):
        return store.create(vm_id)
    raise UnknownResource("storage unit", vm_id, "the id of a VM of this kernel or of a saved unit")


@hookimpl
def vmk_storage_units(kernel: Kernel) -> list[StorageUnit]:
    return store_of(kernel).units()


@hookimpl
def vmk_vm_create(kernel: Kernel, vm: VM, options: Mapping[str, Any]) -> None:
    if "storage_on_destroy" in options:
        on_destroy_policy(kernel, vm)


@hookimpl
def vmk_vm_destroy(kernel: Kernel, vm: VM) -> None:
    if on_destroy_policy(kernel, vm) != "delete" or not (kernel.data_dir / "storage" / vm.id).exists():
        return  # retained, or the VM never had a unit (no store is made for nothing)
    store = store_of(kernel)
    if store.exists(vm.id):
        store.get(vm.id).delete()
        kernel.emit("storage.unit_deleted", f"vm:{vm.id}")


# ------------------------------------------------------------ save and restore


def _guest_memory(kernel: Kernel, vm: VM) -> Any:
    try:
        return kernel.guest_memory(vm)
    except FeatureUnavailable:
        return None


@hookimpl
def vmk_vm_save(kernel: Kernel, vm: VM, unit: StorageUnit) -> None:
    memory = _guest_memory(kernel, vm)
    if memory is None:
        return  # no processor plugin: the config and the disks are the state
    size = vm.memory_mib << 20
    for gpa in range(0, size, MEMORY_CHUNK):
        unit.write("memory", gpa, bytes(memory.read(gpa, min(MEMORY_CHUNK, size - gpa))))
    unit.put_object("memory.json", f'{{"bytes": {size}}}'.encode())
    kernel.emit("storage.memory_saved", f"vm:{vm.id}", bytes=size)


def _restore_memory(kernel: Kernel, vm: VM, unit: StorageUnit) -> bool:
    memory = _guest_memory(kernel, vm)
    if memory is None:
        return False
    size = min(unit.volumes()["memory"]["size"], vm.memory_mib << 20)
    for gpa in range(0, size, MEMORY_CHUNK):
        memory.write(gpa, bytes(unit.read("memory", gpa, min(MEMORY_CHUNK, size - gpa))))
    kernel.emit("storage.memory_restored", f"vm:{vm.id}", bytes=size)
    return True


@hookimpl
def vmk_vm_restore(kernel: Kernel, vm: VM, unit: StorageUnit) -> None:
    if "memory" not in unit.volumes():
        return
    if not _restore_memory(kernel, vm, unit):
        state(kernel).pending_memory.add(vm.id)  # applied when the VM next has guest memory


@hookimpl(trylast=True)
def vmk_vm_launch(kernel: Kernel, vm: VM) -> None:
    pending = state(kernel).pending_memory if kernel.stash.get(KEY, None) is not None else set()
    if vm.id in pending and _restore_memory(kernel, vm, store_of(kernel).get(vm.id)):
        pending.discard(vm.id)


@hookimpl
def vmk_rollback(kernel: Kernel, operation: str, subject: str, error: BaseException) -> None:
    found = kernel.stash.get(KEY, None)
    if found is not None and operation == "vm.restore":
        found.pending_memory.discard(subject.removeprefix("vm:"))


# ------------------------------------------------------- invariants and report


def _open_units(kernel: Kernel) -> list[StorageUnit]:
    found = kernel.stash.get(KEY, None)
    return list(found.store._units.values()) if found is not None else []


def _no_commingling(kernel: Kernel) -> str | None:
    for unit in _open_units(kernel):
        problem = unit.verify_stamps()
        if problem:
            return problem
    return None


def _acknowledged_readable(kernel: Kernel) -> str | None:
    for unit in _open_units(kernel):
        problem = unit.verify_acknowledged()
        if problem:
            return problem
    return None


@hookimpl
def vmk_invariants(kernel: Kernel) -> list[Invariant]:
    return [
        Invariant("storage.no-commingling", lambda: _no_commingling(kernel)),
        Invariant("storage.acknowledged-readable", lambda: _acknowledged_readable(kernel)),
    ]


def describe(unit: StorageUnit) -> str:
    info = unit.info()
    vols = ", ".join(f"{n} {v['size']}" for n, v in info["volumes"].items()) or "no volumes"
    quota = f" quota {info['quota']}" if info["quota"] else ""
    return f"{unit.vm_id}  {info['backend']}  {info['image_bytes']} bytes{quota}  [{vols}]"


@hookimpl
def vmk_report(kernel: Kernel) -> ReportSection | None:
    if kernel.stash.get(KEY, None) is None and not (kernel.data_dir / "storage").exists():
        return None
    units = store_of(kernel).units()
    total = sum(u.usage() for u in units)
    lines = [f"{len(units)} units, {total} bytes, backend {store_of(kernel).backend_kind}"]
    lines += [describe(u) for u in units[:20]]
    return ReportSection("Storage units", lines)


@hookimpl
def vmk_demo(kernel: Kernel, demo: Any) -> None:
    vm = kernel.create_vm("storage-demo", memory_mib=16)
    unit = kernel.storage_unit(vm)
    demo.step(f"unit of {vm.name}: {unit.vm_id} on the {unit.backend} backend")
    data = kernel.rng_for("storage").randbytes(1 << 20)
    unit.write("disk0", 0, data)
    unit.flush()
    unit.snapshot("before-upgrade")
    unit.write("disk0", 4096, b"upgraded" * 512)
    unit.flush()
    demo.step("wrote 1 MiB to disk0, flushed, snapshotted, overwrote a block")
    kernel.save_vm(vm)
    twin = kernel.create_vm("storage-demo-twin", memory_mib=16)
    clone = unit.clone(twin.id, snapshot="before-upgrade")
    same = clone.read("disk0", 0, len(data)) == data
    demo.step(f"cloned the snapshot into {twin.name}'s unit (restamped, identical: {same})")
    problems = sum(len(p) for p in store_of(kernel).check().values())
    demo.step(f"scanned every unit: {problems} problems")
    demo.record("units", len(kernel.storage_units()))
    demo.record("clone_identical", same)
    demo.record("check_problems", problems)


# ----------------------------------------------------------------------------- CLI


def _cli_store(ctx: click.Context, data_dir: str | None) -> UnitStore:
    from vmkernel.cli import DEFAULT_DATA_DIR

    root_obj = ctx.find_root().obj or {}
    base = Path(data_dir or root_obj.get("data_dir") or DEFAULT_DATA_DIR)
    return UnitStore(base / "storage")


@hookimpl
def vmk_cli_commands(group: click.Group) -> None:
    # The commands read the data directory directly (read-only opens): they work on a
    # directory another kernel is using, and need no kernel of their own.
    data_dir_option = click.option(
        "--data-dir",
        type=click.Path(file_okay=False),
        default=None,
        help="Data directory (default: the vmkernel group's).",
    )

    @group.group("storage")
    def storage() -> None:
        """Per-VM storage units under the data directory."""

    @storage.command("ls")
    @data_dir_option
    @click.pass_context
    def ls(ctx: click.Context, data_dir: str | None) -> None:
        """List units: owner VM, backend, image size, quota and volumes."""
        store = _cli_store(ctx, data_dir)
        try:
            units = store.units()
            for unit in units:
                try:
                    click.echo(describe(unit))
                except VmkError as exc:
                    click.echo(f"{unit.vm_id}  unreadable: {exc}")
            click.echo(f"{len(units)} units")
        finally:
            store.close()

    @storage.command("check")
    @data_dir_option
    @click.pass_context
    def check(ctx: click.Context, data_dir: str | None) -> None:
        """Verify every checksum and owner stamp of every unit; changes nothing.

        Exits 1 when a unit has a problem beyond a torn tail (a torn tail is
        an unacknowledged write cut short by a crash; the next writer drops it).
        """
        store = _cli_store(ctx, data_dir)
        try:
            report = store.check()
        finally:
            store.close()
        bad = 0
        for vm_id, problems in report.items():
            serious = [p for p in problems if p.kind != "torn-tail"]
            bad += bool(serious)
            click.echo(f"{vm_id}: {'problems' if serious else 'ok'}")
            for p in problems:
                click.echo(f"  {p.kind} at offset {p.offset}: {p.message}")
        click.echo(f"{len(report)} units checked, {bad} with problems")
        ctx.exit(1 if bad else 0)
