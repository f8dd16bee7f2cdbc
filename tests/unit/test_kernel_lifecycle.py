"""The VM lifecycle state machine, and how VMs are referred to (handles, ids, names)."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmkernel import VM, Kernel, VMState
from vmkernel.errors import DuplicateResource, IllegalTransition, InvalidArgument, UnknownResource


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    with Kernel(seed=11, data_dir=tmp_path / "k", autoload=False) as k:
        yield k


def vm_in(k: Kernel, state: VMState) -> VM:
    """A VM brought to ``state`` by legal steps."""
    vm = k.create_vm(f"vm-{len(k.journal)}")
    if state is VMState.RUNNING:
        k.launch_vm(vm)
    elif state is VMState.STOPPED:
        k.launch_vm(vm)
        k.stop_vm(vm)
    elif state is VMState.DESTROYED:
        k.destroy_vm(vm)
    assert vm.state is state
    return vm


OPS: dict[str, Callable[[Kernel, VM], Any]] = {
    "launch": lambda k, vm: k.launch_vm(vm),
    "stop": lambda k, vm: k.stop_vm(vm),
    "destroy": lambda k, vm: k.destroy_vm(vm),
    "destroy-force": lambda k, vm: k.destroy_vm(vm, force=True),
}

# (state, op) -> state after, or the error class
TABLE: dict[tuple[VMState, str], VMState | type[Exception]] = {
    (VMState.CREATED, "launch"): VMState.RUNNING,
    (VMState.CREATED, "stop"): IllegalTransition,
    (VMState.CREATED, "destroy"): VMState.DESTROYED,
    (VMState.CREATED, "destroy-force"): VMState.DESTROYED,
    (VMState.RUNNING, "launch"): IllegalTransition,
    (VMState.RUNNING, "stop"): VMState.STOPPED,
    (VMState.RUNNING, "destroy"): IllegalTransition,
    (VMState.RUNNING, "destroy-force"): VMState.DESTROYED,
    (VMState.STOPPED, "launch"): VMState.RUNNING,
    (VMState.STOPPED, "stop"): IllegalTransition,
    (VMState.STOPPED, "destroy"): VMState.DESTROYED,
    (VMState.STOPPED, "destroy-force"): VMState.DESTROYED,
    (VMState.DESTROYED, "launch"): UnknownResource,
    (VMState.DESTROYED, "stop"): UnknownResource,
    (VMState.DESTROYED, "destroy"): UnknownResource,
    (VMState.DESTROYED, "destroy-force"): UnknownResource,
}

ALLOWED = {"launch": ["created", "stopped"], "stop": ["running"], "destroy": ["created", "stopped"]}


def test_table_covers_every_state_and_operation() -> None:
    assert set(TABLE) == {(s, op) for s in VMState for op in OPS}


@pytest.mark.parametrize(("state", "op"), list(TABLE), ids=[f"{s.value}-{op}" for s, op in TABLE])
def test_transition(kernel: Kernel, state: VMState, op: str) -> None:
    vm = vm_in(kernel, state)
    outcome = TABLE[(state, op)]
    lines = kernel.journal.lines()
    if isinstance(outcome, VMState):
        OPS[op](kernel, vm)
        assert vm.state is outcome
        if outcome is VMState.DESTROYED:
            assert vm not in kernel.vms()
            with pytest.raises(UnknownResource):
                kernel.vm(vm.id)
        else:
            assert kernel.vm(vm.id) is vm
        assert len(kernel.journal) > len(lines)
    else:
        with pytest.raises(outcome) as info:
            OPS[op](kernel, vm)
        assert vm.state is state
        # a refused transition leaves no trace: it is checked before the operation opens
        assert kernel.journal.lines() == lines
        err = info.value
        assert vm.id in str(err)
        if isinstance(err, IllegalTransition):
            base = op.removesuffix("-force")
            assert err.value == state.value
            assert err.operation == base
            assert err.allowed == ALLOWED[base]
            assert err.thing == f"vm {vm.id}"
            assert f"state {state.value}" in str(err)
            for allowed in ALLOWED[base]:
                assert allowed in err.expected
        else:
            assert "destroyed at" in str(err)
    kernel.check_invariants()


def test_full_cycle_journal(kernel: Kernel) -> None:
    vm = kernel.create_vm("web")
    kernel.launch_vm(vm)
    kernel.stop_vm(vm)
    kernel.launch_vm(vm)
    kernel.destroy_vm(vm, force=True)
    kinds = [e.kind for e in kernel.journal.events if e.subject == f"vm:{vm.id}"]
    assert kinds == ["vm.create", "vm.launch", "vm.stop", "vm.launch", "vm.stop", "vm.destroy"]
    kernel.check_invariants()


def test_destroyed_handle_keeps_its_final_state(kernel: Kernel) -> None:
    vm = kernel.create_vm("web")
    kernel.destroy_vm(vm)
    assert vm.state is VMState.DESTROYED
    with pytest.raises(UnknownResource, match=r"destroyed at 0 ns"):
        kernel.launch_vm(vm)


def test_created_vm_fields(kernel: Kernel) -> None:
    kernel.clock.advance(250)
    vm = kernel.create_vm("web", memory_mib=512, vcpus=4, tier="gold")
    assert (vm.name, vm.memory_mib, vm.vcpus, vm.state) == ("web", 512, 4, VMState.CREATED)
    assert vm.created_ns == 250
    assert vm.options == {"tier": "gold"}
    assert vm.owner == "operator"
    assert vm.host_id is None
    assert uuid.UUID(vm.id).version == 4
    assert str(uuid.UUID(vm.id)) == vm.id


# --------------------------------------------------------------------------- handles, ids, names


def test_handle_id_and_name_resolve_to_the_same_vm(kernel: Kernel) -> None:
    vm = kernel.create_vm("web")
    assert kernel.vm(vm) is vm
    assert kernel.vm(vm.id) is vm
    assert kernel.vm("web") is vm
    kernel.launch_vm("web")
    kernel.stop_vm(vm.id)
    kernel.launch_vm(vm)
    assert vm.state is VMState.RUNNING
    assert kernel.vms() == [vm]


def test_name_is_reusable_after_destroy_but_the_id_is_not(kernel: Kernel) -> None:
    old = kernel.create_vm("web")
    kernel.destroy_vm("web")
    new = kernel.create_vm("web")
    assert new.id != old.id
    assert kernel.vm("web") is new
    with pytest.raises(UnknownResource, match=re.escape(old.id)):
        kernel.vm(old)  # the stale handle names the destroyed VM, not its namesake
    with pytest.raises(UnknownResource):
        kernel.launch_vm(old.id)
    kernel.launch_vm(new)


def test_duplicate_live_name_is_refused_and_rolled_back(kernel: Kernel) -> None:
    kernel.create_vm("web")
    before = [repr(r) for r in kernel.registry]
    n = len(kernel.journal)
    with pytest.raises(DuplicateResource, match="web") as info:
        kernel.create_vm("web")
    assert info.value.value == "web"
    assert [repr(r) for r in kernel.registry] == before
    assert len(kernel.vms()) == 1
    assert [e.kind for e in kernel.journal.events[n:]] == ["op.failed"]
    kernel.check_invariants()


def test_handle_from_another_kernel_is_unknown(tmp_path: Path) -> None:
    with (
        Kernel(seed=1, data_dir=tmp_path / "a", autoload=False) as a,
        Kernel(seed=2, data_dir=tmp_path / "b", autoload=False) as b,
    ):
        vm = a.create_vm("web")
        with pytest.raises(UnknownResource):
            b.launch_vm(vm)


def test_lookup_with_a_handle_of_another_kind_is_invalid(kernel: Kernel) -> None:
    host = kernel.add_host("h1")
    vm = kernel.create_vm("web")
    with pytest.raises(InvalidArgument, match="vm reference"):
        kernel.vm(host)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="host reference"):
        kernel.host(vm)  # type: ignore[arg-type]
    assert kernel.host("h1") is host
    assert kernel.host(host) is host


@pytest.mark.parametrize("ref", [None, 3, 1.5, b"web", ["web"]])
def test_lookup_with_a_non_reference_is_invalid(kernel: Kernel, ref: Any) -> None:
    kernel.create_vm("web")
    with pytest.raises(InvalidArgument) as info:
        kernel.vm(ref)
    assert info.value.value == ref
    with pytest.raises(InvalidArgument):
        kernel.launch_vm(ref)


def test_unknown_vm_names_the_reference(kernel: Kernel) -> None:
    with pytest.raises(UnknownResource, match="nope") as info:
        kernel.vm("nope")
    assert info.value.kind == "vm"
    assert info.value.value == "nope"
    for op in (kernel.launch_vm, kernel.stop_vm, kernel.destroy_vm):
        with pytest.raises(UnknownResource, match="nope"):
            op("nope")


def test_destroy_force_on_running_vm_is_one_operation(kernel: Kernel) -> None:
    vm = vm_in(kernel, VMState.RUNNING)
    disk = kernel.create_disk("data", 4096)
    kernel.attach_disk(vm, disk)
    n = len(kernel.journal)
    kernel.destroy_vm(vm, force=True)
    kinds = [e.kind for e in kernel.journal.events[n:]]
    assert kinds == ["vm.stop", "disk.detach", "vm.destroy"]
    assert disk.attached_to is None
    kernel.check_invariants()
