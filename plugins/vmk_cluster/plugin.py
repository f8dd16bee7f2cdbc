"""Placement of VMs on the cluster's hosts.

Design: the plugin keeps no state of its own.  A VM's host is a field of the
VM in the kernel's registry (set through ``kernel.update`` so a rolled-back
create also un-places it), and a host's used memory is derived from the VMs
placed on it, so there is nothing that could drift out of step.

Policy: a new VM goes to the host with the most free memory (ties broken by
host name); ``create_vm(..., host="name")`` pins it.  A VM that fits nowhere
is refused with ``CapacityError``.  A leaving host is evacuated onto the
others by the same rule, or refused if its VMs do not fit.  With no hosts at
all (a single embedded host) VMs stay unplaced.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from vmkernel import VM, Host, Invariant, Kernel, ReportSection, hookimpl
from vmkernel.errors import CapacityError, IllegalTransition, InvalidArgument


def used_mib(kernel: Kernel, host: Host) -> int:
    return sum(vm.memory_mib for vm in kernel.vms() if vm.host_id == host.id)


def free_mib(kernel: Kernel, host: Host) -> int:
    return host.memory_mib - used_mib(kernel, host)


def choose_host(kernel: Kernel, memory_mib: int, exclude: str | None = None) -> Host | None:
    """The up host with the most free memory that fits ``memory_mib``; ties by name."""
    fits = [
        h for h in kernel.hosts() if h.id != exclude and h.state == "up" and free_mib(kernel, h) >= memory_mib
    ]
    if not fits:
        return None
    return min(fits, key=lambda h: (-free_mib(kernel, h), h.name))


@hookimpl
def vmk_vm_create(kernel: Kernel, vm: VM, options: dict[str, Any]) -> None:
    if not kernel.hosts():
        return
    pinned = options.get("host")
    if pinned is not None:
        host = kernel.host(pinned)
        if free_mib(kernel, host) < vm.memory_mib:
            raise CapacityError(
                f"memory of host {host.name}",
                f"{vm.memory_mib} MiB for vm {vm.name}",
                f"{free_mib(kernel, host)} MiB free",
            )
    else:
        best = choose_host(kernel, vm.memory_mib)
        if best is None:
            most = max((free_mib(kernel, h) for h in kernel.hosts()), default=0)
            raise CapacityError(
                "cluster memory", f"{vm.memory_mib} MiB for vm {vm.name}", f"{most} MiB free on any one host"
            )
        host = best
    kernel.update(vm, host_id=host.id)
    kernel.emit("cluster.place", f"vm:{vm.id}", host=host.id, free_mib=free_mib(kernel, host))


@hookimpl
def vmk_host_leave(kernel: Kernel, host: Host) -> None:
    """Evacuate the leaving host's VMs, largest first, or refuse."""
    placed = sorted(
        (vm for vm in kernel.vms() if vm.host_id == host.id), key=lambda v: (-v.memory_mib, v.name)
    )
    for vm in placed:
        target = choose_host(kernel, vm.memory_mib, exclude=host.id)
        if target is None:
            raise IllegalTransition(
                "host",
                host.id,
                f"holding vm {vm.name} ({vm.memory_mib} MiB)",
                "leave",
                ["a host whose VMs fit on the remaining hosts"],
            )
        kernel.update(vm, host_id=target.id)
        kernel.emit("cluster.migrate", f"vm:{vm.id}", source=host.id, target=target.id, state=vm.state.value)


def _no_overcommit(kernel: Kernel) -> str | None:
    for h in kernel.hosts():
        used = used_mib(kernel, h)
        if used > h.memory_mib:
            return f"host {h.name} has {used} MiB placed on {h.memory_mib} MiB"
    return None


def _placement_valid(kernel: Kernel) -> str | None:
    hosts = {h.id for h in kernel.hosts()}
    for vm in kernel.vms():
        if hosts and vm.host_id not in hosts:
            return f"vm {vm.name} is placed on {vm.host_id!r}, which is not a host of the cluster"
    return None


@hookimpl
def vmk_invariants(kernel: Kernel) -> list[Invariant]:
    return [
        Invariant("cluster.no-overcommit", lambda: _no_overcommit(kernel)),
        Invariant("cluster.placement-valid", lambda: _placement_valid(kernel)),
    ]


@hookimpl
def vmk_report(kernel: Kernel) -> ReportSection:
    lines = [
        f"{h.name}: {used_mib(kernel, h)}/{h.memory_mib} MiB placed, "
        f"{sum(1 for vm in kernel.vms() if vm.host_id == h.id)} VMs"
        for h in sorted(kernel.hosts(), key=lambda h: h.name)
    ]
    return ReportSection("cluster", lines or ["no hosts: VMs run on the embedded host"])


@hookimpl
def vmk_demo(kernel: Kernel, demo: Any) -> None:
    demo.step("host-c joins; 6 more VMs are placed across the hosts by free memory")
    kernel.add_host("host-c", memory_mib=32768, cpus=8)
    for i in range(6):
        kernel.create_vm(f"worker-{i}", memory_mib=8192)
    try:
        kernel.create_vm("huge", memory_mib=1 << 20)
    except CapacityError as exc:
        demo.step(f"refused as expected: {exc}")
        demo.record("overcommit refused", True)
    demo.step("host-c leaves: its VMs migrate to the other hosts")
    kernel.remove_host("host-c")
    moved = len(kernel.journal.of_kind("cluster.migrate"))
    demo.record("migrations", moved)
    demo.record("placement", {h.name: used_mib(kernel, h) for h in kernel.hosts()})


@hookimpl
def vmk_cli_commands(group: click.Group) -> None:
    @group.group("cluster")
    def cluster() -> None:
        """Placement of VMs on the cluster's hosts."""

    @cluster.command("simulate")
    @click.option("--hosts", type=int, default=4, show_default=True)
    @click.option("--vms", type=int, default=40, show_default=True)
    @click.option("--host-memory", type=int, default=65536, show_default=True, help="MiB per host")
    @click.pass_context
    def simulate(ctx: click.Context, hosts: int, vms: int, host_memory: int) -> None:
        """Place VMs of random sizes on HOSTS hosts and print the utilisation."""
        if hosts < 1 or vms < 0:
            raise InvalidArgument("--hosts/--vms", (hosts, vms), "at least 1 host and 0 or more VMs")
        seed = ctx.find_root().obj.get("seed", 0)
        with Kernel(seed=seed, autoload=False, plugins=[sys.modules[__name__]]) as k:
            rng = k.rng_for("cluster.simulate")
            for i in range(hosts):
                k.add_host(f"host-{i}", memory_mib=host_memory, cpus=32)
            refused = 0
            for i in range(vms):
                try:
                    k.create_vm(f"vm-{i}", memory_mib=rng.choice([512, 1024, 2048, 4096, 8192, 16384]))
                except CapacityError:
                    refused += 1
            for section in k.report()[1:]:
                click.echo(f"## {section.title}")
                for line in section.lines:
                    click.echo(f"  {line}")
            click.echo(f"placed {vms - refused} VMs, refused {refused}")
