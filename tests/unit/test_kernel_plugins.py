"""Plugin loading (explicit, entry points, blocking, env vars), per-kernel stash, seeded RNG streams."""

from __future__ import annotations

import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

from vmkernel import Kernel, Stash, StashKey, hookimpl
from vmkernel.errors import InvalidArgument, PluginError, UnknownResource, VmkError


class Named:
    name = "named"

    @hookimpl
    def vmk_tick(self, now_ns: int) -> None:
        pass


class Unnamed:
    @hookimpl
    def vmk_report(self, kernel: Kernel) -> None:
        return None


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Kernel]]:
    made: list[Kernel] = []

    def factory(*plugins: Any, **kwargs: Any) -> Kernel:
        kwargs.setdefault("autoload", False)
        k = Kernel(plugins=list(plugins), data_dir=tmp_path / f"k{len(made)}", **kwargs)
        made.append(k)
        return k

    yield factory
    for k in made:
        k.close()


# --------------------------------------------------------------------------- explicit plugins


def test_explicit_plugins_and_their_names(make: Callable[..., Kernel]) -> None:
    module = types.ModuleType("my_module_plugin")

    @hookimpl
    def vmk_configure(kernel: Kernel) -> None:
        pass

    module.vmk_configure = vmk_configure  # type: ignore[attr-defined]
    k = make(Named(), Unnamed(), module)
    infos = {p.name: p for p in k.plugins()}
    assert list(infos) == ["named", "Unnamed", "my_module_plugin"]  # registration order
    assert infos["named"].hooks == ("vmk_tick",)
    assert infos["Unnamed"].hooks == ("vmk_report",)
    assert infos["my_module_plugin"].hooks == ("vmk_configure",)
    assert {p.source for p in infos.values()} == {"passed explicitly"}
    assert k.has_plugin("named") and not k.has_plugin("nope")
    assert k.journal[0].data["plugins"] == ["named", "Unnamed", "my_module_plugin"]


def test_no_plugins_at_all(make: Callable[..., Kernel]) -> None:
    k = make()
    assert k.plugins() == []
    k.launch_vm(k.create_vm("web"))


def test_same_plugin_twice_is_a_plugin_error(make: Callable[..., Kernel]) -> None:
    p = Named()
    with pytest.raises(PluginError, match="named"):
        make(p, p)
    with pytest.raises(PluginError, match="Unnamed"):
        make(Unnamed(), Unnamed())  # two plugins under one name


def test_block_by_name(make: Callable[..., Kernel]) -> None:
    k = make(Named(), Unnamed(), block=["named"])
    assert [p.name for p in k.plugins()] == ["Unnamed"]
    with pytest.raises(InvalidArgument, match="block"):
        make(Named(), block="named")


def test_block_from_environment(make: Callable[..., Kernel], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMKERNEL_BLOCK_PLUGINS", " named , other,")
    k = make(Named(), Unnamed())
    assert [p.name for p in k.plugins()] == ["Unnamed"]


def test_misspelled_hook_is_a_plugin_error(make: Callable[..., Kernel]) -> None:
    class Typo:
        name = "typo"

        @hookimpl
        def vmk_vm_craete(self, kernel: Kernel) -> None:
            pass

    with pytest.raises(PluginError, match="vmk_vm_craete") as info:
        make(Typo())
    assert info.value.plugin == "typo"
    assert "misspelled" in info.value.expected


def test_hookimpl_with_a_wrong_argument_is_a_plugin_error(make: Callable[..., Kernel]) -> None:
    class Wrong:
        name = "wrong"

        @hookimpl
        def vmk_vm_launch(self, kernel: Kernel, machine: Any) -> None:
            pass

    with pytest.raises(PluginError, match="machine") as info:
        make(Wrong())
    assert info.value.plugin == "wrong"


def test_unmarked_functions_are_not_hooks(make: Callable[..., Kernel]) -> None:
    class Unmarked:
        def vmk_vm_launch(self, kernel: Kernel, vm: Any) -> None:
            raise AssertionError("never called: not marked with @hookimpl")

    k = make(Unmarked())
    k.launch_vm(k.create_vm("web"))
    assert k.plugins()[0].hooks == ()


def test_hookimpl_may_take_fewer_arguments(make: Callable[..., Kernel]) -> None:
    seen: list[int] = []

    class Few:
        @hookimpl
        def vmk_tick(self, now_ns: int) -> None:
            seen.append(now_ns)

    make(Few()).clock.advance(5)
    assert seen == [5]


# --------------------------------------------------------------------------- entry points


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str, str], None]]:
    """Install a throw-away distribution whose ``vmkernel`` entry point is ``name``."""
    modules: list[str] = []

    def install(name: str, source: str) -> None:
        module = f"vmk_loadtest_{name.replace('-', '_')}"
        site = tmp_path / f"site-{name}"
        site.mkdir()
        (site / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
        dist = site / f"{module}-2.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vmk-loadtest-{name}\nVersion: 2.0\n")
        (dist / "entry_points.txt").write_text(f"[vmkernel]\n{name} = {module}\n")
        monkeypatch.syspath_prepend(str(site))
        modules.append(module)

    yield install
    for module in modules:
        sys.modules.pop(module, None)


GOOD = """
    from vmkernel import hookimpl

    @hookimpl
    def vmk_report(kernel):
        return None
"""


def loaded(k: Kernel) -> dict[str, str]:
    return {p.name: p.source for p in k.plugins()}


def others(mine: str) -> list[str]:
    """Every other installed entry point: blocked so that these tests load only their own plugin."""
    return [ep.name for ep in entry_points(group="vmkernel") if ep.name != mine]


def test_entry_point_plugin_autoloads(
    make: Callable[..., Kernel], installed: Callable[[str, str], None]
) -> None:
    installed("loadtest-good", GOOD)
    k = make(Named(), autoload=True, block=others("loadtest-good"))
    sources = loaded(k)
    assert sources["loadtest-good"] == "entry point of vmk-loadtest-loadtest-good 2.0"
    assert sources["named"] == "passed explicitly"
    assert next(iter(sources)) == "named"  # explicit plugins register first


def test_autoload_off_by_argument(make: Callable[..., Kernel], installed: Callable[[str, str], None]) -> None:
    installed("loadtest-good", GOOD)
    assert "loadtest-good" not in loaded(make(autoload=False, block=others("loadtest-good")))


def test_autoload_off_by_environment(
    make: Callable[..., Kernel], installed: Callable[[str, str], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    installed("loadtest-good", GOOD)
    block = others("loadtest-good")
    monkeypatch.delenv("VMKERNEL_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    assert "loadtest-good" in loaded(make(autoload=None, block=block))
    monkeypatch.setenv("VMKERNEL_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "loadtest-good" not in loaded(make(autoload=None, block=block))
    assert "loadtest-good" in loaded(make(autoload=True, block=block))  # an explicit argument wins


def test_entry_point_blocked_by_argument_and_environment(
    make: Callable[..., Kernel], installed: Callable[[str, str], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    installed("loadtest-good", GOOD)
    block = others("loadtest-good")
    assert "loadtest-good" in loaded(make(autoload=True, block=block))
    assert "loadtest-good" not in loaded(make(autoload=True, block=[*block, "loadtest-good"]))
    monkeypatch.setenv("VMKERNEL_BLOCK_PLUGINS", "loadtest-good")
    assert "loadtest-good" not in loaded(make(autoload=True, block=block))


def test_entry_point_that_fails_to_import_is_a_plugin_error(
    make: Callable[..., Kernel], installed: Callable[[str, str], None]
) -> None:
    installed("loadtest-broken", "raise ImportError('missing dependency frobnicate')\n")
    with pytest.raises(PluginError, match="frobnicate") as info:
        make(autoload=True, block=others("loadtest-broken"))
    assert isinstance(info.value.__cause__, ImportError)


def test_entry_point_with_a_bad_hook_is_a_plugin_error(
    make: Callable[..., Kernel], installed: Callable[[str, str], None]
) -> None:
    installed(
        "loadtest-bad",
        """
        from vmkernel import hookimpl

        @hookimpl
        def vmk_tick(kernel, when):
            pass
        """,
    )
    with pytest.raises(PluginError, match="when"):
        make(autoload=True, block=others("loadtest-bad"))


# --------------------------------------------------------------------------- stash


COUNT = StashKey[list[str]]("count")


class Counter:
    """One plugin object shared by two kernels: its state must live in each kernel's stash."""

    name = "counter"

    @hookimpl
    def vmk_configure(self, kernel: Kernel) -> None:
        kernel.stash[COUNT] = []

    @hookimpl
    def vmk_vm_create(self, kernel: Kernel, vm: Any) -> None:
        kernel.stash[COUNT].append(vm.name)


def test_stash_is_per_kernel(make: Callable[..., Kernel]) -> None:
    plugin = Counter()
    a, b = make(plugin), make(plugin)
    a.create_vm("x")
    a.create_vm("y")
    b.create_vm("z")
    assert a.stash[COUNT] == ["x", "y"]
    assert b.stash[COUNT] == ["z"]
    assert a.stash[COUNT] is not b.stash[COUNT]


def test_stash_api() -> None:
    stash = Stash()
    key, other = StashKey[int]("key"), StashKey[int]()
    assert key not in stash and len(stash) == 0
    with pytest.raises(UnknownResource, match="key"):
        stash[key]
    assert stash.get(key, -1) == -1
    assert stash.setdefault(key, 3) == 3
    assert stash.setdefault(key, 4) == 3
    stash[other] = 5
    assert (stash[key], stash[other], len(stash)) == (3, 5, 2)
    del stash[key]
    assert key not in stash
    assert StashKey[int]("key") is not key  # keys compare by identity, not by name
    assert "key" in repr(key)


# --------------------------------------------------------------------------- rng


def draws(k: Kernel, name: str) -> list[int]:
    rng = k.rng_for(name)
    return [rng.getrandbits(64) for _ in range(8)]


def test_rng_for_is_deterministic_and_independent(make: Callable[..., Kernel]) -> None:
    a, b, c = make(seed=1), make(seed=1), make(seed=2)
    assert draws(a, "placement") == draws(b, "placement")
    assert draws(a, "placement") == draws(a, "placement")  # a fresh stream each call
    assert draws(a, "placement") != draws(a, "leases")
    assert draws(a, "placement") != draws(c, "placement")


def test_rng_streams_do_not_shift_when_other_plugins_draw(make: Callable[..., Kernel]) -> None:
    class Greedy:
        name = "greedy"

        @hookimpl
        def vmk_configure(self, kernel: Kernel) -> None:
            kernel.rng_for("greedy").random()
            kernel.rng.random()

    plain, greedy = make(seed=7), make(Greedy(), seed=7)
    assert draws(plain, "mine") == draws(greedy, "mine")
    # VM ids come from a stream of their own as well
    assert plain.create_vm("web").id == greedy.create_vm("web").id


def test_vm_ids_follow_the_seed(make: Callable[..., Kernel]) -> None:
    ids = [[k.create_vm(f"vm{i}").id for i in range(5)] for k in (make(seed=3), make(seed=3), make(seed=4))]
    assert ids[0] == ids[1]
    assert not set(ids[0]) & set(ids[2])
    assert len(set(ids[0])) == 5


# --------------------------------------------------------------------------- plugin bugs outside operations


class Broken:
    """Every query and reporting hook raises a plain exception, as a buggy plugin would."""

    name = "broken"
    error = RuntimeError("plugin bug")

    @hookimpl
    def vmk_guest_memory(self) -> Any:
        raise self.error

    @hookimpl
    def vmk_hypervisor_write(self) -> Any:
        raise self.error

    @hookimpl
    def vmk_storage_unit(self) -> Any:
        raise self.error

    @hookimpl
    def vmk_storage_units(self) -> Any:
        raise self.error

    @hookimpl
    def vmk_vm_identity(self) -> Any:
        raise self.error

    @hookimpl
    def vmk_entropy_device(self) -> Any:
        raise self.error

    @hookimpl
    def vmk_invariants(self) -> Any:
        raise self.error

    @hookimpl
    def vmk_report(self) -> Any:
        raise self.error


QUERIES: dict[str, Callable[[Kernel, Any], Any]] = {
    "guest_memory": lambda k, vm: k.guest_memory(vm),
    "hypervisor_write": lambda k, vm: k.hypervisor_write(vm, 0, b"x"),
    "storage_unit": lambda k, vm: k.storage_unit(vm),
    "storage_units": lambda k, vm: k.storage_units(),
    "identity": lambda k, vm: k.identity(vm),
    "entropy": lambda k, vm: k.entropy(vm),
    "invariants": lambda k, vm: k.check_invariants(),
    "report": lambda k, vm: k.report(),
}


@pytest.mark.parametrize("query", list(QUERIES))
def test_plugin_exception_in_a_query_is_a_typed_error(make: Callable[..., Kernel], query: str) -> None:
    k = make(Broken())
    vm = k.create_vm("web")
    with pytest.raises(VmkError) as info:
        QUERIES[query](k, vm)
    assert info.value.__cause__ is Broken.error
    assert "plugin bug" in str(info.value)
