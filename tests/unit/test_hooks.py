"""Every hook: documented, tested, and called by the kernel when and how hookspecs.py says.

The first tests are meta tests over ``vmkernel.hookspecs``: every ``vmk_*``
hook has a docstring with a ``:param:`` per parameter, an entry in
``docs/hooks.md`` with its exact signature, and a test named after it
somewhere under ``tests/``.  Then one test per hook (``test_vmk_<hook>``)
registers a small plugin, checks when and with what the hook is called, and
for veto hooks that a raise rolls the registry and the journal back.
"""

from __future__ import annotations

import ast
import inspect
import io
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

import vmkernel
from vmkernel import (
    VM,
    Decision,
    Event,
    Invariant,
    Kernel,
    ReportSection,
    StashKey,
    VMState,
    hookimpl,
    hookspec,
    hookspecs,
)
from vmkernel.errors import (
    AuthorizationDenied,
    CapacityError,
    FeatureUnavailable,
    HookFailed,
    IllegalTransition,
    InvariantViolation,
    PluginError,
)

ROOT = Path(__file__).resolve().parents[2]
HOOKS_DOC = ROOT / "docs" / "hooks.md"
HOOK_NAMES = sorted(
    name for name, obj in vars(hookspecs).items() if name.startswith("vmk_") and inspect.isfunction(obj)
)


def hook_fn(name: str) -> Callable[..., Any]:
    fn: Callable[..., Any] = getattr(hookspecs, name)
    return fn


# --------------------------------------------------------------------------- meta tests


def test_hookspecs_define_hooks() -> None:
    # guards the parametrized tests below against an empty list
    assert len(HOOK_NAMES) >= 30
    assert {"vmk_vm_create", "vmk_event", "vmk_tick", "vmk_rollback"} <= set(HOOK_NAMES)


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_hook_docstring_names_every_parameter(name: str) -> None:
    fn = hook_fn(name)
    doc = inspect.getdoc(fn)
    assert doc, f"{name} has no docstring"
    params = list(inspect.signature(fn).parameters)
    missing = [p for p in params if not re.search(rf":param {p}:\s*\S", doc)]
    assert not missing, f"{name}: docstring lacks ':param NAME:' for {missing}"
    documented = re.findall(r":param (\w+):", doc)
    assert set(documented) <= set(params), f"{name} documents parameters it does not have: {documented}"


def names_signature(name: str) -> str:
    return f"{name}({', '.join(inspect.signature(hook_fn(name)).parameters)})"


def typed_signature(name: str) -> str:
    """The signature as written in hookspecs.py (annotations are strings there)."""
    sig = inspect.signature(hook_fn(name))
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"{name}({params}) -> {sig.return_annotation}"


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_hook_is_in_docs_with_exact_signature(name: str) -> None:
    text = HOOKS_DOC.read_text(encoding="utf-8")
    headings = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")]
    assert names_signature(name) in headings, f"docs/hooks.md has no heading '{names_signature(name)}'"
    assert typed_signature(name) in text.splitlines(), (
        f"docs/hooks.md lacks the line '{typed_signature(name)}'"
    )


def test_docs_mention_no_hook_that_does_not_exist() -> None:
    text = HOOKS_DOC.read_text(encoding="utf-8")
    mentioned = set(re.findall(r"^#+ (vmk_\w+)\(", text, flags=re.M))
    assert mentioned == set(HOOK_NAMES)


def all_test_function_names() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "tests").rglob("*.py"):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError):
            continue  # a broken file fails its own collection
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_"):
                names.add(node.name)
    return names


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_hook_has_a_test_named_after_it(name: str) -> None:
    assert f"test_{name}" in all_test_function_names(), f"no test function named test_{name} under tests/"


def test_docs_first_example_plugin_runs(tmp_path: Path) -> None:
    text = HOOKS_DOC.read_text(encoding="utf-8")
    example = re.search(r"```python\n(.*?)```", text, flags=re.S)
    assert example is not None
    script = tmp_path / "plugin.py"
    script.write_text(example.group(1), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "refused: running VMs" in done.stdout
    assert "2 of 2 running VMs" in done.stdout


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Kernel]]:
    """Kernels with explicit plugins only, each in its own directory; closed afterwards."""
    made: list[Kernel] = []

    def factory(*plugins: Any, **kwargs: Any) -> Kernel:
        kwargs.setdefault("autoload", False)
        kwargs.setdefault("data_dir", tmp_path / f"kernel-{len(made)}")
        k = Kernel(plugins=list(plugins), **kwargs)
        made.append(k)
        return k

    yield factory
    for k in made:
        k.close()


class Veto:
    """Raises ``error`` from ``hook``; as a plugin its name is ``veto``."""

    def __init__(self, hook: str, error: BaseException, name: str = "veto") -> None:
        self.name = name

        def impl() -> None:
            raise error

        setattr(self, hook, hookimpl(impl))


class RollbackLog:
    def __init__(self, name: str = "rollback-log") -> None:
        self.name = name
        self.calls: list[tuple[str, str, BaseException]] = []

    @hookimpl
    def vmk_rollback(self, kernel: Kernel, operation: str, subject: str, error: BaseException) -> None:
        self.calls.append((operation, subject, error))


def registry_state(k: Kernel) -> list[tuple[str, str, str]]:
    """Every resource with every field, comparable across time."""
    return sorted((r.kind, r.id, repr(r)) for r in k.registry)


class Snapshot:
    def __init__(self, k: Kernel) -> None:
        self.k = k
        self.lines = k.journal.lines()
        self.registry = registry_state(k)
        self.now_ns = k.clock.now_ns

    def assert_rolled_back(self, operation: str, subject: str) -> None:
        """Registry unchanged; the journal grew by exactly one op.failed for this operation."""
        k = self.k
        assert registry_state(k) == self.registry
        assert k.clock.now_ns == self.now_ns
        assert k.journal.lines()[: len(self.lines)] == self.lines
        new = k.journal.events[len(self.lines) :]
        assert [e.kind for e in new] == ["op.failed"], [(e.kind, dict(e.data)) for e in new]
        assert new[0].subject == subject
        assert new[0].data["operation"] == operation
        k.check_invariants()


def veto_and_check(
    make: Callable[..., Kernel],
    hook: str,
    setup: Callable[[Kernel], Any],
    operation: Callable[[Kernel, Any], Any],
    op_name: str,
    subject: Callable[[Any], str],
) -> None:
    """A RuntimeError from ``hook`` rolls ``operation`` back and reaches the caller as HookFailed.

    ``subject`` gives the operation's subject, or only its prefix (``"vm:"``)
    when the id is chosen inside the operation.
    """
    log = RollbackLog()
    boom = RuntimeError(f"{hook} says no")
    k = make(log, Veto(hook, boom))
    ctx = setup(k)
    before = Snapshot(k)
    with pytest.raises(HookFailed) as info:
        operation(k, ctx)
    assert info.value.__cause__ is boom
    assert info.value.hook == hook
    assert info.value.operation == op_name
    expected = subject(ctx)
    if expected.endswith(":"):
        assert info.value.subject.startswith(expected)
        expected = info.value.subject
    assert info.value.subject == expected
    before.assert_rolled_back(op_name, expected)
    assert [(op, subj) for op, subj, _ in log.calls] == [(op_name, expected)]
    assert log.calls[0][2] is info.value


class Recorder:
    """Records every call of the hooks it is given, as (hook, kwargs)."""

    def __init__(self, *hooks: str, name: str = "recorder", result: Any = None) -> None:
        self.name = name
        self.calls: list[tuple[str, dict[str, Any]]] = []
        for hook in hooks:
            params = list(inspect.signature(hook_fn(hook)).parameters)
            setattr(self, hook, hookimpl(self._make(hook, params, result)))

    def _make(self, hook: str, params: list[str], result: Any) -> Callable[..., Any]:
        # pluggy passes arguments by the implementation's parameter names
        args = ", ".join(params)
        kwargs = ", ".join(f"{p}={p}" for p in params)
        src = f"def impl({args}):\n    return record({hook!r}, dict({kwargs}))\n"
        scope: dict[str, Any] = {}

        def record(h: str, kwargs: dict[str, Any]) -> Any:
            self.calls.append((h, kwargs))
            return result

        exec(src, {"record": record}, scope)
        impl: Callable[..., Any] = scope["impl"]
        return impl

    def of(self, hook: str) -> list[dict[str, Any]]:
        return [kw for h, kw in self.calls if h == hook]


# --------------------------------------------------------------------------- plugin life


class HookTestSpecs:
    @staticmethod
    @hookspec(firstresult=True)
    def vmk_hooktest_ping(kernel: Kernel, value: int) -> int | None:  # type: ignore[empty-body]
        """A hook that a plugin adds for others to implement."""


class AddsHooks:
    name = "adds-hooks"

    def __init__(self) -> None:
        self.calls = 0

    @hookimpl
    def vmk_addhooks(self, pluginmanager: Any) -> None:
        self.calls += 1
        pluginmanager.add_hookspecs(HookTestSpecs)


class Pong:
    name = "pong"

    @hookimpl
    def vmk_hooktest_ping(self, kernel: Kernel, value: int) -> int:
        return value + 1


def test_vmk_addhooks(make: Callable[..., Kernel]) -> None:
    adder = AddsHooks()
    k = make(adder)
    assert adder.calls == 1
    assert k.pm.hook.vmk_addhooks.spec.opts["historic"] is True
    # the new spec is in place: a plugin registered now implements it and is validated against it
    k.pm.register(Pong(), name="pong")
    assert k.hook.vmk_hooktest_ping(kernel=k, value=41) == 42

    # historic: a plugin registered after the call still gets it, at once
    class LateAdder:
        seen: list[Any] = []

        @hookimpl
        def vmk_addhooks(self, pluginmanager: Any) -> None:
            self.seen.append(pluginmanager)

    late = LateAdder()
    k.pm.register(late, name="late")
    assert late.seen == [k.pm]
    assert adder.calls == 1


def test_vmk_addhooks_spec_usable_by_a_plugin_of_the_same_kernel(make: Callable[..., Kernel]) -> None:
    # A plugin adds a hook and another plugin loaded with it implements that hook.
    k = make(AddsHooks(), Pong())
    assert k.hook.vmk_hooktest_ping(kernel=k, value=1) == 2


STATE = StashKey[list[str]]("hooktest")


def test_vmk_configure(make: Callable[..., Kernel]) -> None:
    seen: list[tuple[list[str], list[str]]] = []

    class Configures:
        name = "configures"

        @hookimpl
        def vmk_configure(self, kernel: Kernel) -> None:
            seen.append(([p.name for p in kernel.plugins()], len(kernel.journal)))
            kernel.stash[STATE] = ["configured"]
            kernel.emit("configures.ready", "kernel")

    class Other:
        name = "other"

        @hookimpl
        def vmk_report(self, kernel: Kernel) -> None:
            return None

    k = make(Configures(), Other())
    # once, with every plugin registered, before Kernel() returned; inside the start
    # operation, so its events reach the journal together with kernel.start
    assert seen == [(["configures", "other"], 0)]
    assert k.stash[STATE] == ["configured"]
    assert [e.kind for e in k.journal] == ["kernel.start", "configures.ready"]


def test_vmk_configure_failure_aborts_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    boom = RuntimeError("cannot start")
    with pytest.raises(PluginError) as info:
        Kernel(plugins=[Veto("vmk_configure", boom)], autoload=False)
    assert info.value.__cause__ is boom
    typed = CapacityError("disk space", 10, "5")
    with pytest.raises(CapacityError) as passed:
        Kernel(plugins=[Veto("vmk_configure", typed)], autoload=False)
    assert passed.value is typed
    assert list(tmp_path.iterdir()) == [], "the temporary data directory was left behind"


def test_vmk_unconfigure(tmp_path: Path) -> None:
    order: list[str] = []

    def plugin(label: str) -> Any:
        class Unconfigures:
            name = label

            @hookimpl
            def vmk_unconfigure(self, kernel: Kernel) -> None:
                assert kernel.data_dir.is_dir()  # still there while plugins clean up
                order.append(label)

        return Unconfigures()

    with Kernel(plugins=[plugin("a"), plugin("b")], autoload=False) as k:
        data_dir = k.data_dir
        assert order == []
    assert order == ["b", "a"]  # last registered first
    assert not data_dir.exists()
    k.close()  # idempotent
    assert order == ["b", "a"]
    kept = Kernel(plugins=[plugin("c")], autoload=False, data_dir=tmp_path / "kept")
    kept.close()
    assert order[-1] == "c"
    assert (tmp_path / "kept").is_dir()  # a directory the caller gave is never removed


def test_vmk_unconfigure_failure_is_typed_and_others_still_run(tmp_path: Path) -> None:
    ran: list[str] = []

    class Cleans:
        name = "cleans"

        @hookimpl
        def vmk_unconfigure(self, kernel: Kernel) -> None:
            ran.append("cleans")

    boom = RuntimeError("socket already closed")
    k = Kernel(plugins=[Cleans(), Veto("vmk_unconfigure", boom)], autoload=False)
    with pytest.raises(PluginError) as info:
        k.close()
    assert info.value.__cause__ is boom
    assert info.value.plugin == "veto"
    assert ran == ["cleans"]
    assert not k.data_dir.exists()


def other_entry_points(mine: str) -> list[str]:
    """Every other installed entry point, blocked so that a test loads only its own plugin."""
    return [ep.name for ep in entry_points(group="vmkernel") if ep.name != mine]


@pytest.fixture
def entry_point_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str, str], str]]:
    """Install a plugin module under an entry point of a throw-away distribution."""
    created: list[str] = []

    def install(entry_name: str, source: str) -> str:
        module = f"vmk_hooktest_{entry_name.replace('-', '_')}"
        site = tmp_path / f"site-{entry_name}"
        site.mkdir()
        (site / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        dist = site / f"vmk_hooktest_{entry_name.replace('-', '_')}-1.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: vmk-hooktest-{entry_name}\nVersion: 1.0\n"
        )
        (dist / "entry_points.txt").write_text(f"[vmkernel]\n{entry_name} = {module}\n")
        monkeypatch.syspath_prepend(str(site))
        created.append(module)
        return module

    yield install
    for module in created:
        sys.modules.pop(module, None)


CLI_PLUGIN = """
    import click
    from vmkernel import hookimpl
    from vmkernel.cli import pass_kernel

    GROUPS = []

    @hookimpl
    def vmk_cli_commands(group):
        GROUPS.append(group)

        @group.group("hooktest")
        def hooktest():
            '''Commands of the hook test plugin.'''

        @hooktest.command("hello")
        @click.option("--who", default="world")
        @pass_kernel
        def hello(kernel, who):
            click.echo(f"hello {who} from seed {kernel.seed} in {kernel.data_dir.name}")
"""


def test_vmk_cli_commands(
    entry_point_plugin: Callable[[str, str], str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import vmkernel.cli as cli_module

    module = entry_point_plugin("hooktest-cli", CLI_PLUGIN)
    block = other_entry_points("hooktest-cli")
    monkeypatch.setenv("VMKERNEL_BLOCK_PLUGINS", ",".join(block))
    # the command group is module-level: give this test its own copy of its commands
    monkeypatch.setattr(cli_module.cli, "commands", dict(cli_module.cli.commands))
    cli_module._add_plugin_commands()
    groups = sys.modules[module].GROUPS
    assert groups == [cli_module.cli]  # called once, with the top-level group
    runner = CliRunner()
    result = runner.invoke(
        cli_module.cli,
        ["--seed", "7", "--data-dir", str(tmp_path / "cli-data"), "hooktest", "hello", "--who", "tester"],
    )
    assert result.exit_code == 0, result.output
    assert "hello tester from seed 7 in cli-data" in result.output
    listing = runner.invoke(cli_module.cli, ["--help"])
    assert "hooktest" in listing.output


DEMO_PLUGIN = """
    from vmkernel import hookimpl

    SEEN = []

    @hookimpl
    def vmk_demo(kernel, demo):
        SEEN.append(sorted(h.name for h in kernel.hosts()))
        SEEN.append(sorted(vm.name for vm in kernel.vms()))
        demo.step("checking the demo cluster")
        demo.record("answer", 42)
"""


def test_vmk_demo(
    entry_point_plugin: Callable[[str, str], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import vmkernel.cli as cli_module

    module = entry_point_plugin("hooktest-demo", DEMO_PLUGIN)
    monkeypatch.setattr(cli_module.cli, "commands", dict(cli_module.cli.commands))
    blocks = [arg for name in other_entry_points("hooktest-demo") for arg in ("--block", name)]
    result = CliRunner().invoke(cli_module.cli, [*blocks, "demo", "--data-dir", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    seen = sys.modules[module].SEEN
    assert seen[0][:2] == ["host-a", "host-b"]
    assert {"web", "db"} <= set(seen[1])
    assert "[hooktest-demo] checking the demo cluster" in result.output
    assert "hooktest-demo: answer = 42" in result.output


def test_vmk_demo_runs_in_registration_order(tmp_path: Path) -> None:
    from vmkernel.demo import run_demo

    order: list[str] = []

    def plugin(label: str) -> Any:
        class Demo:
            name = label

            @hookimpl
            def vmk_demo(self, kernel: Kernel, demo: Any) -> None:
                order.append(label)
                demo.record("n", len(order))

        return Demo()

    result = run_demo(
        tmp_path / "d", plugins=[plugin("first"), plugin("second")], autoload=False, out=io.StringIO()
    )
    assert order == ["first", "second"]
    assert result.records["first"] == {"n": 1}
    assert result.records["second"] == {"n": 2}
    assert result.ok


def test_vmk_demo_with_fewer_parameters(tmp_path: Path) -> None:
    from vmkernel.demo import run_demo

    class OnlyDemo:
        name = "only-demo"

        @hookimpl
        def vmk_demo(self, demo: Any) -> None:  # pluggy allows a subset of the hook's parameters
            demo.record("ran", True)

    result = run_demo(tmp_path / "d", plugins=[OnlyDemo()], autoload=False, out=io.StringIO())
    assert result.errors == {}
    assert result.records["only-demo"] == {"ran": True}


# --------------------------------------------------------------------------- cluster


def test_vmk_host_join(make: Callable[..., Kernel]) -> None:
    seen: list[Any] = []

    class Joins:
        @hookimpl
        def vmk_host_join(self, kernel: Kernel, host: vmkernel.Host) -> None:
            seen.append((kernel.host("h1") is host, host.memory_mib, host.cpus, len(kernel.journal)))

    k = make(Joins())
    events = len(k.journal)
    host = k.add_host("h1", memory_mib=2048, cpus=4)
    # the host is registered when the hook runs, its event still pending
    assert seen == [(True, 2048, 4, events)]
    assert [e.kind for e in k.journal.events[events:]] == ["host.join"]
    assert k.hosts() == [host]
    veto_and_check(
        make, "vmk_host_join", lambda k: None, lambda k, _: k.add_host("h2"), "host.join", lambda _: "host:h2"
    )


def test_vmk_host_leave(make: Callable[..., Kernel]) -> None:
    seen: list[bool] = []

    class Leaves:
        @hookimpl
        def vmk_host_leave(self, kernel: Kernel, host: vmkernel.Host) -> None:
            seen.append(kernel.host(host.id) is host)

    k = make(Leaves())
    k.add_host("h1")
    k.remove_host("h1")
    assert seen == [True]  # still registered during the hook
    assert k.hosts() == []
    assert k.journal[-1].kind == "host.leave"
    veto_and_check(
        make,
        "vmk_host_leave",
        lambda k: k.add_host("h1"),
        lambda k, h: k.remove_host(h),
        "host.leave",
        lambda h: f"host:{h.id}",
    )


# --------------------------------------------------------------------------- VM life


def test_vmk_vm_create(make: Callable[..., Kernel]) -> None:
    seen: list[Any] = []

    class Creates:
        @hookimpl
        def vmk_vm_create(self, kernel: Kernel, vm: VM, options: Any) -> None:
            seen.append((kernel.vm(vm.id) is vm, vm.state, dict(options), vm.name, vm.memory_mib, vm.vcpus))
            kernel.update(vm, host_id="h1")
            kernel.emit("hooktest.placed", f"vm:{vm.id}")

    k = make(Creates())
    k.add_host("h1")
    vm = k.create_vm("web", memory_mib=128, vcpus=2, confidential=True, tier="gold")
    assert seen == [(True, VMState.CREATED, {"confidential": True, "tier": "gold"}, "web", 128, 2)]
    assert vm.options == {"confidential": True, "tier": "gold"}
    assert vm.host_id == "h1"
    assert [e.kind for e in k.journal.events[-2:]] == ["hooktest.placed", "vm.create"]
    assert k.journal[-1].data["host"] == "h1"
    veto_and_check(
        make, "vmk_vm_create", lambda k: None, lambda k, _: k.create_vm("db"), "vm.create", lambda _: "vm:"
    )


def test_vmk_vm_launch(make: Callable[..., Kernel]) -> None:
    seen: list[Any] = []

    class Launches:
        @hookimpl
        def vmk_vm_launch(self, kernel: Kernel, vm: VM) -> None:
            seen.append((vm.name, vm.state))

    k = make(Launches())
    vm = k.create_vm("web")
    k.launch_vm(vm)
    k.stop_vm(vm)
    k.launch_vm("web")  # from STOPPED too
    assert seen == [("web", VMState.RUNNING), ("web", VMState.RUNNING)]
    veto_and_check(
        make,
        "vmk_vm_launch",
        lambda k: k.create_vm("db"),
        lambda k, vm: k.launch_vm(vm),
        "vm.launch",
        lambda vm: f"vm:{vm.id}",
    )


def test_vmk_vm_stop(make: Callable[..., Kernel]) -> None:
    seen: list[Any] = []

    class Stops:
        @hookimpl
        def vmk_vm_stop(self, kernel: Kernel, vm: VM) -> None:
            seen.append((vm.name, vm.state))

    k = make(Stops())
    vm = k.launch_vm(k.create_vm("web"))
    k.stop_vm(vm)
    assert seen == [("web", VMState.STOPPED)]
    assert vm.state is VMState.STOPPED

    def setup(k: Kernel) -> VM:
        return k.launch_vm(k.create_vm("db"))

    veto_and_check(
        make, "vmk_vm_stop", setup, lambda k, vm: k.stop_vm(vm), "vm.stop", lambda vm: f"vm:{vm.id}"
    )


def test_vmk_vm_destroy(make: Callable[..., Kernel]) -> None:
    seen: list[Any] = []

    class Destroys:
        @hookimpl
        def vmk_vm_destroy(self, kernel: Kernel, vm: VM) -> None:
            seen.append((vm.name, vm.state, [v.id for v in kernel.vms()]))

    k = make(Destroys())
    vm = k.create_vm("web")
    k.destroy_vm(vm)
    assert seen == [("web", VMState.DESTROYED, [])]  # already out of the registry
    assert vm.state is VMState.DESTROYED
    veto_and_check(
        make,
        "vmk_vm_destroy",
        lambda k: k.create_vm("db"),
        lambda k, vm: k.destroy_vm(vm),
        "vm.destroy",
        lambda vm: f"vm:{vm.id}",
    )


def test_vmk_rollback(make: Callable[..., Kernel]) -> None:
    first, second = RollbackLog("first"), RollbackLog("second")

    class Silent:  # implements other hooks only: not called for rollback, no harm
        @hookimpl
        def vmk_vm_launch(self, kernel: Kernel, vm: VM) -> None:
            kernel.emit("silent.launch", f"vm:{vm.id}")

    boom = CapacityError("running VMs", 1, "0")
    k = make(first, Silent(), second, Veto("vmk_vm_launch", boom))
    vm = k.create_vm("web")
    with pytest.raises(CapacityError) as info:
        k.launch_vm(vm)
    assert info.value is boom  # a vmkernel error passes through unwrapped
    # every implementation is called with the operation, the subject and the error
    for log in (first, second):
        assert log.calls == [("vm.launch", f"vm:{vm.id}", boom)]
    assert vm.state is VMState.CREATED
    assert k.journal[-1].kind == "op.failed"
    assert "silent.launch" not in [e.kind for e in k.journal]


def test_vmk_rollback_failure_is_journaled_and_others_still_run(make: Callable[..., Kernel]) -> None:
    class BadRollback:
        name = "bad-rollback"

        @hookimpl
        def vmk_rollback(self, kernel: Kernel, operation: str, subject: str, error: BaseException) -> None:
            raise RuntimeError("rollback broke")

    log = RollbackLog()
    k = make(log, BadRollback(), Veto("vmk_vm_create", RuntimeError("no"), name="veto"))
    with pytest.raises(HookFailed):
        k.create_vm("web")
    assert len(log.calls) == 1
    kinds = [e.kind for e in k.journal]
    assert kinds[-2:] == ["plugin.error", "op.failed"]
    assert k.journal[-2].data["hook"] == "vmk_rollback"
    assert "rollback broke" in k.journal[-2].data["error"]


def test_vmk_rollback_with_fewer_parameters(make: Callable[..., Kernel]) -> None:
    # pluggy lets an implementation take a subset of the hook's parameters
    calls: list[tuple[str, str]] = []

    class Short:
        @hookimpl
        def vmk_rollback(self, operation: str, subject: str) -> None:
            calls.append((operation, subject))

    k = make(Short(), Veto("vmk_vm_create", RuntimeError("no")))
    with pytest.raises(HookFailed) as info:
        k.create_vm("web")
    assert calls == [("vm.create", info.value.subject)]
    assert "plugin.error" not in [e.kind for e in k.journal]


# --------------------------------------------------------------------------- containers


def test_vmk_container_launch(make: Callable[..., Kernel]) -> None:
    rec = Recorder("vmk_container_launch")
    k = make(rec)
    k.add_host("h1")
    c = k.launch_container("h1", "app1", image="nginx", port=80)
    [call] = rec.of("vmk_container_launch")
    assert call["container"] is c
    assert (c.state, c.host_id, c.image, c.options) == ("running", "h1", "nginx", {"port": 80})
    assert k.container(c.id) is c
    veto_and_check(
        make,
        "vmk_container_launch",
        lambda k: k.add_host("h1"),
        lambda k, _: k.launch_container("h1", "app2"),
        "container.launch",
        lambda _: "container:",
    )


def test_vmk_container_stop(make: Callable[..., Kernel]) -> None:
    states: list[str] = []

    class Stops:
        @hookimpl
        def vmk_container_stop(self, kernel: Kernel, container: vmkernel.Container) -> None:
            states.append(container.state)

    k = make(Stops())
    k.add_host("h1")
    c = k.launch_container("h1", "app1")
    k.stop_container(c)
    assert states == ["stopped"]
    with pytest.raises(IllegalTransition):
        k.stop_container(c)

    def setup(k: Kernel) -> vmkernel.Container:
        k.add_host("h1")
        return k.launch_container("h1", "app1")

    veto_and_check(
        make,
        "vmk_container_stop",
        setup,
        lambda k, c: k.stop_container(c),
        "container.stop",
        lambda c: f"container:{c.id}",
    )


# --------------------------------------------------------------------------- disks and images


def test_vmk_disk_create(make: Callable[..., Kernel]) -> None:
    rec = Recorder("vmk_disk_create")
    k = make(rec)
    img = k.register_image("debian-12", arch="x86_64")
    empty = k.create_disk("scratch", 1 << 20)
    derived = k.create_disk("root", 1 << 30, base_image="debian-12")
    calls = rec.of("vmk_disk_create")
    assert [(c["disk"], c["base_image"]) for c in calls] == [(empty, None), (derived, img)]
    assert derived.base_image_id == "debian-12"
    veto_and_check(
        make,
        "vmk_disk_create",
        lambda k: None,
        lambda k, _: k.create_disk("d", 4096),
        "disk.create",
        lambda _: "disk:",
    )


def test_vmk_disk_clone(make: Callable[..., Kernel]) -> None:
    rec = Recorder("vmk_disk_clone")
    k = make(rec)
    k.register_image("base")
    src = k.create_disk("gold", 8192, base_image="base")
    clone = k.clone_disk(src, "copy")
    [call] = rec.of("vmk_disk_clone")
    assert call["source"] is src and call["clone"] is clone
    assert (clone.size_bytes, clone.base_image_id, clone.attached_to) == (8192, "base", None)
    assert k.disk("copy") is clone
    veto_and_check(
        make,
        "vmk_disk_clone",
        lambda k: k.create_disk("gold", 8192),
        lambda k, d: k.clone_disk(d, "copy"),
        "disk.clone",
        lambda _: "disk:",
    )


def test_vmk_disk_attach(make: Callable[..., Kernel]) -> None:
    seen: list[Any] = []

    class Attaches:
        @hookimpl
        def vmk_disk_attach(self, kernel: Kernel, vm: VM, disk: vmkernel.Disk) -> None:
            seen.append((vm.name, disk.name, disk.attached_to == vm.id))

    k = make(Attaches())
    vm = k.create_vm("web")
    d = k.create_disk("data", 4096)
    k.attach_disk(vm, d)
    assert seen == [("web", "data", True)]
    with pytest.raises(IllegalTransition):
        k.attach_disk(vm, d)

    def setup(k: Kernel) -> tuple[VM, vmkernel.Disk]:
        return k.create_vm("web"), k.create_disk("data", 4096)

    veto_and_check(
        make,
        "vmk_disk_attach",
        setup,
        lambda k, c: k.attach_disk(*c),
        "disk.attach",
        lambda c: f"disk:{c[1].id}",
    )


def test_vmk_disk_detach(make: Callable[..., Kernel]) -> None:
    seen: list[Any] = []

    class Detaches:
        @hookimpl
        def vmk_disk_detach(self, kernel: Kernel, vm: VM, disk: vmkernel.Disk) -> None:
            seen.append((vm.name, disk.name, disk.attached_to))

    k = make(Detaches())
    vm = k.create_vm("web")
    d1, d2 = k.create_disk("d1", 4096), k.create_disk("d2", 4096)
    k.attach_disk(vm, d1)
    k.attach_disk(vm, d2)
    k.detach_disk(vm, d1)
    assert seen == [("web", "d1", None)]
    k.destroy_vm(vm)  # destroying the VM detaches what is still attached
    assert seen == [("web", "d1", None), ("web", "d2", None)]
    assert d2.attached_to is None

    def setup(k: Kernel) -> tuple[VM, vmkernel.Disk]:
        vm, d = k.create_vm("web"), k.create_disk("data", 4096)
        k.attach_disk(vm, d)
        return vm, d

    veto_and_check(
        make,
        "vmk_disk_detach",
        setup,
        lambda k, c: k.detach_disk(*c),
        "disk.detach",
        lambda c: f"disk:{c[1].id}",
    )


def test_vmk_image_replace(make: Callable[..., Kernel]) -> None:
    seen: list[Any] = []

    class Replaces:
        @hookimpl
        def vmk_image_replace(self, kernel: Kernel, old: vmkernel.Image, new: vmkernel.Image) -> None:
            seen.append((old.name, old.state, new.name, kernel.image(new.id) is new))

    k = make(Replaces())
    k.register_image("v1")
    k.register_image("v2")
    k.replace_image("v1", "v2")
    assert seen == [("v1", "replaced", "v2", True)]

    def setup(k: Kernel) -> None:
        k.register_image("v1")
        k.register_image("v2")

    veto_and_check(
        make,
        "vmk_image_replace",
        setup,
        lambda k, _: k.replace_image("v1", "v2"),
        "image.replace",
        lambda _: "image:v1",
    )


# --------------------------------------------------------------------------- time


def test_vmk_tick(make: Callable[..., Kernel]) -> None:
    seen: list[tuple[int, int]] = []

    class Ticks:
        @hookimpl
        def vmk_tick(self, kernel: Kernel, now_ns: int) -> None:
            seen.append((now_ns, kernel.clock.now_ns))

    k = make(Ticks())
    k.clock.advance(1_000)
    k.clock.advance(0)
    k.clock.advance_to(5_000)
    assert seen == [(1_000, 1_000), (1_000, 1_000), (5_000, 5_000)]
    veto_and_check(
        make,
        "vmk_tick",
        lambda k: None,
        lambda k, _: k.clock.advance(10**9),
        "clock.advance",
        lambda _: "clock",
    )


# --------------------------------------------------------------------------- authorization


def test_vmk_authorize(make: Callable[..., Kernel]) -> None:
    asked: list[tuple[str, tuple[str, ...], str, str]] = []

    class Policy:
        @hookimpl
        def vmk_authorize(
            self, kernel: Kernel, principal: vmkernel.Principal, operation: str, resource: str
        ) -> Decision | None:
            asked.append((principal.name, principal.roles, operation, resource))
            if "viewer" in principal.roles and operation.startswith("vm."):
                return Decision.deny("viewers are read-only", source="hooktest r1")
            return None

    k = make(Policy())
    k.add_principal("bob", roles=["viewer"])
    vm = k.create_vm("web")
    assert asked[-1] == ("operator", ("admin",), "vm.create", f"vm:{vm.id}")
    events = len(k.journal)
    with pytest.raises(AuthorizationDenied) as info:
        k.launch_vm(vm, principal="bob")
    assert asked[-1] == ("bob", ("viewer",), "vm.launch", f"vm:{vm.id}")
    assert info.value.reasons == ["viewers are read-only [hooktest r1]"]
    assert vm.state is VMState.CREATED
    [denied] = k.journal.events[events:]
    assert denied.kind == "auth.denied"
    assert denied.data == {
        "principal": "bob",
        "operation": "vm.launch",
        "reasons": ["viewers are read-only [hooktest r1]"],
    }


# --------------------------------------------------------------------------- memory


class Memory:
    def __init__(self) -> None:
        self.data: dict[int, bytes] = {}

    def read(self, gpa: int, n: int) -> bytes:
        return self.data.get(gpa, bytes(n))[:n]

    def write(self, gpa: int, data: bytes) -> None:
        self.data[gpa] = data


def test_vmk_guest_memory(make: Callable[..., Kernel]) -> None:
    mem_a, mem_b = Memory(), Memory()
    abstains = Recorder("vmk_guest_memory", name="abstains", result=None)
    a = Recorder("vmk_guest_memory", name="a", result=mem_a)
    b = Recorder("vmk_guest_memory", name="b", result=mem_b)
    k = make(a, b, abstains)
    vm = k.create_vm("web")
    # firstresult: implementations run last-registered first; the first non-None answer wins
    assert k.guest_memory("web") is mem_b
    assert [c["vm"] for c in abstains.of("vmk_guest_memory")] == [vm]
    assert b.of("vmk_guest_memory") == [{"kernel": k, "vm": vm}]
    assert a.of("vmk_guest_memory") == []  # not asked once b answered
    only_abstains = make(abstains)
    with pytest.raises(FeatureUnavailable, match="vmk_guest_memory"):
        only_abstains.guest_memory(only_abstains.create_vm("x"))


def test_vmk_hypervisor_write(make: Callable[..., Kernel]) -> None:
    plain = Memory()

    class Owns:
        name = "owns-memory"

        @hookimpl
        def vmk_guest_memory(self, kernel: Kernel, vm: VM) -> Memory:
            return plain

    class Encrypts:
        name = "encrypts"

        def __init__(self) -> None:
            self.raw: list[tuple[str, int, bytes]] = []

        @hookimpl
        def vmk_hypervisor_write(self, kernel: Kernel, vm: VM, gpa: int, data: bytes) -> bool | None:
            if not vm.options.get("confidential"):
                return None
            self.raw.append((vm.name, gpa, data))
            return True

    enc = Encrypts()
    k = make(Owns(), enc)
    secret = k.create_vm("secret", confidential=True)
    normal = k.create_vm("normal")
    k.hypervisor_write(secret, 0x1000, b"\x90\x90")
    k.hypervisor_write(normal, 0x2000, bytearray(b"hi"))
    assert enc.raw == [("secret", 0x1000, b"\x90\x90")]  # handled: not written as plain memory
    assert plain.data == {0x2000: b"hi"}  # nobody handled it: plain write through guest memory


def test_vmk_launch_measure(make: Callable[..., Kernel]) -> None:
    # Called by the confidential-VM plugin, not by the kernel: an ordinary (all results) hook.
    a = Recorder("vmk_launch_measure", name="a")
    b = Recorder("vmk_launch_measure", name="b", result="seen")
    k = make(a, b)
    vm = k.launch_vm(k.create_vm("cvm", confidential=True))
    assert a.of("vmk_launch_measure") == []  # the kernel alone never measures
    digest = bytes(range(48))
    results = k.hook.vmk_launch_measure(kernel=k, vm=vm, measurement=digest)
    assert results == ["seen"]  # every implementation runs; the non-None results come back
    assert a.of("vmk_launch_measure") == [{"kernel": k, "vm": vm, "measurement": digest}]
    assert b.of("vmk_launch_measure") == a.of("vmk_launch_measure")
    assert k.hook.vmk_launch_measure.spec.opts["firstresult"] is False


# --------------------------------------------------------------------------- network


def test_vmk_frames_out(make: Callable[..., Kernel]) -> None:
    class Counts:
        name = "counts"

        def __init__(self) -> None:
            self.batches: list[tuple[str, int, list[bytes]]] = []

        @hookimpl
        def vmk_frames_out(self, kernel: Kernel, vm: VM, nic: int, frames: Any) -> dict[str, int]:
            self.batches.append((vm.name, nic, list(frames)))
            return {"frames": len(frames)}

    silent = Recorder("vmk_frames_out", name="silent")
    counts = Counts()
    k = make(silent, counts)
    vm = k.launch_vm(k.create_vm("web"))
    frames = [b"\x00" * 60, b"\xff" * 64, b"\x01" * 1514]
    assert k.send_frames(vm, frames, nic=1) == [{"frames": 3}]  # None results are left out
    assert counts.batches == [("web", 1, frames)]  # one call per batch
    assert len(silent.of("vmk_frames_out")) == 1
    k.stop_vm(vm)
    with pytest.raises(IllegalTransition):
        k.send_frames(vm, frames)
    veto_and_check(
        make,
        "vmk_frames_out",
        lambda k: k.launch_vm(k.create_vm("web")),
        lambda k, vm: k.send_frames(vm, frames),
        "net.send",
        lambda vm: f"vm:{vm.id}",
    )


def test_vmk_frames_in(make: Callable[..., Kernel]) -> None:
    # The mirror of vmk_frames_out: deliver_frames calls it, never vmk_frames_out, and vice versa.
    class Counts:
        name = "counts"

        def __init__(self) -> None:
            self.batches: list[tuple[str, int, list[bytes]]] = []

        @hookimpl
        def vmk_frames_in(self, kernel: Kernel, vm: VM, nic: int, frames: Any) -> dict[str, int]:
            self.batches.append((vm.name, nic, list(frames)))
            return {"received": len(frames)}

    silent = Recorder("vmk_frames_in", "vmk_frames_out", name="silent")
    counts = Counts()
    k = make(silent, counts)
    vm = k.launch_vm(k.create_vm("web"))
    frames = [b"\x00" * 60, bytearray(b"\xff" * 64), b"\x01" * 1514]
    assert k.deliver_frames(vm, frames, nic=2) == [{"received": 3}]  # None results are left out
    assert counts.batches == [("web", 2, frames)]  # one call per batch
    assert [c["nic"] for c in silent.of("vmk_frames_in")] == [2]
    assert silent.of("vmk_frames_out") == []
    assert k.send_frames(vm, frames) == []  # outbound frames never reach vmk_frames_in
    assert len(counts.batches) == 1 and len(silent.of("vmk_frames_out")) == 1
    assert k.deliver_frames(vm.name, []) == [{"received": 0}]  # an empty batch is still one call
    k.stop_vm(vm)
    with pytest.raises(IllegalTransition, match="deliver frames"):
        k.deliver_frames(vm, frames)
    veto_and_check(
        make,
        "vmk_frames_in",
        lambda k: k.launch_vm(k.create_vm("web")),
        lambda k, vm: k.deliver_frames(vm, frames),
        "net.deliver",
        lambda vm: f"vm:{vm.id}",
    )


def test_vmk_service_path(make: Callable[..., Kernel]) -> None:
    # Called by the pre-filter plugin through the plugin manager; firstresult.
    class Default:
        name = "default-path"

        @hookimpl
        def vmk_service_path(self, kernel: Kernel, vm: VM, nic: int, direction: str) -> tuple[int, int]:
            return (1, 255)

    class Outbound:
        name = "outbound-path"

        @hookimpl
        def vmk_service_path(
            self, kernel: Kernel, vm: VM, nic: int, direction: str
        ) -> tuple[int, int] | None:
            return (42, 254) if direction == "out" else None

    k = make(Default(), Outbound())
    vm = k.create_vm("web")
    assert k.hook.vmk_service_path(kernel=k, vm=vm, nic=0, direction="out") == (42, 254)
    assert k.hook.vmk_service_path(kernel=k, vm=vm, nic=0, direction="in") == (1, 255)
    assert make().hook.vmk_service_path(kernel=k, vm=vm, nic=0, direction="in") is None
    assert k.hook.vmk_service_path.spec.opts["firstresult"] is True


def test_vmk_security_inspect(make: Callable[..., Kernel]) -> None:
    # Called by the pre-filter plugin; a plugin registered later replaces the default component.
    default = Recorder("vmk_security_inspect", name="default", result=["pass"])

    class Strict:
        name = "strict"

        @hookimpl
        def vmk_security_inspect(self, kernel: Kernel, vm: VM, frames: Any) -> list[str]:
            return ["drop" if b"EICAR" in f else "pass" for f in frames]

    k = make(default, Strict())
    vm = k.create_vm("web")
    verdicts = k.hook.vmk_security_inspect(kernel=k, vm=vm, frames=[b"ok", b"xxEICARxx"])
    assert verdicts == ["pass", "drop"]
    assert default.of("vmk_security_inspect") == []
    only_default = make(default)
    assert only_default.hook.vmk_security_inspect(kernel=only_default, vm=vm, frames=[b"x"]) == ["pass"]


def test_vmk_link_sample(make: Callable[..., Kernel]) -> None:
    rec = Recorder("vmk_link_sample")
    k = make(rec)
    link = k.add_link("wan1", "paris", "berlin")
    k.clock.advance(500)
    k.link_sample("wan1", latency_ns=12_000, loss=0.01)
    k.link_sample(link, latency_ns=9_000, time_ns=100)
    calls = rec.of("vmk_link_sample")
    assert [c["link"] for c in calls] == [link, link]
    assert calls[0]["sample"] == {"latency_ns": 12_000, "loss": 0.01, "time_ns": 500}
    assert calls[1]["sample"] == {"latency_ns": 9_000, "time_ns": 100}
    veto_and_check(
        make,
        "vmk_link_sample",
        lambda k: k.add_link("wan1", "a", "b"),
        lambda k, link: k.link_sample(link, latency_ns=1),
        "link.sample",
        lambda _: "link:wan1",
    )


# --------------------------------------------------------------------------- storage


class Unit:
    def __init__(self, vm_id: str) -> None:
        self.vm_id = vm_id
        self.config: dict[str, Any] | None = None
        self.blobs: dict[str, bytes] = {}
        self.flushes = 0

    def write_config(self, config: dict[str, Any]) -> None:
        self.config = dict(config)

    def read_config(self) -> dict[str, Any]:
        assert self.config is not None
        return dict(self.config)

    def flush(self) -> None:
        self.flushes += 1


UNITS = StashKey[dict[str, Unit]]("hooktest-units")


class Units:
    name = "units"

    @hookimpl
    def vmk_configure(self, kernel: Kernel) -> None:
        kernel.stash[UNITS] = {}

    @hookimpl
    def vmk_storage_unit(self, kernel: Kernel, vm_id: str) -> Unit:
        return kernel.stash[UNITS].setdefault(vm_id, Unit(vm_id))

    @hookimpl
    def vmk_storage_units(self, kernel: Kernel) -> list[Unit]:
        return sorted(kernel.stash[UNITS].values(), key=lambda u: u.vm_id)


class Memories:
    """Saves and restores a per-VM blob, as a processor plugin would its memory image."""

    name = "memories"

    def __init__(self) -> None:
        self.memory: dict[str, bytes] = {}
        self.saved: list[tuple[str, Unit]] = []
        self.restored: list[tuple[str, VMState, bool, Unit]] = []

    @hookimpl
    def vmk_vm_save(self, kernel: Kernel, vm: VM, unit: Unit) -> None:
        assert unit.config is not None and unit.config["id"] == vm.id  # the definition is written first
        assert unit.flushes == 0  # and flushed after every plugin saved its part
        unit.blobs["memory"] = self.memory[vm.id]
        self.saved.append((vm.id, unit))

    @hookimpl
    def vmk_vm_restore(self, kernel: Kernel, vm: VM, unit: Unit) -> None:
        self.restored.append((vm.id, vm.state, kernel.vm(vm.id) is vm, unit))
        self.memory[vm.id] = unit.blobs["memory"]


def test_vmk_storage_unit(make: Callable[..., Kernel]) -> None:
    asked = Recorder("vmk_storage_unit", name="asked")
    k = make(Units(), asked)
    vm = k.create_vm("web")
    unit = k.storage_unit(vm)
    assert isinstance(unit, Unit) and unit.vm_id == vm.id
    assert k.storage_unit("web") is unit  # a name resolves to the VM's id
    assert k.storage_unit(vm.id) is unit
    assert [c["vm_id"] for c in asked.of("vmk_storage_unit")] == [vm.id] * 3
    with pytest.raises(FeatureUnavailable, match="vmk_storage_unit"):
        make().storage_unit(vm.id)


def test_vmk_storage_units(make: Callable[..., Kernel]) -> None:
    k = make(Units())
    a, b = k.create_vm("a"), k.create_vm("b")
    assert k.storage_units() == []
    ua, ub = k.storage_unit(a), k.storage_unit(b)
    assert k.storage_units() == sorted([ua, ub], key=lambda u: u.vm_id)
    with pytest.raises(FeatureUnavailable, match="vmk_storage_units"):
        make().storage_units()


def test_vmk_vm_save(make: Callable[..., Kernel]) -> None:
    mem = Memories()
    k = make(Units(), mem)
    vm = k.create_vm("web", memory_mib=32, tier="gold")
    mem.memory[vm.id] = b"\x01\x02"
    unit = k.save_vm(vm)
    assert mem.saved == [(vm.id, unit)]
    assert unit.flushes == 1
    assert unit.blobs == {"memory": b"\x01\x02"}
    assert unit.config is not None and unit.config["options"] == {"tier": "gold"}
    assert k.journal[-1].kind == "vm.save"


def test_vmk_vm_save_rollback(make: Callable[..., Kernel]) -> None:
    veto_and_check(
        lambda *p: make(Units(), *p),
        "vmk_vm_save",
        lambda k: k.create_vm("db"),
        lambda k, vm: k.save_vm(vm),
        "vm.save",
        lambda vm: f"vm:{vm.id}",
    )


def test_vmk_vm_restore(make: Callable[..., Kernel]) -> None:
    mem = Memories()
    k = make(Units(), mem)
    vm = k.launch_vm(k.create_vm("web", memory_mib=32))
    mem.memory[vm.id] = b"state"
    unit = k.save_vm(vm)
    k.destroy_vm(vm, force=True)
    del mem.memory[vm.id]
    back = k.restore_vm(vm.id)
    assert (back.id, back.name, back.memory_mib, back.state) == (vm.id, "web", 32, VMState.STOPPED)
    assert mem.restored == [(vm.id, VMState.STOPPED, True, unit)]  # registered before the hook
    assert mem.memory[vm.id] == b"state"
    assert k.vm("web") is back
    k.check_invariants()
    k.launch_vm(back)


def test_vmk_vm_restore_rollback(make: Callable[..., Kernel]) -> None:
    def setup(k: Kernel) -> Unit:
        vm = k.create_vm("web")
        unit = k.save_vm(vm)
        k.destroy_vm(vm)
        return unit  # type: ignore[no-any-return]

    veto_and_check(
        lambda *p: make(Units(), *p),
        "vmk_vm_restore",
        setup,
        lambda k, unit: k.restore_vm(unit),
        "vm.restore",
        lambda unit: f"vm:{unit.vm_id}",
    )


# --------------------------------------------------------------------------- configuration


def test_vmk_config_receive(make: Callable[..., Kernel]) -> None:
    class Applies:
        name = "applies"

        @hookimpl
        def vmk_config_receive(self, kernel: Kernel, target: str, settings: Any) -> list[dict[str, Any]]:
            return [{"uri": s["uri"], "target": target, "status": "applied"} for s in settings]

    silent = Recorder("vmk_config_receive", name="silent")
    k = make(silent, Applies())
    settings = [{"uri": "./Device/Vendor/MSFT/Firewall/Enable", "value": True}]
    results = k.apply_config("host:h1", settings)
    assert results == [[{"uri": settings[0]["uri"], "target": "host:h1", "status": "applied"}]]
    assert silent.of("vmk_config_receive") == [{"kernel": k, "target": "host:h1", "settings": settings}]
    veto_and_check(
        make,
        "vmk_config_receive",
        lambda k: None,
        lambda k, _: k.apply_config("host:h1", settings),
        "config.receive",
        lambda _: "host:h1",
    )


def test_vmk_config_report(make: Callable[..., Kernel]) -> None:
    # Called by the MDM plugin once it merged the results; an ordinary hook, every implementation runs.
    a = Recorder("vmk_config_report", name="a")
    b = Recorder("vmk_config_report", name="b")
    k = make(a, b)
    results = [{"uri": "./Vendor/x", "target": "host:h1", "generation": 3, "status": "applied"}]
    assert k.hook.vmk_config_report(kernel=k, target="host:h1", results=results) == []
    assert (
        a.of("vmk_config_report")
        == b.of("vmk_config_report")
        == [{"kernel": k, "target": "host:h1", "results": results}]
    )
    assert k.hook.vmk_config_report.spec.opts["firstresult"] is False


# --------------------------------------------------------------------------- confidential VMs


def test_vmk_vm_identity(make: Callable[..., Kernel]) -> None:
    class Identities:
        name = "identities"

        @hookimpl
        def vmk_vm_identity(self, kernel: Kernel, vm: VM) -> str | None:
            return f"CN={vm.name}" if vm.options.get("confidential") else None

    k = make(Identities())
    cvm = k.create_vm("cvm", confidential=True)
    plain = k.create_vm("plain")
    assert k.identity(cvm) == "CN=cvm"
    assert k.identity("cvm") == "CN=cvm"
    with pytest.raises(FeatureUnavailable, match="vmk_vm_identity"):
        k.identity(plain)


def test_vmk_entropy_device(make: Callable[..., Kernel]) -> None:
    class Entropy:
        name = "entropy"

        @hookimpl
        def vmk_entropy_device(self, kernel: Kernel, vm: VM) -> Any:
            rng = kernel.rng_for(f"entropy:{vm.id}")
            return SimpleNamespace(read=rng.randbytes)

    k1, k2 = make(Entropy(), seed=3), make(Entropy(), seed=3)
    d1 = k1.entropy(k1.create_vm("web"))
    d2 = k2.entropy(k2.create_vm("web"))
    assert d1.read(16) == d2.read(16)  # seeded: the same on both kernels
    bare = make()
    with pytest.raises(FeatureUnavailable, match="vmk_entropy_device"):
        bare.entropy(bare.create_vm("web"))


# --------------------------------------------------------------------------- events, testing, reporting


class Observer:
    def __init__(self, name: str = "observer") -> None:
        self.name = name
        self.events: list[Event] = []

    @hookimpl
    def vmk_event(self, kernel: Kernel, event: Event) -> None:
        # the event is in the journal before it is broadcast
        assert kernel.journal[event.seq] is event
        self.events.append(event)


def test_vmk_event(make: Callable[..., Kernel]) -> None:
    obs = Observer()
    k = make(obs, Veto("vmk_vm_launch", RuntimeError("no launches")))
    vm = k.create_vm("web")
    k.clock.advance(10)
    with pytest.raises(HookFailed):
        k.launch_vm(vm)
    k.emit("hooktest.note", "kernel", n=1)
    # once per committed event, in journal order; the failed launch was never broadcast
    assert obs.events == list(k.journal.events)
    assert "vm.launch" not in [e.kind for e in obs.events]
    assert [e.kind for e in obs.events][-2:] == ["op.failed", "hooktest.note"]


def test_vmk_event_observer_failure_is_journaled(make: Callable[..., Kernel]) -> None:
    class Fussy:
        name = "fussy"

        @hookimpl
        def vmk_event(self, kernel: Kernel, event: Event) -> None:
            if event.kind == "vm.create":
                raise ValueError("cannot handle creates")

    k = make(Fussy())
    vm = k.create_vm("web")  # observers cannot veto: the VM exists
    assert k.vm("web") is vm
    errors = k.journal.of_kind("plugin.error")
    assert len(errors) == 1
    assert errors[0].data["hook"] == "vmk_event"
    assert errors[0].data["plugin"] == "fussy"
    assert "cannot handle creates" in errors[0].data["error"]
    k.check_invariants()


def test_vmk_event_failure_does_not_hide_the_event_from_other_observers(make: Callable[..., Kernel]) -> None:
    obs = Observer()

    class Fussy:
        name = "fussy"

        @hookimpl
        def vmk_event(self, kernel: Kernel, event: Event) -> None:
            if event.kind == "vm.create":
                raise ValueError("cannot handle creates")

    k = make(obs, Fussy())  # fussy is registered last, so it is called first
    k.create_vm("web")
    assert "vm.create" in [e.kind for e in obs.events]
    assert obs.events == list(k.journal.events)


def test_vmk_event_failing_observer_does_not_cascade(make: Callable[..., Kernel]) -> None:
    class AlwaysFails:
        name = "always-fails"
        calls = 0

        @hookimpl
        def vmk_event(self, kernel: Kernel, event: Event) -> None:
            AlwaysFails.calls += 1
            if AlwaysFails.calls <= 50:  # bounded so that a cascade fails the test instead of hanging it
                raise RuntimeError("observer bug")

    k = make(AlwaysFails())
    k.create_vm("web")
    errors = len(k.journal.of_kind("plugin.error"))
    others = len(k.journal) - errors
    # at most one plugin.error per event it failed on, not errors about errors
    assert errors <= others, f"{errors} plugin.error events for {others} other events"


def test_vmk_event_not_before_vmk_configure(make: Callable[..., Kernel]) -> None:
    seen = StashKey[list[str]]("seen")

    class Counts:
        name = "counts"
        calls = 0

        @hookimpl
        def vmk_configure(self, kernel: Kernel) -> None:
            kernel.stash[seen] = []

        @hookimpl
        def vmk_event(self, kernel: Kernel, event: Event) -> None:
            Counts.calls += 1
            if Counts.calls > 100:  # bounded: a failure cascade must fail the test, not hang it
                return
            kernel.stash[seen].append(event.kind)

    k = make(Counts())
    k.create_vm("web")
    assert k.journal.of_kind("plugin.error") == []
    assert k.stash[seen] == [e.kind for e in k.journal]


def test_vmk_invariants(make: Callable[..., Kernel]) -> None:
    broken = {"now": False}

    class Checks:
        name = "checks"

        @hookimpl
        def vmk_invariants(self, kernel: Kernel) -> list[Invariant]:
            return [
                Invariant("checks.fine", lambda: None),
                Invariant("checks.flag", lambda: "flag is set" if broken["now"] else None),
            ]

    class NoChecks:
        name = "none"

        @hookimpl
        def vmk_invariants(self, kernel: Kernel) -> None:
            return None

    k = make(Checks(), NoChecks())
    names = [inv.name for inv in k.invariants()]
    assert names[:2] == ["kernel.vm-states", "kernel.journal-order"]  # the kernel's own first
    assert set(names[2:]) == {"checks.fine", "checks.flag"}
    k.check_invariants()
    broken["now"] = True
    with pytest.raises(InvariantViolation, match=r"checks\.flag") as info:
        k.check_invariants()
    assert info.value.name == "checks.flag"
    assert "flag is set" in str(info.value)


def test_vmk_invariants_must_be_invariant_objects(make: Callable[..., Kernel]) -> None:
    class Sloppy:
        @hookimpl
        def vmk_invariants(self, kernel: Kernel) -> list[Any]:
            return [("name", lambda: None)]

    with pytest.raises(PluginError, match="vmk_invariants"):
        make(Sloppy()).invariants()


def test_vmk_report(make: Callable[..., Kernel]) -> None:
    class Reports:
        name = "reports"

        @hookimpl
        def vmk_report(self, kernel: Kernel) -> ReportSection:
            return ReportSection("reports", [f"{len(kernel.vms())} VMs"])

    quiet = Recorder("vmk_report", name="quiet")  # returns None: contributes nothing
    k = make(Reports(), quiet)
    k.create_vm("web")
    sections = k.report()
    assert [s.title for s in sections] == ["kernel", "reports"]
    assert sections[1].lines == ["1 VMs"]
    assert any("1 vms" in line for line in sections[0].lines)
    assert len(quiet.of("vmk_report")) == 1
