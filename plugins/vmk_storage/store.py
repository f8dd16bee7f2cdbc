"""The set of storage units under one directory, on one backend.

Design note.  Layout: ``<root>/<vm id>/unit.img`` (the image) and
``<root>/<vm id>/lock`` (the writer lock).  A new unit is built in a
``.new-<id>`` directory and renamed into place, so a crash never leaves half a
unit under a VM's name.  Deleting marks the image destroyed first, then renames
the directory to ``.gone-<id>`` and removes it; a crash in between leaves a
unit that refuses to open (:class:`UnitDestroyed`) until :meth:`purge`
finishes the job.  The directory name is the owner: a unit whose superblock
names another VM raises :class:`OwnerMismatch` on open.

The backend decides how images are reached: ``"local"`` opens the file,
an :class:`~vmk_storage.nbd.NbdBackend` serves it through qemu-nbd.  Both
use the same image format, so either can open a unit the other wrote.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from vmk_storage import format as fmt
from vmk_storage.device import Device, LocalDevice, PwritevFn, fsync_dir
from vmk_storage.nbd import NbdBackend
from vmk_storage.unit import IMAGE, Problem, StorageUnit
from vmkernel.errors import DuplicateResource, InvalidArgument, StorageError, UnitDestroyed


def canonical_vm_id(vm_id: object) -> str:
    if not isinstance(vm_id, str):
        raise InvalidArgument("vm_id", vm_id, "a VM id (UUID string)")
    try:
        return str(uuid.UUID(vm_id))
    except ValueError:
        raise InvalidArgument("vm_id", vm_id, "a VM id (UUID string)") from None


class UnitStore:
    """Storage units under ``root``.

    :param root: the directory holding one sub-directory per unit.
    :param backend: ``"local"`` or an :class:`NbdBackend`.
    :param quota: default quota (bytes) of new units; ``None`` for none.
    :param sync: ``"single"`` (one sync per flush) or ``"ordered"`` (records, sync, superblock, sync).
    :param pwritev: local backend only: the write function (tests inject ``ENOSPC``).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        backend: str | NbdBackend = "local",
        *,
        quota: int | None = None,
        sync: str = "single",
        pwritev: PwritevFn | None = None,
    ) -> None:
        if sync not in ("single", "ordered"):
            raise InvalidArgument("sync", sync, "'single' or 'ordered'")
        self.sync = sync
        if not (backend == "local" or isinstance(backend, NbdBackend)):
            raise InvalidArgument("backend", backend, "'local' or an NbdBackend")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.backend = backend
        self.quota = quota
        self._pwritev = pwritev
        self._units: dict[str, StorageUnit] = {}

    @property
    def backend_kind(self) -> str:
        return "local" if self.backend == "local" else "nbd"

    # ------------------------------------------------------------- devices
    def open_device(self, image: Path, *, writable: bool) -> Device:
        if isinstance(self.backend, NbdBackend):
            return self.backend.open_device(image, writable=writable)
        return LocalDevice(image, writable=writable, pwritev=self._pwritev)

    def release_device(self, image: Path) -> None:
        """Stop serving ``image`` (before it is renamed or removed)."""
        if isinstance(self.backend, NbdBackend):
            self.backend.stop_server(image)

    # --------------------------------------------------------------- units
    def path_of(self, vm_id: str) -> Path:
        return self.root / canonical_vm_id(vm_id)

    def exists(self, vm_id: str) -> bool:
        return (self.path_of(vm_id) / IMAGE).exists()

    def get(self, vm_id: str) -> StorageUnit:
        """The unit of ``vm_id`` (opened lazily: errors surface on first use)."""
        vm_id = canonical_vm_id(vm_id)
        unit = self._units.get(vm_id)
        if unit is None or unit.deleted:
            unit = StorageUnit(self, vm_id, self.root / vm_id)
            self._units[vm_id] = unit
        return unit

    def create(self, vm_id: str, *, quota: int | None = None) -> StorageUnit:
        """Create the unit of ``vm_id`` (DuplicateResource if it exists)."""
        vm_id = canonical_vm_id(vm_id)
        final = self.root / vm_id
        if final.exists():
            raise DuplicateResource("storage unit", vm_id)
        quota = self.quota if quota is None else quota
        if quota is not None and (not isinstance(quota, int) or quota < fmt.LOG_START):
            raise InvalidArgument("quota", quota, f"None or a byte count >= {fmt.LOG_START}")
        tmp = self.root / f".new-{vm_id}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.new_image(tmp, vm_id, quota=quota)
            os.rename(tmp, final)
            fsync_dir(self.root)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StorageError(
                vm_id, None, "could not create the unit", str(exc), "a writable data directory"
            ) from exc
        return self.get(vm_id)

    def new_image(self, directory: Path, vm_id: str, *, quota: int | None) -> None:
        """Make ``directory`` hold an empty unit image of ``vm_id`` (both superblocks valid), durably."""
        directory.mkdir()
        sb = fmt.Superblock(owner=fmt.owner_bytes(vm_id), quota=quota or 0, backend=self.backend_kind)
        with open(directory / IMAGE, "wb") as f:
            for _ in (0, 1):  # both slots valid from the start
                sb.generation += 1
                f.seek(sb.slot_offset)
                f.write(sb.pack().ljust(fmt.SB_SLOT, b"\0"))
            f.flush()
            os.fsync(f.fileno())
        (directory / "lock").touch()
        fsync_dir(directory)

    def open_or_create(self, vm_id: str) -> StorageUnit:
        return self.get(vm_id) if self.exists(vm_id) else self.create(vm_id)

    def unit_ids(self) -> list[str]:
        """Ids of every unit directory (destroyed-but-not-purged ones included)."""
        out = []
        for entry in sorted(self.root.iterdir()) if self.root.exists() else []:
            if entry.name.startswith(".") or not (entry / IMAGE).exists():
                continue
            try:
                out.append(canonical_vm_id(entry.name))
            except InvalidArgument:
                continue
        return out

    def units(self) -> list[StorageUnit]:
        """Every live unit (units of destroyed VMs awaiting purge are left out)."""
        found = []
        for vm_id in self.unit_ids():
            unit = self.get(vm_id)
            try:
                unit.usage()  # opens the unit (read-only)
            except UnitDestroyed:
                continue
            except StorageError:
                pass  # a damaged unit is still listed; `check` says what is wrong
            found.append(unit)
        return found

    def remove_dir(self, unit: StorageUnit) -> None:
        gone = self.root / f".gone-{unit.vm_id}"
        shutil.rmtree(gone, ignore_errors=True)
        os.rename(unit.path, gone)
        fsync_dir(self.root)
        shutil.rmtree(gone, ignore_errors=True)
        self._units.pop(unit.vm_id, None)

    def delete(self, vm_id: str) -> None:
        self.get(vm_id).delete()

    def purge(self) -> list[str]:
        """Finish interrupted deletions; returns the ids removed."""
        removed = []
        for entry in list(self.root.iterdir()):
            if entry.name.startswith((".gone-", ".new-")):
                shutil.rmtree(entry, ignore_errors=True)
                continue
            try:
                vm_id = canonical_vm_id(entry.name)
            except InvalidArgument:
                continue
            try:
                self.get(vm_id).usage()
            except UnitDestroyed:
                unit = self._units.pop(vm_id)
                unit._close_device()
                self.release_device(entry / IMAGE)
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(vm_id)
            except StorageError:
                continue
        fsync_dir(self.root)
        return removed

    def check(self) -> dict[str, list[Problem]]:
        """Scan every unit; unit id -> problems (empty when sound).  Changes nothing."""
        return {vm_id: self.get(vm_id).check() for vm_id in self.unit_ids()}

    def close_units(self) -> None:
        """Close every unit (flush, mark clean, release locks); NBD servers keep running."""
        for unit in list(self._units.values()):
            unit.close()
        self._units.clear()

    def close(self) -> None:
        """Close every unit and stop the NBD servers this store's backend started."""
        self.close_units()
        if isinstance(self.backend, NbdBackend):
            self.backend.close()
