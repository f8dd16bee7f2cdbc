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
``ordered``, see :meth:`StorageUnit.flush`), ``replicate_to`` (another data
directory: every ``save_vm`` then brings the VM's replica there up to date).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import orjson

from vmk_storage import images
from vmk_storage.nbd import NbdBackend
from vmk_storage.store import UnitStore, canonical_vm_id
from vmk_storage.unit import StorageUnit
from vmkernel import VM, Invariant, Kernel, ReportSection, StashKey, hookimpl
from vmkernel.errors import CorruptUnit, FeatureUnavailable, InvalidArgument, UnknownResource, VmkError

ON_DESTROY = ("retain", "delete")
MEMORY_CHUNK = 4 << 20
SAVED_SNAPSHOT = "vm.saved"  # the unit's state as the last save_vm left it
MANIFEST = "vm.manifest"  # BLAKE3 of every volume and object at that save


@dataclass
class StorageState:
    store: UnitStore
    replicas: UnitStore | None = None  # the store save_vm replicates into, when configured
    pending_memory: set[str] = field(default_factory=set)
    # VM id -> snapshot holding the state a restore reverted away from (undone on rollback)
    reverted: dict[str, str] = field(default_factory=dict)


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
    replica_dir = conf.get("replicate_to")
    if replica_dir is not None:
        if not isinstance(replica_dir, str | Path):
            raise InvalidArgument("config['storage']['replicate_to']", replica_dir, "a directory path")
        made.replicas = UnitStore(Path(replica_dir) / "storage")
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
        if found.replicas is not None:
            found.replicas.close()


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


def _content(unit: StorageUnit, snapshot: str | None = None) -> dict[str, str]:
    ids = unit.content_ids(snapshot=snapshot)
    ids.pop(f"object:{MANIFEST}", None)
    return ids


@hookimpl(trylast=True)  # after every other plugin has put its part of the state into the unit
def vmk_vm_save(kernel: Kernel, vm: VM, unit: StorageUnit) -> None:
    memory = _guest_memory(kernel, vm)
    if memory is not None:  # without a processor plugin the config and the disks are the state
        size = vm.memory_mib << 20
        written = _save_memory(unit, memory, size)
        unit.put_object("memory.json", f'{{"bytes": {size}}}'.encode())
        kernel.emit("storage.memory_saved", f"vm:{vm.id}", bytes=size, written=written)
    content = _content(unit)
    unit.put_object(MANIFEST, orjson.dumps({"vm": vm.id, "content": content}, option=orjson.OPT_SORT_KEYS))
    if SAVED_SNAPSHOT in unit.snapshots():
        unit.delete_snapshot(SAVED_SNAPSHOT)
    unit.snapshot(SAVED_SNAPSHOT)
    kernel.emit("storage.saved", f"vm:{vm.id}", content=content)
    replicas = state(kernel).replicas
    if replicas is not None:
        result = unit.replicate_to(replicas)
        kernel.emit("storage.replicated", f"vm:{vm.id}", mode=result["mode"], bytes=result["bytes"])


def _verify_saved(kernel: Kernel, vm: VM, unit: StorageUnit) -> None:
    """Check the saved state against its manifest; return the unit to it if it changed since."""
    state(kernel).reverted.pop(vm.id, None)
    if SAVED_SNAPSHOT not in unit.snapshots():
        return  # saved before manifests existed, or never saved: nothing to hold it to
    manifest = orjson.loads(bytes(unit.get_object(MANIFEST, snapshot=SAVED_SNAPSHOT)))
    found = _content(unit, SAVED_SNAPSHOT)
    if found != manifest.get("content"):
        differ = sorted(
            k for k in set(found) | set(manifest["content"]) if found.get(k) != manifest["content"].get(k)
        )
        raise CorruptUnit(
            unit.vm_id,
            None,
            f"the saved state no longer matches its manifest ({', '.join(differ)})",
            {k: found.get(k) for k in differ},
            "the BLAKE3 content ids recorded by save_vm",
        )
    changed = unit.changed_since(SAVED_SNAPSHOT)
    changed = [c for c in changed if c != f"object:{MANIFEST}"]
    if not changed:
        return
    # Written after the save: keep that state under a new snapshot, then go back to the save.
    taken = set(unit.snapshots())
    keep = next(f"vm.unsaved-{n}" for n in range(1, len(taken) + 2) if f"vm.unsaved-{n}" not in taken)
    unit.snapshot(keep)
    unit.revert(SAVED_SNAPSHOT)
    state(kernel).reverted[vm.id] = keep
    kernel.emit("storage.reverted_to_save", f"vm:{vm.id}", changed=changed, kept_as=keep)


def _save_memory(unit: StorageUnit, memory: Any, size: int) -> int:
    """Write the guest memory image into the ``memory`` volume; returns the bytes written.

    When the memory object lists the pages that hold data (``pages()``, as the
    processor's does), only those are written and the rest of the volume is
    discarded: a mostly idle 1 GiB guest saves in proportion to what it uses.
    The last page is always written so the volume's size is the memory size.
    """
    listed = getattr(memory, "pages", None)
    if not callable(listed):
        for gpa in range(0, size, MEMORY_CHUNK):
            unit.write("memory", gpa, bytes(memory.read(gpa, min(MEMORY_CHUNK, size - gpa))))
        return size
    page = 4096
    pages = sorted({p for p in listed() if 0 <= p < size} | {size - page})
    unit.discard("memory", 0, max(size, unit.volumes().get("memory", {}).get("size", 0)))
    written = 0
    i = 0
    while i < len(pages):  # runs of consecutive pages, at most MEMORY_CHUNK each
        start = pages[i]
        j = i + 1
        while j < len(pages) and pages[j] == start + (j - i) * page and (j - i) * page < MEMORY_CHUNK:
            j += 1
        n = (j - i) * page
        unit.write("memory", start, bytes(memory.read(start, n)))
        written += n
        i = j
    return written


def _restore_memory(kernel: Kernel, vm: VM, unit: StorageUnit) -> bool:
    memory = _guest_memory(kernel, vm)
    if memory is None:
        return False
    size = min(unit.volumes()["memory"]["size"], vm.memory_mib << 20)
    for gpa in range(0, size, MEMORY_CHUNK):
        memory.write(gpa, bytes(unit.read("memory", gpa, min(MEMORY_CHUNK, size - gpa))))
    kernel.emit("storage.memory_restored", f"vm:{vm.id}", bytes=size)
    return True


@hookimpl(tryfirst=True)  # the unit is back at the saved state before any plugin reads it
def vmk_vm_restore(kernel: Kernel, vm: VM, unit: StorageUnit) -> None:
    _verify_saved(kernel, vm, unit)
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
        vm_id = subject.removeprefix("vm:")
        found.pending_memory.discard(vm_id)
        keep = found.reverted.pop(vm_id, None)
        if keep is not None and found.store.exists(vm_id):
            unit = found.store.get(vm_id)
            unit.revert(keep)  # the failed restore leaves the unit as it found it
            unit.delete_snapshot(keep)
            unit.flush()


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
    ids_match = clone.content_id("disk0") == unit.content_id("disk0", snapshot="before-upgrade")
    demo.step(f"BLAKE3 content id of the clone's disk0 equals the snapshot's: {ids_match}")
    qcow2 = "skipped (qemu-img not installed)"
    if images.qemu_img_path() is not None:
        with tempfile.TemporaryDirectory(prefix="vmk-demo-") as tmp:
            path = Path(tmp) / "disk0.qcow2"
            exported = unit.export_volume("disk0", path, format="qcow2")
            imported = unit.import_volume("disk1", path)
        qcow2 = "identical" if exported == imported == unit.content_id("disk0") else "DIFFERENT"
    demo.step(f"exported disk0 as qcow2 (qemu-img) and imported it back as disk1: {qcow2}")
    replicas = UnitStore(kernel.data_dir / "replica" / "storage")
    try:
        first = unit.replicate_to(replicas)
        unit.write("disk0", 8 << 20, b"written after the first replication")
        second = unit.replicate_to(replicas)
        replicated = replicas.get(unit.vm_id).content_ids() == unit.content_ids()
    finally:
        replicas.close()
    demo.step(
        f"replicated the unit to another store: {first['mode']} {first['bytes']} bytes, then "
        f"{second['mode']} {second['bytes']} bytes; replica identical: {replicated}"
    )
    problems = sum(len(p) for p in store_of(kernel).check().values())
    demo.step(f"scanned every unit: {problems} problems")
    demo.record("units", len(kernel.storage_units()))
    demo.record("clone_identical", same and ids_match)
    demo.record("qcow2_round_trip", qcow2)
    demo.record("replica_identical", replicated)
    demo.record("check_problems", problems)


# ----------------------------------------------------------------------------- CLI


def _cli_store(ctx: click.Context, data_dir: str | None) -> UnitStore:
    from vmkernel.cli import DEFAULT_DATA_DIR

    root_obj = ctx.find_root().obj or {}
    base = Path(data_dir or root_obj.get("data_dir") or DEFAULT_DATA_DIR)
    return UnitStore(base / "storage")


@contextlib.contextmanager
def _cli_session(ctx: click.Context, data_dir: str | None) -> Iterator[UnitStore]:
    """The data directory's store for one command; a vmkernel error becomes a one-line CLI error."""
    store = _cli_store(ctx, data_dir)
    try:
        yield store
    except VmkError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        store.close()


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

    @storage.command("id")
    @click.argument("vm_id")
    @click.option("--snapshot", default=None, help="A snapshot of the unit instead of its current state.")
    @data_dir_option
    @click.pass_context
    def content_id(ctx: click.Context, vm_id: str, snapshot: str | None, data_dir: str | None) -> None:
        """Print the BLAKE3 content id of every volume and object of a unit (b3sum of raw exports)."""
        with _cli_session(ctx, data_dir) as store:
            for name, digest in store.get(canonical_vm_id(vm_id)).content_ids(snapshot=snapshot).items():
                click.echo(f"{digest}  {name}")

    @storage.command("export")
    @click.argument("vm_id")
    @click.argument("volume")
    @click.argument("path", type=click.Path(dir_okay=False))
    @click.option("--format", "image_format", type=click.Choice(["raw", "qcow2"]), default="raw")
    @click.option("--snapshot", default=None, help="Export the volume as this snapshot holds it.")
    @click.option("--overwrite", is_flag=True, help="Replace PATH if it exists.")
    @data_dir_option
    @click.pass_context
    def export(
        ctx: click.Context,
        vm_id: str,
        volume: str,
        path: str,
        image_format: str,
        snapshot: str | None,
        overwrite: bool,
        data_dir: str | None,
    ) -> None:
        """Write a volume to a raw (sparse) or qcow2 image file; prints its content id."""
        with _cli_session(ctx, data_dir) as store:
            unit = store.get(canonical_vm_id(vm_id))
            digest = unit.export_volume(
                volume, path, format=image_format, snapshot=snapshot, overwrite=overwrite
            )
            click.echo(f"{digest}  {path}")

    @storage.command("import")
    @click.argument("vm_id")
    @click.argument("volume")
    @click.argument("path", type=click.Path(dir_okay=False))
    @click.option(
        "--format",
        "image_format",
        type=click.Choice(["raw", "qcow2"]),
        default=None,
        help="qcow2 is recognised by its magic; a raw image must be named raw.",
    )
    @data_dir_option
    @click.pass_context
    def import_(
        ctx: click.Context, vm_id: str, volume: str, path: str, image_format: str | None, data_dir: str | None
    ) -> None:
        """Replace a volume of a unit with a checked copy of a qcow2 or raw image; prints its content id."""
        with _cli_session(ctx, data_dir) as store:
            digest = store.get(canonical_vm_id(vm_id)).import_volume(volume, path, format=image_format)
            click.echo(f"{digest}  {volume}")

    @storage.command("replicate")
    @click.argument("vm_id")
    @click.option(
        "--to",
        "to_dir",
        required=True,
        type=click.Path(file_okay=False),
        help="Data directory that holds (or will hold) the replica.",
    )
    @click.option("--force", is_flag=True, help="Replace a replica that was written on its own.")
    @data_dir_option
    @click.pass_context
    def replicate_cmd(ctx: click.Context, vm_id: str, to_dir: str, force: bool, data_dir: str | None) -> None:
        """Bring a unit's replica in another data directory up to date (only new records are shipped)."""
        target = UnitStore(Path(to_dir) / "storage")
        try:
            with _cli_session(ctx, data_dir) as store:
                result = store.get(canonical_vm_id(vm_id)).replicate_to(target, force=force)
                click.echo(f"{result['mode']}: {result['bytes']} bytes shipped, log end {result['log_end']}")
        finally:
            target.close()
