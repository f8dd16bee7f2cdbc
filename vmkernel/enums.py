"""Small enums shared by the kernel, the Rust fast paths and their references.

They are ``IntEnum`` so that the Rust extension can take them as plain
integers while Python code keeps readable names.
"""

from __future__ import annotations

import enum

__all__ = ["Access", "Domain", "VMState"]


class VMState(enum.Enum):
    """The lifecycle state of a VM (see ``Kernel.create_vm`` and friends)."""

    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    DESTROYED = "destroyed"


class Domain(enum.IntEnum):
    """A processor protection domain.  Domains are not hierarchical."""

    HYPERVISOR = 0
    OS = 1
    APPLICATION = 2


class Access(enum.IntEnum):
    """The kind of memory access being translated."""

    READ = 0
    WRITE = 1
    EXECUTE = 2
