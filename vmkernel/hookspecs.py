"""Every hook a vmkernel plugin can implement.

Design: hooks are the control plane.  Each call costs microseconds, so they
mark decisions and state changes (a VM launches, a batch of frames leaves a
NIC, the clock ticks), never per-packet or per-address work: that crosses into
the Rust core once per batch.  Every hook is prefixed ``vmk_``, typed and
documented here; ``docs/hooks.md`` lists them all and a test fails when a hook
lacks documentation or a test of its own.

Lifecycle hooks that run inside a kernel operation (``vmk_vm_create`` …) may
raise to veto the operation: the kernel then rolls the registry and the
journal back and calls :func:`vmk_rollback` so plugins can undo their own
bookkeeping.  Observer hooks (``vmk_event``, ``vmk_report``) never veto.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from vmkernel._journal import Event
    from vmkernel._kernel import Kernel
    from vmkernel._resources import VM, Container, Disk, Host, Image, Link, Principal
    from vmkernel._results import Decision, Invariant, ReportSection
    from vmkernel.demo import DemoContext

__all__ = ["hookimpl", "hookspec"]

hookspec = pluggy.HookspecMarker("vmkernel")
hookimpl = pluggy.HookimplMarker("vmkernel")

# ---------------------------------------------------------------------------
# Plugin life


@hookspec(historic=True)
def vmk_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    """Register hook specifications of a plugin's own.

    Called once per plugin manager, also for plugins registered later
    (historic).  Use ``pluginmanager.add_hookspecs(module)``.

    :param pluginmanager: the kernel's plugin manager.
    """


@hookspec
def vmk_configure(kernel: Kernel) -> None:
    """The kernel is ready: set up per-plugin state under a ``StashKey``.

    Called once, after every plugin is registered and before the first
    operation, inside the kernel's start operation: the ``kernel.start``
    event and any events emitted here reach the journal together when every
    plugin is configured, so no ``vmk_event`` observer runs before its plugin
    is set up.  Raising here aborts ``Kernel()`` with a :class:`PluginError`.

    :param kernel: the kernel being configured.
    """


@hookspec
def vmk_unconfigure(kernel: Kernel) -> None:
    """The kernel is closing: release files, servers and processes.

    Called once by ``Kernel.close()``, in reverse registration order.

    :param kernel: the kernel being closed.
    """


@hookspec
def vmk_cli_commands(group: click.Group) -> None:
    """Add subcommands to the ``vmkernel`` command line.

    Called once when the CLI starts, before any kernel exists.  Add a
    ``click.Group`` named after the feature (``vmkernel storage ls``).

    :param group: the top-level ``vmkernel`` click group.
    """


@hookspec
def vmk_demo(kernel: Kernel, demo: DemoContext) -> None:
    """Run this plugin's part of the ``vmkernel demo`` scenario.

    Called in registration order after the kernel has set up a small cluster
    (hosts, a principal, a few VMs).  Use ``demo.step(text)`` to show progress
    and ``demo.record(key, value)`` for figures that the report prints.

    :param kernel: the demo kernel, on the embedded default data directory.
    :param demo: progress and result collection for the demo report.
    """


# ---------------------------------------------------------------------------
# Cluster


@hookspec
def vmk_host_join(kernel: Kernel, host: Host) -> None:
    """A host joins the cluster.  Raise to refuse it (the join is rolled back).

    :param kernel: the kernel.
    :param host: the joining host, already in the registry.
    """


@hookspec
def vmk_host_leave(kernel: Kernel, host: Host) -> None:
    """A host leaves the cluster.  Raise to refuse (for example: VMs still placed on it).

    :param kernel: the kernel.
    :param host: the leaving host, still in the registry.
    """


# ---------------------------------------------------------------------------
# VM life


@hookspec
def vmk_vm_create(kernel: Kernel, vm: VM, options: Mapping[str, Any]) -> None:
    """A VM is being created.  Raise to veto; the creation is rolled back.

    :param kernel: the kernel.
    :param vm: the new VM, in state ``CREATED``, already in the registry.
    :param options: the keyword options given to ``create_vm`` beyond name and
        memory (for example ``confidential=True``); plugins read the ones they own.
    """


@hookspec
def vmk_vm_launch(kernel: Kernel, vm: VM) -> None:
    """A VM is launching.  Raise to veto; the launch is rolled back.

    :param kernel: the kernel.
    :param vm: the VM, already marked ``RUNNING``.
    """


@hookspec
def vmk_vm_stop(kernel: Kernel, vm: VM) -> None:
    """A VM is stopping.  Raise to veto; the stop is rolled back.

    :param kernel: the kernel.
    :param vm: the VM, already marked ``STOPPED``.
    """


@hookspec
def vmk_vm_destroy(kernel: Kernel, vm: VM) -> None:
    """A VM is being destroyed.  Free what the plugin holds for it.  Raise to veto.

    :param kernel: the kernel.
    :param vm: the VM, already marked ``DESTROYED`` and removed from the registry.
    """


@hookspec
def vmk_rollback(kernel: Kernel, operation: str, subject: str, error: BaseException) -> None:
    """An operation failed in a hook and the kernel rolled it back.

    Every plugin is called, including those whose hook already ran; undo any
    bookkeeping kept outside the kernel's registry for ``subject``.  Must not
    raise (an exception here is recorded as a ``plugin.error`` event).

    :param kernel: the kernel.
    :param operation: the operation name, e.g. ``vm.create``.
    :param subject: the id of the resource the operation acted on.
    :param error: the exception that caused the rollback.
    """


# ---------------------------------------------------------------------------
# Containers (host OSes running containerized applications)


@hookspec
def vmk_container_launch(kernel: Kernel, container: Container) -> None:
    """A host OS launches a containerized application.  Raise to veto.

    :param kernel: the kernel.
    :param container: the container, already marked running.
    """


@hookspec
def vmk_container_stop(kernel: Kernel, container: Container) -> None:
    """A containerized application stops (or exits).  Raise to veto.

    :param kernel: the kernel.
    :param container: the container, already marked stopped.
    """


# ---------------------------------------------------------------------------
# Disks and images


@hookspec
def vmk_disk_create(kernel: Kernel, disk: Disk, base_image: Image | None) -> None:
    """A virtual disk is created, empty or derived from a base image.  Raise to veto.

    :param kernel: the kernel.
    :param disk: the new disk.
    :param base_image: the image the disk derives from, or ``None``.
    """


@hookspec
def vmk_disk_clone(kernel: Kernel, source: Disk, clone: Disk) -> None:
    """A disk is cloned.  Raise to veto.

    :param kernel: the kernel.
    :param source: the disk being cloned.
    :param clone: the new disk.
    """


@hookspec
def vmk_disk_attach(kernel: Kernel, vm: VM, disk: Disk) -> None:
    """A disk is attached to a VM.  Raise to veto.

    :param kernel: the kernel.
    :param vm: the VM.
    :param disk: the disk, already recorded as attached to ``vm``.
    """


@hookspec
def vmk_disk_detach(kernel: Kernel, vm: VM, disk: Disk) -> None:
    """A disk is detached from a VM.  Raise to veto.

    :param kernel: the kernel.
    :param vm: the VM.
    :param disk: the disk, already recorded as detached.
    """


@hookspec
def vmk_image_replace(kernel: Kernel, old: Image, new: Image) -> None:
    """A base image is replaced by an upgraded one.  Raise to veto.

    :param kernel: the kernel.
    :param old: the image being replaced.
    :param new: its replacement, already registered.
    """


# ---------------------------------------------------------------------------
# Time


@hookspec
def vmk_tick(kernel: Kernel, now_ns: int) -> None:
    """The simulated clock moved forward.

    Called once per ``clock.advance()``, however far the clock jumped: handle
    everything that became due (leases, nonce expiry, link re-measurement).
    Raising rolls the advance back (the clock keeps its old value).

    :param kernel: the kernel.
    :param now_ns: the new time in integer nanoseconds.
    """


# ---------------------------------------------------------------------------
# Authorization


@hookspec
def vmk_authorize(kernel: Kernel, principal: Principal, operation: str, resource: str) -> Decision | None:
    """Decide whether ``principal`` may perform ``operation`` on ``resource``.

    Every operation that a principal requests passes here first.  Return a
    :class:`Decision` or ``None`` to abstain.  The kernel combines the
    decisions deny-overrides: one deny denies; with no decision at all (no
    policy plugin loaded) it allows.

    :param kernel: the kernel.
    :param principal: who asks.
    :param operation: dotted operation name, e.g. ``vm.launch``.
    :param resource: ``kind:id`` of the resource, e.g. ``vm:3f2c…``.
    """


# ---------------------------------------------------------------------------
# Memory


@hookspec(firstresult=True)
def vmk_guest_memory(kernel: Kernel, vm: VM) -> Any:
    """Return the object that owns ``vm``'s guest memory, or ``None``.

    The object offers ``read(gpa, n) -> bytes`` and ``write(gpa, data)`` at
    guest-physical addresses, as the host sees the memory: a confidential
    VM's private pages read as ciphertext.  It may also offer the page-batch
    methods ``read_pages``, ``write_pages``, ``discard_pages`` and ``pages()``
    (the pages that hold data).  The processor plugin provides it; the first
    non-``None`` result wins.

    :param kernel: the kernel.
    :param vm: a launched VM.
    """


@hookspec(firstresult=True)
def vmk_hypervisor_write(kernel: Kernel, vm: VM, gpa: int, data: bytes) -> bool | None:
    """The hypervisor writes ``data`` into ``vm``'s memory at guest-physical ``gpa``.

    A plugin that owns page semantics (memory encryption) handles the write
    and returns ``True``: on an encrypted page the bytes land raw (the
    hypervisor has no key), or it raises ``TranslationFault`` where the
    emulated hardware forbids the write.  ``None`` means plain memory.

    :param kernel: the kernel.
    :param vm: the target VM.
    :param gpa: guest-physical address.
    :param data: the bytes the hypervisor writes.
    """


@hookspec
def vmk_launch_measure(kernel: Kernel, vm: VM, measurement: bytes) -> None:
    """A VM's initial memory was measured at launch.

    :param kernel: the kernel.
    :param vm: the launching VM.
    :param measurement: the launch digest (48 bytes for SEV-SNP style).
    """


# ---------------------------------------------------------------------------
# Network


@hookspec
def vmk_frames_out(kernel: Kernel, vm: VM, nic: int, frames: Sequence[bytes]) -> Any:
    """A batch of frames leaves a VM's virtual NIC.

    Called once per batch, never per frame.  A plugin that steers traffic
    (the pre-filter) classifies the whole batch in one call and returns a
    summary object; the kernel returns every non-``None`` result.

    :param kernel: the kernel.
    :param vm: the sending VM.
    :param nic: the NIC index on that VM.
    :param frames: the raw Ethernet frames.
    """


@hookspec
def vmk_frames_in(kernel: Kernel, vm: VM, nic: int, frames: Sequence[bytes]) -> Any:
    """A batch of frames arrives at a VM's virtual NIC, to be delivered to the VM.

    The mirror of :func:`vmk_frames_out`: called once per batch, never per
    frame.  A plugin that steers traffic (the pre-filter) classifies the
    whole batch in one call, as inbound traffic, and returns a summary
    object; the kernel returns every non-``None`` result.

    :param kernel: the kernel.
    :param vm: the receiving VM.
    :param nic: the NIC index on that VM.
    :param frames: the raw Ethernet frames.
    """


@hookspec(firstresult=True)
def vmk_service_path(kernel: Kernel, vm: VM, nic: int, direction: str) -> tuple[int, int] | None:
    """Look up the service path (SPI, SI) for traffic of ``vm``'s NIC in ``direction``.

    ``direction`` is the way the traffic flows: ``"out"`` for frames the VM
    sends, ``"in"`` for frames delivered to it.

    :param kernel: the kernel.
    :param vm: the VM.
    :param nic: the NIC index.
    :param direction: ``"in"`` or ``"out"``.
    """


@hookspec(firstresult=True)
def vmk_security_inspect(kernel: Kernel, vm: VM, frames: Sequence[bytes]) -> Any:
    """The security component inspects frames the pre-filter redirected to it.

    Return verdicts for the frames (and program the flow cache); the first
    non-``None`` result wins, so a user's plugin can replace the default.

    :param kernel: the kernel.
    :param vm: the VM whose traffic it is (the sender of outbound frames, the
        receiver of inbound ones).
    :param frames: the redirected frames.
    """


@hookspec
def vmk_link_sample(kernel: Kernel, link: Link, sample: Mapping[str, Any]) -> None:
    """A measurement of a link between sites arrived (latency, bandwidth, loss).

    :param kernel: the kernel.
    :param link: the measured link.
    :param sample: ``time_ns``, ``latency_ns``, ``bandwidth_bps``, ``loss`` …
    """


# ---------------------------------------------------------------------------
# Storage


@hookspec(firstresult=True)
def vmk_storage_unit(kernel: Kernel, vm_id: str) -> Any:
    """Return the storage unit that holds ``vm_id``'s state, or ``None``.

    :param kernel: the kernel.
    :param vm_id: the VM's id (the unit outlives the VM record).
    """


@hookspec(firstresult=True)
def vmk_storage_units(kernel: Kernel) -> list[Any] | None:
    """Return every storage unit under the kernel's data directory.

    :param kernel: the kernel.
    """


@hookspec
def vmk_vm_save(kernel: Kernel, vm: VM, unit: Any) -> None:
    """Save this plugin's part of ``vm``'s state (memory image, device state) into ``unit``.

    :param kernel: the kernel.
    :param vm: the VM being saved.
    :param unit: the VM's storage unit.
    """


@hookspec
def vmk_vm_restore(kernel: Kernel, vm: VM, unit: Any) -> None:
    """Restore this plugin's part of ``vm``'s state from ``unit``.

    :param kernel: the kernel.
    :param vm: the VM being restored, already back in the registry.
    :param unit: the VM's storage unit.
    """


# ---------------------------------------------------------------------------
# Configuration from a device manager


@hookspec
def vmk_config_receive(kernel: Kernel, target: str, settings: Sequence[Mapping[str, Any]]) -> Any:
    """Configuration settings arrive from a device manager for ``target``.

    :param kernel: the kernel.
    :param target: a host id (``host:…``) or container id.
    :param settings: the settings, each with at least ``uri`` and ``value``.
    """


@hookspec
def vmk_config_report(kernel: Kernel, target: str, results: Sequence[Mapping[str, Any]]) -> None:
    """Merged configuration results are reported back to the device manager.

    :param kernel: the kernel.
    :param target: the host the results are merged for.
    :param results: one result per (setting URI, target, generation).
    """


# ---------------------------------------------------------------------------
# Confidential VMs


@hookspec(firstresult=True)
def vmk_vm_identity(kernel: Kernel, vm: VM) -> Any:
    """Return the identity certificate provisioned to ``vm`` by attestation, or ``None``.

    :param kernel: the kernel.
    :param vm: a confidential VM.
    """


@hookspec(firstresult=True)
def vmk_entropy_device(kernel: Kernel, vm: VM) -> Any:
    """Return ``vm``'s entropy device (an object with ``read(n) -> bytes``), or ``None``.

    :param kernel: the kernel.
    :param vm: the VM.
    """


# ---------------------------------------------------------------------------
# Events, testing, reporting


@hookspec
def vmk_event(kernel: Kernel, event: Event) -> None:
    """An event was committed to the journal.

    Called once per committed event, in journal order; events of an operation
    that was rolled back are never broadcast.  Observers cannot veto: an
    exception is recorded as a ``plugin.error`` event and the broadcast goes on.

    :param kernel: the kernel.
    :param event: the committed event.
    """


@hookspec
def vmk_invariants(kernel: Kernel) -> Iterable[Invariant] | None:
    """Contribute named invariant checks.

    The testing state machine runs every check after every step; a check
    returns ``None`` when it holds or a string describing the violation.

    :param kernel: the kernel.
    """


@hookspec
def vmk_report(kernel: Kernel) -> ReportSection | None:
    """Contribute a section to ``vmkernel status`` and the demo report.

    :param kernel: the kernel.
    """
