"""Per-VM storage units for vmkernel: one unit per VM, never shared, crash safe.

Design note.  A unit holds one VM's volumes (config, data disks, swap,
memory) and named objects in one checksummed, owner-stamped, append-only
image (:mod:`vmk_storage.format`).  The image lives in the unit's directory
under the kernel's data directory and is reached either directly (local
backend) or through a qemu-nbd server and an NBD client (network backend).
:mod:`vmk_storage.plugin` wires units into the kernel (save/restore, destroy,
invariants, CLI).
"""

from __future__ import annotations

from vmk_storage.nbd import NbdBackend, NbdClient, NbdServer, qemu_nbd_path
from vmk_storage.store import UnitStore
from vmk_storage.unit import OwnedBytes, Problem, Stamp, StorageUnit

__all__ = [
    "NbdBackend",
    "NbdClient",
    "NbdServer",
    "OwnedBytes",
    "Problem",
    "Stamp",
    "StorageUnit",
    "UnitStore",
    "qemu_nbd_path",
]
