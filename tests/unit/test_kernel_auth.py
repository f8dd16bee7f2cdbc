"""Authorization: every principal's operation passes vmk_authorize first, combined deny-overrides."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmkernel import Decision, Effect, Kernel, Principal, VMState, hookimpl
from vmkernel.errors import AuthorizationDenied, HookFailed, PluginError, UnknownResource


class Policy:
    """Answers every request with ``decide(principal, operation, resource)`` and logs it."""

    def __init__(self, name: str, decide: Callable[[Principal, str, str], Any]) -> None:
        self.name = name
        self.decide = decide
        self.asked: list[tuple[str, str, str]] = []

    @hookimpl
    def vmk_authorize(self, kernel: Kernel, principal: Principal, operation: str, resource: str) -> Any:
        self.asked.append((principal.name, operation, resource))
        return self.decide(principal, operation, resource)


class RollbackLog:
    name = "rollback-log"

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def vmk_rollback(self, kernel: Kernel, operation: str, subject: str, error: BaseException) -> None:
        self.calls.append(operation)


def deny_launch(p: Principal, op: str, res: str) -> Decision | None:
    return Decision.deny("launches are frozen", source="freeze r7") if op == "vm.launch" else None


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Kernel]]:
    made: list[Kernel] = []

    def factory(*plugins: Any) -> Kernel:
        k = Kernel(seed=9, plugins=list(plugins), autoload=False, data_dir=tmp_path / f"k{len(made)}")
        made.append(k)
        return k

    yield factory
    for k in made:
        k.close()


def test_no_policy_plugin_allows_everything(make: Callable[..., Kernel]) -> None:
    k = make()
    k.add_principal("guest", roles=[])
    vm = k.create_vm("web", principal="guest")
    k.launch_vm(vm, principal="guest")
    assert vm.state is VMState.RUNNING
    assert vm.owner == "guest"
    assert k.authorize("guest", "vm.destroy", f"vm:{vm.id}") == []
    assert k.journal.of_kind("auth") == []


def test_deny_raises_with_reasons_and_is_journaled(make: Callable[..., Kernel]) -> None:
    log = RollbackLog()
    k = make(log, Policy("freeze", deny_launch))
    vm = k.create_vm("web")
    lines = k.journal.lines()
    with pytest.raises(AuthorizationDenied) as info:
        k.launch_vm(vm)
    err = info.value
    assert (err.principal, err.operation, err.resource) == ("operator", "vm.launch", f"vm:{vm.id}")
    assert err.reasons == ["launches are frozen [freeze r7]"]
    assert "launches are frozen" in str(err) and "operator" in str(err)
    assert isinstance(err, PermissionError)
    # not performed; only the denial is journaled; nothing to roll back
    assert vm.state is VMState.CREATED
    assert k.journal.lines()[: len(lines)] == lines
    [denied] = k.journal.events[len(lines) :]
    assert denied.kind == "auth.denied"
    assert denied.subject == f"vm:{vm.id}"
    assert denied.data == {
        "principal": "operator",
        "operation": "vm.launch",
        "reasons": ["launches are frozen [freeze r7]"],
    }
    assert log.calls == []
    k.check_invariants()


def test_deny_overrides_allow(make: Callable[..., Kernel]) -> None:
    allow = Policy("allow-all", lambda p, op, res: Decision.allow("admins may", source="rbac"))
    abstain = Policy("abstain", lambda p, op, res: None)
    deny = Policy("freeze", deny_launch)
    k = make(allow, abstain, deny)
    vm = k.create_vm("web")  # allowed by one, abstained by two
    with pytest.raises(AuthorizationDenied) as info:
        k.launch_vm(vm)
    assert info.value.reasons == ["launches are frozen [freeze r7]"]  # only the denials explain it
    assert vm.state is VMState.CREATED
    # every policy was asked, each exactly once per operation
    for policy in (allow, abstain, deny):
        assert [op for _, op, _ in policy.asked] == ["vm.create", "vm.launch"]


def test_every_denial_is_reported(make: Callable[..., Kernel]) -> None:
    k = make(
        Policy("a", lambda p, op, res: Decision.deny("first reason", source="a")),
        Policy("b", lambda p, op, res: Decision.deny("second reason")),
    )
    with pytest.raises(AuthorizationDenied) as info:
        k.add_host("h1")
    assert sorted(info.value.reasons) == ["first reason [a]", "second reason"]
    assert k.hosts() == []


def test_all_allow_performs_and_returns_decisions(make: Callable[..., Kernel]) -> None:
    k = make(Policy("a", lambda p, op, res: Decision.allow("fine", source="a")))
    decisions = k.authorize(None, "vm.create", "vm:x")
    assert [(d.effect, d.reason) for d in decisions] == [(Effect.ALLOW, "fine")]
    assert k.create_vm("web").state is VMState.CREATED


@pytest.mark.parametrize("bad", ["allow", True, 1, ("deny", "no"), Effect.DENY])
def test_non_decision_is_a_plugin_error(make: Callable[..., Kernel], bad: Any) -> None:
    k = make(Policy("sloppy", lambda p, op, res: bad))
    lines = k.journal.lines()
    with pytest.raises(PluginError, match="vmk_authorize") as info:
        k.create_vm("web")
    assert "Decision" in info.value.expected
    assert k.vms() == []
    assert k.journal.lines() == lines


def test_raising_policy_is_a_typed_error(make: Callable[..., Kernel]) -> None:
    boom = RuntimeError("policy store unreachable")
    k = make(Policy("broken", lambda p, op, res: (_ for _ in ()).throw(boom)))
    with pytest.raises(HookFailed) as info:
        k.create_vm("web")
    assert info.value.__cause__ is boom
    assert info.value.hook == "vmk_authorize"
    assert k.vms() == []
    # an evaluation error counts as a deny, and is recorded as one
    [denied] = k.journal.of_kind("auth.denied")
    assert denied.data["operation"] == "vm.create"
    assert "policy store unreachable" in denied.data["reasons"][0]


def test_a_policy_may_refuse_with_a_vmkernel_error(make: Callable[..., Kernel]) -> None:
    refusal = UnknownResource("role binding", "ops", "a role the policy store knows")
    k = make(Policy("strict", lambda p, op, res: (_ for _ in ()).throw(refusal)))
    with pytest.raises(UnknownResource) as info:
        k.add_host("h1")
    assert info.value is refusal
    assert k.hosts() == []


def test_principals_by_name_object_and_default(make: Callable[..., Kernel]) -> None:
    policy = Policy("log", lambda p, op, res: None)
    k = make(policy)
    bob = k.add_principal("bob", roles=["dev", "oncall"])
    assert bob.roles == ("dev", "oncall")
    k.create_vm("a", principal="bob")
    k.create_vm("b", principal=bob)  # type: ignore[arg-type]
    k.create_vm("c")
    assert [who for who, op, _ in policy.asked if op == "vm.create"] == ["bob", "bob", "operator"]
    assert k.vm("a").owner == "bob"
    with pytest.raises(UnknownResource, match="mallory"):
        k.create_vm("d", principal="mallory")
    assert [vm.name for vm in k.vms()] == ["a", "b", "c"]


def test_operations_name_their_resource(make: Callable[..., Kernel]) -> None:
    policy = Policy("log", lambda p, op, res: None)
    k = make(policy)
    host = k.add_host("h1")
    vm = k.create_vm("web")
    k.launch_vm(vm)
    disk = k.create_disk("d", 4096)
    k.attach_disk(vm, disk)
    k.stop_vm(vm)
    k.launch_container(host, "app")
    k.destroy_vm(vm)
    k.clock.advance(10)  # the kernel's own clock needs nobody's permission
    ops = [(op, res.split(":")[0]) for _, op, res in policy.asked]
    assert ops == [
        ("host.join", "host"),
        ("vm.create", "vm"),
        ("vm.launch", "vm"),
        ("disk.create", "disk"),
        ("disk.attach", "disk"),
        ("vm.stop", "vm"),
        ("container.launch", "container"),
        ("vm.destroy", "vm"),
        ("disk.detach", "disk"),
    ]
    assert policy.asked[1][2] == f"vm:{vm.id}"


def test_a_kept_denial_does_not_break_the_journal_time_order(make: Callable[..., Kernel]) -> None:
    # the launch hook advances the clock, then a nested destroy is denied: the launch is rolled
    # back (clock included) but the denial stays, and the journal must stay in time order
    class Boots:
        name = "boots"

        @hookimpl
        def vmk_vm_launch(self, kernel: Kernel, vm: Any) -> None:
            if vm.name == "web":
                kernel.clock.advance(1_000)
                kernel.destroy_vm("other", principal="intern")

    k = make(
        Policy("no-interns", lambda p, op, res: Decision.deny("interns") if p.name == "intern" else None),
        Boots(),
    )
    k.add_principal("intern")
    k.create_vm("other")
    web = k.create_vm("web")
    with pytest.raises(AuthorizationDenied):
        k.launch_vm(web)
    assert k.clock.now_ns == 0
    assert [e.kind for e in k.journal.events[-2:]] == ["auth.denied", "op.failed"]
    k.check_invariants()


def test_denied_nested_operation_is_still_journaled(make: Callable[..., Kernel]) -> None:
    # destroy(force=True) of a running VM stops it in a nested operation that the policy denies
    k = make(Policy("no-stops", lambda p, op, res: Decision.deny("no stops") if op == "vm.stop" else None))
    vm = k.launch_vm(k.create_vm("web"))
    with pytest.raises(AuthorizationDenied):
        k.destroy_vm(vm, force=True)
    assert vm.state is VMState.RUNNING
    assert [e.data["operation"] for e in k.journal.of_kind("auth.denied")] == ["vm.stop"]
