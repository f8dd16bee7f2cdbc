"""A per-owner VM quota and a read-only ``viewer`` role.

The quota is read from ``kernel.config["quota.max_vms_per_owner"]`` once, in
``vmk_configure``, and kept with a refusal counter under a ``StashKey`` so
that two kernels in one process never share it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click

from vmkernel import (
    VM,
    Decision,
    Invariant,
    Kernel,
    Principal,
    ReportSection,
    StashKey,
    hookimpl,
)
from vmkernel.errors import CapacityError, InvalidArgument

SETTING = "quota.max_vms_per_owner"
READ_ONLY_ROLE = "viewer"


@dataclass
class QuotaState:
    limit: int | None
    refused: int = 0


STATE = StashKey[QuotaState]("example-quota")


def live_vms(kernel: Kernel, owner: str) -> int:
    return sum(1 for vm in kernel.vms() if vm.owner == owner)


@hookimpl
def vmk_configure(kernel: Kernel) -> None:
    limit = kernel.config.get(SETTING)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise InvalidArgument(SETTING, limit, "a non-negative int number of VMs")
    kernel.stash[STATE] = QuotaState(limit)


@hookimpl
def vmk_vm_create(kernel: Kernel, vm: VM, options: dict[str, Any]) -> None:
    state = kernel.stash[STATE]
    if state.limit is None:
        return
    count = live_vms(kernel, vm.owner)  # the new VM is already in the registry
    if count > state.limit:
        state.refused += 1  # not rolled back on purpose: it counts refusals
        raise CapacityError(f"vms of owner {vm.owner}", count, str(state.limit))


@hookimpl
def vmk_authorize(kernel: Kernel, principal: Principal, operation: str, resource: str) -> Decision | None:
    if READ_ONLY_ROLE in principal.roles and operation.startswith("vm."):
        return Decision.deny(f"role {READ_ONLY_ROLE} is read-only", source="example-quota")
    return None


@hookimpl
def vmk_invariants(kernel: Kernel) -> list[Invariant]:
    def within_quota() -> str | None:
        limit = kernel.stash[STATE].limit
        if limit is None:
            return None
        for owner in {vm.owner for vm in kernel.vms()}:
            if live_vms(kernel, owner) > limit:
                return f"owner {owner} has {live_vms(kernel, owner)} VMs, quota {limit}"
        return None

    return [Invariant("example-quota.within-quota", within_quota)]


@hookimpl
def vmk_report(kernel: Kernel) -> ReportSection:
    state = kernel.stash[STATE]
    limit = "off" if state.limit is None else f"{state.limit} VMs per owner"
    return ReportSection("example-quota", [f"quota: {limit}", f"creates refused: {state.refused}"])


@hookimpl
def vmk_demo(kernel: Kernel, demo: Any) -> None:
    demo.step("a viewer tries to stop a VM")
    kernel.add_principal("vera", roles=[READ_ONLY_ROLE])
    web = kernel.vm("web")
    try:
        kernel.stop_vm(web, principal="vera")
        demo.record("viewer refused", False)
    except Exception as exc:  # AuthorizationDenied: shown in the report
        demo.record("viewer refused", type(exc).__name__)


@hookimpl
def vmk_cli_commands(group: click.Group) -> None:
    @group.group("quota")
    def quota() -> None:
        """The example per-owner VM quota."""

    @quota.command("show")
    @click.option("--limit", type=int, default=None, help="Quota to show the effect of.")
    def show(limit: int | None) -> None:
        """Show the quota setting and how to set it."""
        click.echo(f"setting: Kernel(config={{'{SETTING}': N}}); shown with --limit: {limit}")
