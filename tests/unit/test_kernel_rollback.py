"""Rollback: a hook that raises mid-operation leaves the registry and the journal as they were.

For every operation that calls a veto hook, a saboteur plugin emits an event
and another plugin changes a registry field before the saboteur raises.  The
registry must come back exactly, the journal must grow by exactly one
``op.failed`` event (none of the failed operation's own events), every
``vmk_rollback`` must be called, observers must never see the dropped events,
and the caller gets ``HookFailed`` (for a plain exception, with ``__cause__``)
or the vmkernel error itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vmkernel import VM, Event, Kernel, VMState, hookimpl
from vmkernel.errors import CapacityError, HookFailed, IllegalTransition, UnknownResource, VmkError


class RollbackLog:
    def __init__(self, name: str) -> None:
        self.name = name
        self.calls: list[tuple[str, str, BaseException]] = []

    @hookimpl
    def vmk_rollback(self, kernel: Kernel, operation: str, subject: str, error: BaseException) -> None:
        # the registry is already restored when plugins are told
        self.calls.append((operation, subject, error))


class Observer:
    name = "observer"

    def __init__(self) -> None:
        self.events: list[Event] = []

    @hookimpl
    def vmk_event(self, kernel: Kernel, event: Event) -> None:
        self.events.append(event)


class Switch:
    """Arms the saboteur and the updater only for the operation under test."""

    def __init__(self, armed: bool = True) -> None:
        self.armed = armed


def saboteur(hook: str, error: BaseException, switch: Switch | None = None) -> Any:
    """Emits an event, then raises ``error`` from ``hook`` (while armed)."""
    switch = switch or Switch()

    def impl(kernel: Kernel) -> None:
        if switch.armed:
            kernel.emit("saboteur.before", "kernel", hook=hook)
            raise error

    plugin = type("Saboteur", (), {"name": "saboteur"})()
    setattr(plugin, hook, hookimpl(impl))
    return plugin


def updater(hook: str, switch: Switch) -> Any:
    """Changes a registry field and emits, from ``hook``, before the saboteur runs (while armed)."""

    def impl(kernel: Kernel) -> None:
        if switch.armed:
            kernel.update(kernel.host("h0"), state="maintenance")
            kernel.emit("updater.touched", "host:h0")

    plugin = type("Updater", (), {"name": "updater"})()
    setattr(plugin, hook, hookimpl(impl))
    return plugin


def registry_state(k: Kernel) -> list[tuple[str, str, str]]:
    return sorted((r.kind, r.id, repr(r)) for r in k.registry)


@dataclass
class Case:
    hook: str
    setup: Callable[[Kernel], Any]
    op: Callable[[Kernel, Any], Any]
    operation: str
    subject: Callable[[Any], str]  # the subject, or its prefix ending in ':'


def _running(k: Kernel) -> VM:
    return k.launch_vm(k.create_vm("web"))


def _with_disk(k: Kernel) -> tuple[VM, Any]:
    vm, d = k.create_vm("web"), k.create_disk("data", 4096)
    k.attach_disk(vm, d)
    return vm, d


def _with_container(k: Kernel) -> Any:
    return k.launch_container("h0", "app")


def _two_images(k: Kernel) -> None:
    k.register_image("v1")
    k.register_image("v2")


def _vm_subject(vm: Any) -> str:
    return f"vm:{vm.id}"


CASES: dict[str, Case] = {
    "vm-create": Case(
        "vmk_vm_create", lambda k: None, lambda k, _: k.create_vm("new"), "vm.create", lambda _: "vm:"
    ),
    "vm-launch": Case(
        "vmk_vm_launch", lambda k: k.create_vm("web"), lambda k, vm: k.launch_vm(vm), "vm.launch", _vm_subject
    ),
    "vm-stop": Case("vmk_vm_stop", _running, lambda k, vm: k.stop_vm(vm), "vm.stop", _vm_subject),
    "vm-destroy": Case(
        "vmk_vm_destroy",
        lambda k: k.create_vm("web"),
        lambda k, vm: k.destroy_vm(vm),
        "vm.destroy",
        _vm_subject,
    ),
    "vm-destroy-force": Case(
        "vmk_vm_destroy", _running, lambda k, vm: k.destroy_vm(vm, force=True), "vm.destroy", _vm_subject
    ),
    "vm-destroy-force-inner-stop": Case(
        "vmk_vm_stop", _running, lambda k, vm: k.destroy_vm(vm, force=True), "vm.destroy", _vm_subject
    ),
    "vm-destroy-inner-detach": Case(
        "vmk_disk_detach",
        _with_disk,
        lambda k, c: k.destroy_vm(c[0]),
        "vm.destroy",
        lambda c: f"vm:{c[0].id}",
    ),
    "clock-tick": Case(
        "vmk_tick", lambda k: None, lambda k, _: k.clock.advance(1000), "clock.advance", lambda _: "clock"
    ),
    "host-join": Case(
        "vmk_host_join", lambda k: None, lambda k, _: k.add_host("h1"), "host.join", lambda _: "host:h1"
    ),
    "host-leave": Case(
        "vmk_host_leave",
        lambda k: k.add_host("h1"),
        lambda k, h: k.remove_host(h),
        "host.leave",
        lambda _: "host:h1",
    ),
    "disk-create": Case(
        "vmk_disk_create",
        lambda k: None,
        lambda k, _: k.create_disk("d", 4096),
        "disk.create",
        lambda _: "disk:",
    ),
    "disk-clone": Case(
        "vmk_disk_clone",
        lambda k: k.create_disk("d", 4096),
        lambda k, d: k.clone_disk(d, "copy"),
        "disk.clone",
        lambda _: "disk:",
    ),
    "disk-attach": Case(
        "vmk_disk_attach",
        lambda k: (k.create_vm("web"), k.create_disk("d", 4096)),
        lambda k, c: k.attach_disk(*c),
        "disk.attach",
        lambda c: f"disk:{c[1].id}",
    ),
    "disk-detach": Case(
        "vmk_disk_detach",
        _with_disk,
        lambda k, c: k.detach_disk(*c),
        "disk.detach",
        lambda c: f"disk:{c[1].id}",
    ),
    "image-replace": Case(
        "vmk_image_replace",
        _two_images,
        lambda k, _: k.replace_image("v1", "v2"),
        "image.replace",
        lambda _: "image:v1",
    ),
    "container-launch": Case(
        "vmk_container_launch",
        lambda k: None,
        lambda k, _: k.launch_container("h0", "app"),
        "container.launch",
        lambda _: "container:",
    ),
    "container-stop": Case(
        "vmk_container_stop",
        _with_container,
        lambda k, c: k.stop_container(c),
        "container.stop",
        lambda c: f"container:{c.id}",
    ),
    "frames-out": Case(
        "vmk_frames_out", _running, lambda k, vm: k.send_frames(vm, [b"\x00" * 64]), "net.send", _vm_subject
    ),
    "frames-in": Case(
        "vmk_frames_in",
        _running,
        lambda k, vm: k.deliver_frames(vm, [b"\x00" * 64]),
        "net.deliver",
        _vm_subject,
    ),
    "config-receive": Case(
        "vmk_config_receive",
        lambda k: None,
        lambda k, _: k.apply_config("host:h0", [{"uri": "./x", "value": 1}]),
        "config.receive",
        lambda _: "host:h0",
    ),
}


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Kernel]]:
    made: list[Kernel] = []

    def factory(*plugins: Any) -> Kernel:
        k = Kernel(seed=5, plugins=list(plugins), autoload=False, data_dir=tmp_path / f"k{len(made)}")
        made.append(k)
        return k

    yield factory
    for k in made:
        k.close()


def run_case(
    make: Callable[..., Kernel], case: Case, error: BaseException
) -> tuple[Kernel, pytest.ExceptionInfo[BaseException], RollbackLog, RollbackLog, Observer]:
    first, second, observer = RollbackLog("first"), RollbackLog("second"), Observer()
    switch = Switch(armed=False)
    # call order is last-registered first: the updater runs, then the saboteur raises
    k = make(first, observer, saboteur(case.hook, error, switch), updater(case.hook, switch), second)
    k.add_host("h0")
    ctx = case.setup(k)
    lines, registry, now = k.journal.lines(), registry_state(k), k.clock.now_ns
    switch.armed = True
    with pytest.raises(BaseException) as info:
        case.op(k, ctx)
    switch.armed = False
    # registry, clock and journal as before, plus exactly one op.failed
    assert registry_state(k) == registry
    assert k.host("h0").state == "up"
    assert k.clock.now_ns == now
    assert k.journal.lines()[: len(lines)] == lines
    new = k.journal.events[len(lines) :]
    assert [e.kind for e in new] == ["op.failed"], [(e.kind, e.subject) for e in new]
    subject = case.subject(ctx)
    if subject.endswith(":"):
        assert new[0].subject.startswith(subject)
        subject = new[0].subject
    assert new[0].subject == subject
    assert new[0].data["operation"] == case.operation
    assert type(info.value).__name__ in new[0].data["error"]
    # every rollback implementation was told, the outer operation last
    for log in (first, second):
        assert log.calls, f"{log.name} was not called"
        assert log.calls[-1][:2] == (case.operation, subject)
        assert log.calls[-1][2] is info.value
    assert first.calls == second.calls
    # observers saw the journal, never the dropped events
    assert observer.events == list(k.journal.events)
    k.check_invariants()
    return k, info, first, second, observer


@pytest.mark.parametrize("name", list(CASES))
def test_plain_exception_becomes_hook_failed_and_rolls_back(make: Callable[..., Kernel], name: str) -> None:
    case = CASES[name]
    boom = RuntimeError(f"{case.hook} broke")
    _, info, *_ = run_case(make, case, boom)
    err = info.value
    assert isinstance(err, HookFailed)
    assert err.__cause__ is boom
    assert err.cause is boom
    assert err.hook == case.hook
    assert "RuntimeError" in str(err) and "rolled back" in str(err)


@pytest.mark.parametrize("name", list(CASES))
def test_vmkernel_error_passes_through_and_rolls_back(make: Callable[..., Kernel], name: str) -> None:
    case = CASES[name]
    refusal = CapacityError("quota", 3, "2")
    _, info, *_ = run_case(make, case, refusal)
    assert info.value is refusal


def test_base_exception_rolls_back_and_is_not_wrapped(make: Callable[..., Kernel]) -> None:
    _, info, *_ = run_case(make, CASES["vm-launch"], KeyboardInterrupt())
    assert type(info.value) is KeyboardInterrupt


def test_nested_inner_failure_is_rolled_back_twice_and_journaled_once(make: Callable[..., Kernel]) -> None:
    k, info, first, _, _ = run_case(make, CASES["vm-destroy-force-inner-stop"], RuntimeError("stuck"))
    vm_id = info.value.subject.removeprefix("vm:")  # type: ignore[attr-defined]
    assert info.value.hook == "vmk_vm_stop"  # type: ignore[attr-defined]
    assert [c[:2] for c in first.calls] == [("vm.stop", f"vm:{vm_id}"), ("vm.destroy", f"vm:{vm_id}")]
    assert k.vm(vm_id).state is VMState.RUNNING


def test_successful_inner_operation_is_undone_with_the_outer_one(make: Callable[..., Kernel]) -> None:
    # destroy(force=True) stops the VM in a nested operation that succeeds; the destroy hook then fails
    k, info, first, _, _ = run_case(make, CASES["vm-destroy-force"], RuntimeError("no"))
    vm_id = info.value.subject.removeprefix("vm:")  # type: ignore[attr-defined]
    vm = k.vm(vm_id)
    assert vm.state is VMState.RUNNING
    assert [c[0] for c in first.calls] == ["vm.destroy"]  # the stop itself had succeeded
    k.stop_vm(vm)  # and the VM is fully usable afterwards
    k.destroy_vm(vm)


def test_rollback_log_sees_the_restored_registry(make: Callable[..., Kernel]) -> None:
    seen: list[Any] = []

    class Looks:
        @hookimpl
        def vmk_rollback(self, kernel: Kernel, operation: str, subject: str, error: BaseException) -> None:
            seen.append((operation, [vm.name for vm in kernel.vms()]))

    switch = Switch(armed=False)
    k = make(Looks(), saboteur("vmk_vm_create", RuntimeError("no"), switch))
    k.create_vm("keep")
    switch.armed = True
    with pytest.raises(HookFailed):
        k.create_vm("dropped")
    assert seen == [("vm.create", ["keep"])]


def test_nested_operations_join_the_outer_fate(make: Callable[..., Kernel]) -> None:
    class ProvisionsDisk:
        name = "provisions"

        @hookimpl
        def vmk_vm_create(self, kernel: Kernel, vm: VM) -> None:
            disk = kernel.create_disk(f"{vm.name}-root", 1 << 20)
            kernel.attach_disk(vm, disk)

    # saboteur registered first: called after the provisioning plugin
    k = make(saboteur("vmk_vm_create", CapacityError("vms", 1, "0")), ProvisionsDisk())
    n = len(k.journal)
    with pytest.raises(CapacityError):
        k.create_vm("web")
    assert k.disks() == []
    assert [e.kind for e in k.journal.events[n:]] == ["op.failed"]
    k.check_invariants()


def test_inner_failure_caught_by_a_plugin_commits_with_the_outer_operation(
    make: Callable[..., Kernel],
) -> None:
    class TriesLaunch:
        name = "tries-launch"
        caught: list[BaseException] = []

        @hookimpl
        def vmk_host_join(self, kernel: Kernel, host: Any) -> None:
            try:
                kernel.launch_vm("web")
            except HookFailed as exc:
                self.caught.append(exc)

    log = RollbackLog("log")
    k = make(log, saboteur("vmk_vm_launch", RuntimeError("no launch")), TriesLaunch())
    vm = k.create_vm("web")
    n = len(k.journal)
    k.add_host("h1")
    assert len(TriesLaunch.caught) == 1
    assert vm.state is VMState.CREATED
    assert k.host("h1").name == "h1"
    kinds = [(e.kind, e.data.get("operation")) for e in k.journal.events[n:]]
    assert kinds == [("host.join", None), ("op.failed", "vm.launch")]
    assert [c[0] for c in log.calls] == ["vm.launch"]
    k.check_invariants()


def test_broadcast_order_equals_journal_order_when_observers_start_operations(
    make: Callable[..., Kernel],
) -> None:
    class AutoLaunch:
        name = "auto-launch"

        def __init__(self) -> None:
            self.events: list[int] = []

        @hookimpl
        def vmk_event(self, kernel: Kernel, event: Event) -> None:
            self.events.append(event.seq)
            if event.kind == "vm.create":
                kernel.launch_vm(event.subject.removeprefix("vm:"))  # an operation inside the broadcast
            elif event.kind == "vm.launch":
                kernel.emit("auto-launch.noted", event.subject)  # a bare event inside the broadcast

    class Records:
        name = "records"

        def __init__(self) -> None:
            self.events: list[int] = []

        @hookimpl
        def vmk_event(self, kernel: Kernel, event: Event) -> None:
            assert len(kernel.journal) > event.seq
            self.events.append(event.seq)

    auto, rec = AutoLaunch(), Records()
    k = make(rec, auto)
    a = k.create_vm("a")
    b = k.create_vm("b")
    assert a.state is b.state is VMState.RUNNING
    seqs = list(range(len(k.journal)))
    assert rec.events == seqs
    assert auto.events == seqs
    kinds = [e.kind for e in k.journal.events[1:]]
    assert kinds == ["vm.create", "vm.launch", "auto-launch.noted"] * 2
    k.check_invariants()


def test_illegal_transition_inside_a_hook_rolls_back_the_outer_operation(make: Callable[..., Kernel]) -> None:
    class StopsTwice:
        @hookimpl
        def vmk_vm_launch(self, kernel: Kernel, vm: VM) -> None:
            kernel.stop_vm(vm)
            kernel.stop_vm(vm)  # IllegalTransition: a vmkernel error, passed through

    k = make(StopsTwice())
    vm = k.create_vm("web")
    n = len(k.journal)
    with pytest.raises(IllegalTransition):
        k.launch_vm(vm)
    assert vm.state is VMState.CREATED
    assert [e.kind for e in k.journal.events[n:]] == ["op.failed"]
    k.check_invariants()


def test_failed_restore_keeps_the_record_of_the_destroyed_vm(make: Callable[..., Kernel]) -> None:
    class Unit:
        config: dict[str, Any] = {}

        def write_config(self, config: dict[str, Any]) -> None:
            self.config = config

        def read_config(self) -> dict[str, Any]:
            return self.config

        def flush(self) -> None:
            pass

    class Units:
        name = "units"
        unit = Unit()

        @hookimpl
        def vmk_storage_unit(self, kernel: Kernel, vm_id: str) -> Unit:
            return self.unit

    switch = Switch(armed=False)
    k = make(Units(), saboteur("vmk_vm_restore", RuntimeError("bad image"), switch))
    vm = k.create_vm("web")
    k.save_vm(vm)
    k.destroy_vm(vm)
    with pytest.raises(UnknownResource, match="destroyed at") as before:
        k.vm(vm.id)
    switch.armed = True
    with pytest.raises(HookFailed):
        k.restore_vm(vm.id)
    with pytest.raises(UnknownResource) as after:
        k.vm(vm.id)
    assert str(after.value) == str(before.value)


def test_operations_work_after_a_rollback(make: Callable[..., Kernel]) -> None:
    flaky = {"fail": True}

    class Flaky:
        @hookimpl
        def vmk_vm_launch(self, kernel: Kernel, vm: VM) -> None:
            if flaky["fail"]:
                raise VmkError("transient")

    k = make(Flaky())
    vm = k.create_vm("web")
    with pytest.raises(VmkError):
        k.launch_vm(vm)
    flaky["fail"] = False
    k.launch_vm(vm)
    assert vm.state is VMState.RUNNING
    assert [e.kind for e in k.journal.events[-3:]] == ["vm.create", "op.failed", "vm.launch"]
    k.check_invariants()
