"""Random operation sequences, with hooks that randomly veto, keep every kernel invariant.

The chaos plugin vetoes a random share of lifecycle hooks, after emitting an
event and changing a registry field, so every veto exercises a full rollback.
On top of the testing kit's state machine (which checks the kernel against a
model of the VM lifecycle and runs ``check_invariants()`` after every step),
this machine adds disks and checks that nothing of a vetoed operation ever
reaches the registry or the journal.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import invariant, precondition, rule

from vmkernel import Event, Invariant, Kernel, StashKey, hookimpl
from vmkernel.errors import HookFailed, IllegalTransition, UnknownResource
from vmkernel.testing import KernelMachine

CHAOS = StashKey[dict[str, int]]("chaos")
CHAOS_RNG = StashKey[random.Random]("chaos-rng")
SEEN = StashKey[list[int]]("broadcast-seen")
VETO_RATE = 0.2


def _maybe_veto(kernel: Kernel, hook: str, resource: Any = None) -> None:
    if kernel.stash[CHAOS_RNG].random() >= VETO_RATE:
        return
    kernel.emit("chaos.before-veto", "kernel", hook=hook)
    if resource is not None and hasattr(resource, "host_id"):
        kernel.update(resource, host_id="chaos")
    kernel.stash[CHAOS][hook] = kernel.stash[CHAOS].get(hook, 0) + 1
    raise RuntimeError(f"chaos vetoes {hook}")


class Chaos:
    name = "chaos"

    @hookimpl
    def vmk_configure(self, kernel: Kernel) -> None:
        kernel.stash[CHAOS] = {}
        kernel.stash[CHAOS_RNG] = kernel.rng_for("chaos")

    @hookimpl
    def vmk_vm_create(self, kernel: Kernel, vm: Any) -> None:
        _maybe_veto(kernel, "vmk_vm_create", vm)

    @hookimpl
    def vmk_vm_launch(self, kernel: Kernel, vm: Any) -> None:
        _maybe_veto(kernel, "vmk_vm_launch", vm)

    @hookimpl
    def vmk_vm_stop(self, kernel: Kernel, vm: Any) -> None:
        _maybe_veto(kernel, "vmk_vm_stop", vm)

    @hookimpl
    def vmk_vm_destroy(self, kernel: Kernel, vm: Any) -> None:
        _maybe_veto(kernel, "vmk_vm_destroy", vm)

    @hookimpl
    def vmk_tick(self, kernel: Kernel, now_ns: int) -> None:
        _maybe_veto(kernel, "vmk_tick")

    @hookimpl
    def vmk_host_join(self, kernel: Kernel, host: Any) -> None:
        _maybe_veto(kernel, "vmk_host_join")

    @hookimpl
    def vmk_disk_attach(self, kernel: Kernel, vm: Any, disk: Any) -> None:
        _maybe_veto(kernel, "vmk_disk_attach", vm)

    @hookimpl
    def vmk_disk_detach(self, kernel: Kernel, vm: Any, disk: Any) -> None:
        _maybe_veto(kernel, "vmk_disk_detach", vm)

    @hookimpl
    def vmk_invariants(self, kernel: Kernel) -> list[Invariant]:
        def nothing_vetoed_survives() -> str | None:
            if kernel.journal.of_kind("chaos.before-veto"):
                return "an event of a vetoed operation reached the journal"
            placed = [vm.name for vm in kernel.vms() if vm.host_id == "chaos"]
            return f"a vetoed change survived on VMs {placed}" if placed else None

        def failures_journaled() -> str | None:
            vetoes = sum(kernel.stash[CHAOS].values())
            failed = len(kernel.journal.of_kind("op.failed"))
            # one op.failed per veto; a veto in a nested operation is journaled once, for the outer one
            return None if failed == vetoes else f"{failed} op.failed events for {vetoes} vetoes"

        return [
            Invariant("chaos.nothing-vetoed-survives", nothing_vetoed_survives),
            Invariant("chaos.failures-journaled", failures_journaled),
        ]


class Broadcast:
    """Checks that every committed event is broadcast once, in journal order."""

    name = "broadcast"

    @hookimpl
    def vmk_event(self, kernel: Kernel, event: Event) -> None:
        kernel.stash.setdefault(SEEN, []).append(event.seq)


class ChaosMachine(KernelMachine):
    plugins = (Chaos(), Broadcast())
    refusals = (HookFailed,)

    def __init__(self) -> None:
        super().__init__()
        self.disks: list[str] = []

    @rule(size=st.sampled_from([512, 4096, 1 << 20]))
    def create_disk(self, size: int) -> None:
        disk = self.kernel.create_disk(f"disk-{len(self.disks)}", size)
        self.disks.append(disk.id)

    @precondition(lambda self: bool(self.disks) and bool(self.model))
    @rule(data=st.data())
    def attach_or_detach(self, data: st.DataObject) -> None:
        disk = self.kernel.disk(data.draw(st.sampled_from(self.disks)))
        vm_id = data.draw(st.sampled_from(sorted(self.model)))
        before = disk.attached_to
        try:
            if disk.attached_to is None:
                self.kernel.attach_disk(vm_id, disk)
                assert disk.attached_to == vm_id
            else:
                self.kernel.detach_disk(disk.attached_to, disk)
                assert disk.attached_to is None
        except (HookFailed, IllegalTransition, UnknownResource):
            assert disk.attached_to == before

    @invariant()
    def disks_attach_to_live_vms(self) -> None:
        live = {vm.id for vm in self.kernel.vms()}
        for disk in self.kernel.disks():
            assert disk.attached_to is None or disk.attached_to in live, f"{disk} attached to a dead VM"

    @invariant()
    def broadcast_equals_journal(self) -> None:
        seen = self.kernel.stash.get(SEEN, [])
        assert seen == list(range(len(self.kernel.journal)))


TestChaosMachine = ChaosMachine.TestCase
