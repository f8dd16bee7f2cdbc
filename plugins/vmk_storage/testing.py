"""Test support for storage units: pytest fixtures that run a suite on every backend.

Import the fixtures into a test module (``from vmk_storage.testing import
make_store, storage_backend``).  ``storage_backend`` is parametrized over
``local`` and ``nbd``; the NBD case starts real qemu-nbd servers (one per
unit image) and skips, saying why, only when qemu-nbd is not installed.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmk_storage.nbd import NbdBackend, qemu_nbd_path
from vmk_storage.store import UnitStore
from vmk_storage.unit import StorageUnit

BACKENDS = ("local", "nbd")
NBD_MISSING = "qemu-nbd not found: install Debian's qemu-utils to run the NBD backend"


def new_vm_id(rng: Any = None) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4)) if rng is not None else str(uuid.uuid4())


def unit_digest(unit: StorageUnit) -> str:
    """A digest of everything a unit returns: volumes (every block), objects, snapshots."""
    h = hashlib.sha256()
    for name, vol in sorted(unit.volumes().items()):
        h.update(name.encode() + vol["size"].to_bytes(8, "little"))
        h.update(unit.read(name, 0, vol["size"]))
    for obj in unit.objects():
        h.update(obj.encode() + unit.get_object(obj))
    for snap in unit.snapshots():
        h.update(snap.encode())
    return h.hexdigest()


@pytest.fixture(params=BACKENDS)
def storage_backend(request: pytest.FixtureRequest) -> str:
    if request.param == "nbd" and qemu_nbd_path() is None:
        pytest.skip(NBD_MISSING)
    return str(request.param)


@pytest.fixture
def make_store(storage_backend: str, tmp_path: Path) -> Iterator[Callable[..., UnitStore]]:
    """Factory of stores on the parametrized backend; ``make_store(root=None, **kw)``.

    Stores on the same root share the NBD runtime directory, so a second
    store finds the servers of the first like another process would.
    """
    made: list[UnitStore] = []
    runtime = Path(tempfile.mkdtemp(prefix="vmknbd-"))

    def factory(root: Path | None = None, **kwargs: Any) -> UnitStore:
        root = root or tmp_path / "units"
        backend: str | NbdBackend = "local"
        capacity = kwargs.pop("capacity", 64 << 20)
        if storage_backend == "nbd":
            backend = NbdBackend(runtime, capacity=capacity)
        store = UnitStore(root, backend, **kwargs)
        made.append(store)
        return store

    yield factory
    for store in reversed(made):
        store.close()
    # Servers started by a store that a test abandoned without closing, or by a killed child.
    NbdBackend(runtime).stop_all()
    shutil.rmtree(runtime, ignore_errors=True)
