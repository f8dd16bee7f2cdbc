"""vmkernel: a programmable virtualization lab.

A :class:`Kernel` emulates a virtualization host cluster and its management
plane.  Every feature is a pluggy plugin (see :mod:`vmkernel.hookspecs`); the
hot loops run in a Rust core (:mod:`vmkernel.fast`) with pure-Python
references of identical API (:mod:`vmkernel.reference`).

This module is the public API: plugins and scripts import from here only.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version

from vmkernel import errors
from vmkernel._impl import implementation
from vmkernel._journal import Event, Journal
from vmkernel._kernel import DEFAULT_PRINCIPAL, KERNEL_PRINCIPAL, Kernel
from vmkernel._plugins import PluginInfo
from vmkernel._resources import VM, Container, Disk, Host, Image, Link, Network, Principal
from vmkernel._results import Decision, Effect, Invariant, ReportSection
from vmkernel._stash import Stash, StashKey
from vmkernel.enums import Access, Domain, VMState
from vmkernel.hookspecs import hookimpl, hookspec

try:
    __version__ = _dist_version("vmkernel")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_PRINCIPAL",
    "KERNEL_PRINCIPAL",
    "VM",
    "Access",
    "Container",
    "Decision",
    "Disk",
    "Domain",
    "Effect",
    "Event",
    "Host",
    "Image",
    "Invariant",
    "Journal",
    "Kernel",
    "Link",
    "Network",
    "PluginInfo",
    "Principal",
    "ReportSection",
    "Stash",
    "StashKey",
    "VMState",
    "__version__",
    "errors",
    "hookimpl",
    "hookspec",
    "implementation",
]
