"""The resource model: what a kernel's registry holds.

Resources are plain mutable records.  The kernel is the only writer: every
change goes through the registry, which logs how to undo it while an
operation is open, so a hook failure can put everything back exactly.
Plugins that need to change a field use ``Kernel.update``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from vmkernel.enums import VMState
from vmkernel.errors import DuplicateResource, InvalidArgument, UnknownResource

__all__ = ["VM", "Container", "Disk", "Host", "Image", "Link", "Network", "Principal", "Registry", "Resource"]


@dataclass(slots=True, eq=False)
class Host:
    """A virtualization host in the cluster."""

    id: str
    name: str
    memory_mib: int
    cpus: int
    state: str = "up"
    kind = "host"


@dataclass(slots=True, eq=False)
class VM:
    """A virtual machine.  ``id`` is a UUID derived from the kernel's seed."""

    id: str
    name: str
    memory_mib: int
    vcpus: int
    state: VMState
    created_ns: int
    host_id: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    #: the principal that created it
    owner: str = "operator"
    kind = "vm"

    def to_config(self) -> dict[str, Any]:
        """The VM's definition as saved into its storage unit."""
        return {
            "id": self.id,
            "name": self.name,
            "memory_mib": self.memory_mib,
            "vcpus": self.vcpus,
            "options": dict(self.options),
            "created_ns": self.created_ns,
            "owner": self.owner,
        }


@dataclass(slots=True, eq=False)
class Container:
    """A containerized application launched by a host OS."""

    id: str
    name: str
    host_id: str
    image: str
    state: str = "running"
    options: dict[str, Any] = field(default_factory=dict)
    kind = "container"


@dataclass(slots=True, eq=False)
class Network:
    """A virtual network (a VXLAN/Geneve segment when ``vni`` is set)."""

    id: str
    name: str
    vni: int | None = None
    kind = "network"


@dataclass(slots=True, eq=False)
class Image:
    """A base image that disks derive from."""

    id: str
    name: str
    meta: dict[str, Any] = field(default_factory=dict)
    state: str = "current"
    kind = "image"


@dataclass(slots=True, eq=False)
class Disk:
    """A virtual disk, possibly derived from a base image and attached to one VM."""

    id: str
    name: str
    size_bytes: int
    base_image_id: str | None = None
    attached_to: str | None = None
    kind = "disk"


@dataclass(slots=True, eq=False)
class Link:
    """A network link between two sites, measured by samples."""

    id: str
    a: str
    b: str
    kind = "link"

    @property
    def name(self) -> str:
        return self.id


@dataclass(slots=True, eq=False)
class Principal:
    """Someone who asks the kernel to do things."""

    id: str
    roles: tuple[str, ...] = ()
    kind = "principal"

    @property
    def name(self) -> str:
        return self.id


Resource = Host | VM | Container | Network | Image | Disk | Link | Principal
R = TypeVar("R", Host, VM, Container, Network, Image, Disk, Link, Principal)

KINDS = ("host", "vm", "container", "network", "image", "disk", "link", "principal")


class Registry:
    """Resources by kind and id, with an undo log for open operations."""

    def __init__(self) -> None:
        self._by_kind: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
        # Live resources are unique by name within a kind, so scripts can say "web".
        self._names: dict[str, dict[str, str]] = {kind: {} for kind in KINDS}
        self._undo: list[Callable[[], None]] | None = None

    # -- undo log ------------------------------------------------------------
    def begin(self) -> list[Callable[[], None]] | None:
        """Start logging undo steps; returns the enclosing log to restore with :meth:`end`."""
        outer = self._undo
        self._undo = []
        return outer

    def end(self, outer: list[Callable[[], None]] | None, *, commit: bool) -> None:
        """Close the current log: commit folds it into the enclosing one, else undo it."""
        log = self._undo
        self._undo = outer
        if log is None:
            return
        if commit:
            if outer is not None:
                outer.extend(log)
        else:
            for step in reversed(log):
                step()

    def log_undo(self, step: Callable[[], None]) -> None:
        """Record how to undo a change made outside the registry (within an open operation)."""
        if self._undo is not None:
            self._undo.append(step)

    # -- changes -------------------------------------------------------------
    def add(self, resource: Any) -> None:
        table = self._by_kind[resource.kind]
        names = self._names[resource.kind]
        if resource.id in table:
            raise DuplicateResource(resource.kind, resource.id)
        if resource.name in names:
            raise DuplicateResource(resource.kind, resource.name)
        table[resource.id] = resource
        names[resource.name] = resource.id

        def undo() -> None:
            table.pop(resource.id, None)
            names.pop(resource.name, None)

        self.log_undo(undo)

    def remove(self, resource: Any) -> None:
        table = self._by_kind[resource.kind]
        if resource.id not in table or table[resource.id] is not resource:
            raise UnknownResource(resource.kind, resource.id)
        names = self._names[resource.kind]
        del table[resource.id]
        names.pop(resource.name, None)

        def undo() -> None:
            table[resource.id] = resource
            names[resource.name] = resource.id

        self.log_undo(undo)

    def set(self, resource: Any, name: str, value: Any) -> None:
        if name in ("id", "name", "kind"):
            raise InvalidArgument("field", name, "a field other than id, name and kind (they identify it)")
        old = getattr(resource, name)
        setattr(resource, name, value)
        self.log_undo(lambda: setattr(resource, name, old))

    # -- queries -------------------------------------------------------------
    def get(self, kind: str, ident: str) -> Any:
        try:
            return self._by_kind[kind][ident]
        except KeyError:
            raise UnknownResource(kind, ident) from None

    def find(self, kind: str, ident: str) -> Any:
        """The resource with id ``ident``, else the one named ``ident``, else ``None``."""
        table = self._by_kind[kind]
        found = table.get(ident)
        if found is None:
            by_name = self._names[kind].get(ident)
            if by_name is not None:
                found = table.get(by_name)
        return found

    def all(self, kind: str) -> list[Any]:
        return list(self._by_kind[kind].values())

    def count(self, kind: str) -> int:
        return len(self._by_kind[kind])

    def __iter__(self) -> Iterator[Any]:
        for table in self._by_kind.values():
            yield from table.values()
