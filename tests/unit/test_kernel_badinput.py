"""Bad input to every public kernel entry point gets a typed vmkernel error and changes nothing."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings

from vmkernel import Kernel, VMState, hookimpl
from vmkernel.errors import (
    DuplicateResource,
    FeatureUnavailable,
    IllegalTransition,
    InvalidArgument,
    PluginError,
    UnknownResource,
    VmkError,
)
from vmkernel.testing import strategies as vst


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    with Kernel(seed=8, data_dir=tmp_path / "k", autoload=False) as k:
        yield k


def unchanged(k: Kernel) -> Callable[[], None]:
    """A check that the registry and the journal are what they are now."""
    lines = k.journal.lines()
    registry = sorted(repr(r) for r in k.registry)

    def check() -> None:
        assert k.journal.lines() == lines
        assert sorted(repr(r) for r in k.registry) == registry

    return check


def assert_typed(err: BaseException, value: Any = ...) -> None:
    """A vmkernel error whose message names the thing, the value and what was expected."""
    assert isinstance(err, VmkError)
    for attr in ("thing", "value", "expected"):
        assert hasattr(err, attr), f"{type(err).__name__} lacks .{attr}"
    assert str(err.thing) in str(err)  # type: ignore[attr-defined]
    if value is not ...:
        assert err.value == value or repr(value)[:50] in str(err)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- Kernel()


@pytest.mark.parametrize("seed", [-1, 2**64, 1.0, True, "1", None, b"\x01"])
def test_bad_seed(tmp_path: Path, seed: Any) -> None:
    with pytest.raises(InvalidArgument, match="seed") as info:
        Kernel(seed=seed, data_dir=tmp_path, autoload=False)
    assert_typed(info.value, seed)


def test_seed_limits(tmp_path: Path) -> None:
    for seed in (0, 2**64 - 1):
        with Kernel(seed=seed, data_dir=tmp_path / str(seed), autoload=False) as k:
            assert k.seed == seed


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "afile"
    path.write_text("x")
    with pytest.raises(InvalidArgument, match="data_dir") as info:
        Kernel(data_dir=path, autoload=False)
    assert_typed(info.value)
    assert path.read_text() == "x"


def test_data_dir_below_a_file(tmp_path: Path) -> None:
    path = tmp_path / "afile"
    path.write_text("x")
    with pytest.raises(InvalidArgument, match="data_dir"):
        Kernel(data_dir=path / "sub", autoload=False)


@pytest.mark.parametrize("data_dir", [3, b"/tmp/x", ["a"]])
def test_data_dir_of_a_wrong_type(data_dir: Any) -> None:
    with pytest.raises(InvalidArgument, match="data_dir"):
        Kernel(data_dir=data_dir, autoload=False)


def test_data_dir_is_created_and_kept(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    with Kernel(data_dir=str(target), autoload=False) as k:
        assert k.data_dir == target and target.is_dir()
    assert target.is_dir()


def test_bad_config(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="config"):
        Kernel(config=[("a", 1)], data_dir=tmp_path, autoload=False)  # type: ignore[arg-type]


def test_plugins_that_are_not_a_list(tmp_path: Path) -> None:
    with pytest.raises(VmkError, match="plugins"):
        Kernel(plugins=5, data_dir=tmp_path, autoload=False)  # type: ignore[arg-type]


def test_failed_construction_leaves_no_temporary_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    class Typo:
        name = "typo"

        from vmkernel import hookimpl

        @hookimpl
        def vmk_vm_craete(self, kernel: Kernel) -> None:
            pass

    with pytest.raises(PluginError):
        Kernel(plugins=[Typo()], autoload=False)
    with pytest.raises(InvalidArgument):
        Kernel(config="not a mapping", autoload=False)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- VMs


@settings()
@given(name=vst.bad_names())
def test_bad_vm_names(tmp_path_factory: Any, name: Any) -> None:
    with Kernel(data_dir=tmp_path_factory.mktemp("k"), autoload=False) as k:
        check = unchanged(k)
        with pytest.raises(InvalidArgument, match="vm name") as info:
            k.create_vm(name)
        assert_typed(info.value, name)
        check()


@settings()
@given(memory=vst.bad_memory_mib())
def test_bad_memory(tmp_path_factory: Any, memory: Any) -> None:
    with Kernel(data_dir=tmp_path_factory.mktemp("k"), autoload=False) as k:
        check = unchanged(k)
        with pytest.raises(InvalidArgument, match="memory_mib") as info:
            k.create_vm("web", memory_mib=memory)
        assert_typed(info.value)
        check()


@pytest.mark.parametrize("memory", [-1, 0, True, False, 1.5, "64", None, 2**24 + 1])
def test_bad_memory_examples(kernel: Kernel, memory: Any) -> None:
    check = unchanged(kernel)
    with pytest.raises(InvalidArgument, match="memory_mib") as info:
        kernel.create_vm("web", memory_mib=memory)
    assert info.value.value is memory
    assert "int between 1 and" in info.value.expected
    check()


@pytest.mark.parametrize("vcpus", [0, -2, True, 2.0, "2", 1025])
def test_bad_vcpus(kernel: Kernel, vcpus: Any) -> None:
    check = unchanged(kernel)
    with pytest.raises(InvalidArgument, match="vcpus"):
        kernel.create_vm("web", vcpus=vcpus)
    check()


def test_bad_vm_options(kernel: Kernel) -> None:
    check = unchanged(kernel)
    with pytest.raises(InvalidArgument, match="options"):
        kernel.create_vm("web", handle=object())
    with pytest.raises(InvalidArgument, match="options"):
        kernel.create_vm("web", ports={80, 443})
    check()


def test_unknown_vm_everywhere(kernel: Kernel) -> None:
    check = unchanged(kernel)
    calls: list[Callable[[], Any]] = [
        lambda: kernel.vm("ghost"),
        lambda: kernel.launch_vm("ghost"),
        lambda: kernel.stop_vm("ghost"),
        lambda: kernel.destroy_vm("ghost"),
        lambda: kernel.destroy_vm("ghost", force=True),
        lambda: kernel.send_frames("ghost", [b"x"]),
        lambda: kernel.deliver_frames("ghost", [b"x"]),
        lambda: kernel.guest_memory("ghost"),
        lambda: kernel.hypervisor_write("ghost", 0, b"x"),
        lambda: kernel.identity("ghost"),
        lambda: kernel.entropy("ghost"),
        lambda: kernel.save_vm("ghost"),
        lambda: kernel.attach_disk("ghost", "ghost-disk"),
    ]
    for call in calls:
        with pytest.raises(UnknownResource, match="ghost") as info:
            call()
        assert_typed(info.value)
    check()


def test_duplicate_names_of_other_resources(kernel: Kernel) -> None:
    kernel.add_host("h1")
    kernel.register_image("img")
    kernel.create_network("net")
    kernel.add_principal("bob")
    for call in (
        lambda: kernel.add_host("h1"),
        lambda: kernel.register_image("img"),
        lambda: kernel.create_network("net"),
        lambda: kernel.add_principal("bob"),
    ):
        with pytest.raises(DuplicateResource):
            call()
    kernel.check_invariants()


# --------------------------------------------------------------------------- other resources


@pytest.mark.parametrize(
    ("call", "thing"),
    [
        (lambda k: k.add_host(""), "host name"),
        (lambda k: k.add_host("h", memory_mib=0), "memory_mib"),
        (lambda k: k.add_host("h", cpus=True), "cpus"),
        (lambda k: k.add_host("h", cpus=2.0), "cpus"),
        (lambda k: k.remove_host(7), "host reference"),
        (lambda k: k.add_principal("bob", roles="admin"), "roles"),
        (lambda k: k.add_principal("bob", roles=[1]), "roles"),
        (lambda k: k.add_principal("bob", roles=5), "roles"),
        (lambda k: k.add_principal("-bob"), "principal name"),
        (lambda k: k.create_network("net", vni=2**24), "vni"),
        (lambda k: k.create_network("net", vni=-1), "vni"),
        (lambda k: k.create_network("net", vni=True), "vni"),
        (lambda k: k.add_link("l", "", "b"), "link end a"),
        (lambda k: k.add_link("l", "a", None), "link end b"),
        (lambda k: k.register_image("bad name"), "image name"),
        (lambda k: k.create_disk("d", 511), "size_bytes"),
        (lambda k: k.create_disk("d", True), "size_bytes"),
        (lambda k: k.create_disk("d", 2**51), "size_bytes"),
        (lambda k: k.launch_container("h0", "c", image=""), "image"),
        (lambda k: k.launch_container("h0", "c/d"), "container name"),
        (lambda k: k.apply_config("", []), "target"),
        (lambda k: k.apply_config("host:h0", {"uri": "x"}), "settings"),
        (lambda k: k.apply_config("host:h0", ["not a mapping"]), "settings"),
        (lambda k: k.apply_config("host:h0", 5), "settings"),
        (lambda k: k.principal(3), "principal"),
        (lambda k: k.emit("", "s"), "event kind"),
        (lambda k: k.emit("k", 3), "event subject"),
    ],
)
def test_bad_arguments(kernel: Kernel, call: Callable[[Kernel], Any], thing: str) -> None:
    kernel.add_host("h0")
    check = unchanged(kernel)
    with pytest.raises(InvalidArgument) as info:
        call(kernel)
    assert info.value.thing == thing
    assert_typed(info.value)
    check()


def test_bad_memory_writes(kernel: Kernel) -> None:
    vm = kernel.launch_vm(kernel.create_vm("web"))
    check = unchanged(kernel)
    for call, thing in (
        (lambda: kernel.hypervisor_write(vm, -1, b"x"), "gpa"),
        (lambda: kernel.hypervisor_write(vm, 2**64, b"x"), "gpa"),
        (lambda: kernel.hypervisor_write(vm, 0, "text"), "data"),
    ):
        with pytest.raises(InvalidArgument) as info:
            call()
        assert info.value.thing == thing
    check()


@pytest.mark.parametrize(
    ("method", "verb"), [("send_frames", "send frames"), ("deliver_frames", "deliver frames")]
)
def test_bad_frames(kernel: Kernel, method: str, verb: str) -> None:
    # Both directions check the same things, before any hook runs.
    calls: list[tuple[str, int, str]] = []

    class Spy:
        @hookimpl
        def vmk_frames_out(self, kernel: Kernel, vm: Any, nic: int, frames: Any) -> None:
            calls.append(("out", nic, repr(frames)))

        @hookimpl
        def vmk_frames_in(self, kernel: Kernel, vm: Any, nic: int, frames: Any) -> None:
            calls.append(("in", nic, repr(frames)))

    kernel.pm.register(Spy(), name="spy")
    frames_call = getattr(kernel, method)
    vm = kernel.launch_vm(kernel.create_vm("web"))
    check = unchanged(kernel)
    for args, kwargs, thing in (
        ((b"one frame",), {}, "frames"),
        (("frames",), {}, "frames"),
        ((None,), {}, "frames"),
        ((5,), {}, "frames"),
        (({b"x"},), {}, "frames"),
        (([b"x", "text"],), {}, "frames[1]"),
        (([b"x", 7],), {}, "frames[1]"),
        (([None],), {}, "frames[0]"),
        (([memoryview(b"x")],), {}, "frames[0]"),
        (([b"x"],), {"nic": 256}, "nic"),
        (([b"x"],), {"nic": -1}, "nic"),
        (([b"x"],), {"nic": True}, "nic"),
        (([b"x"],), {"nic": 1.0}, "nic"),
    ):
        with pytest.raises(InvalidArgument) as info:
            frames_call(vm, *args, **kwargs)
        assert info.value.thing == thing
        assert_typed(info.value)
    assert calls == []
    check()
    kernel.stop_vm(vm)
    with pytest.raises(IllegalTransition, match=verb):
        frames_call(vm, [b"x"])
    with pytest.raises(UnknownResource, match="ghost"):
        frames_call("ghost", [b"x"])
    assert calls == []


def test_disk_misuse(kernel: Kernel) -> None:
    a, b = kernel.create_vm("a"), kernel.create_vm("b")
    d = kernel.create_disk("d", 4096)
    with pytest.raises(IllegalTransition):
        kernel.detach_disk(a, d)  # not attached
    kernel.attach_disk(a, d)
    check = unchanged(kernel)
    with pytest.raises(IllegalTransition, match="attach"):
        kernel.attach_disk(b, d)  # attached elsewhere
    with pytest.raises(IllegalTransition, match="detach"):
        kernel.detach_disk(b, d)  # not attached to b
    with pytest.raises(UnknownResource):
        kernel.create_disk("e", 4096, base_image="no-such-image")
    kernel.register_image("img")
    check = unchanged(kernel)
    with pytest.raises(InvalidArgument, match="new image"):
        kernel.replace_image("img", "img")
    check()


def test_features_without_plugins_are_unavailable(kernel: Kernel) -> None:
    vm = kernel.create_vm("web")
    for call, hook in (
        (lambda: kernel.guest_memory(vm), "vmk_guest_memory"),
        (lambda: kernel.hypervisor_write(vm, 0, b"x"), "vmk_guest_memory"),
        (lambda: kernel.storage_unit(vm), "vmk_storage_unit"),
        (lambda: kernel.storage_units(), "vmk_storage_units"),
        (lambda: kernel.save_vm(vm), "vmk_storage_unit"),
        (lambda: kernel.restore_vm(vm.id), "vmk_storage_unit"),
        (lambda: kernel.identity(vm), "vmk_vm_identity"),
        (lambda: kernel.entropy(vm), "vmk_entropy_device"),
    ):
        with pytest.raises(FeatureUnavailable) as info:
            call()
        assert info.value.hook == hook
        assert hook in str(info.value)


def test_restore_from_something_that_is_not_a_unit(kernel: Kernel) -> None:
    with pytest.raises(InvalidArgument, match="unit"):
        kernel.restore_vm(42)


def test_restore_from_a_unit_with_a_broken_config(kernel: Kernel) -> None:
    class Unit:
        def read_config(self) -> dict[str, Any]:
            return {"id": "x", "name": "web"}  # no memory_mib

    with pytest.raises(InvalidArgument, match="saved VM config"):
        kernel.restore_vm(Unit())
    assert kernel.vms() == []


# --------------------------------------------------------------------------- a closed kernel


def test_closed_kernel_refuses_operations(tmp_path: Path) -> None:
    k = Kernel(data_dir=tmp_path / "k", autoload=False)
    vm = k.create_vm("web")
    k.add_host("h0")
    disk = k.create_disk("d", 4096)
    k.launch_vm(vm)
    k.close()
    check = unchanged(k)
    calls: list[Callable[[], Any]] = [
        lambda: k.create_vm("other"),
        lambda: k.stop_vm(vm),
        lambda: k.destroy_vm(vm, force=True),
        lambda: k.clock.advance(1),
        lambda: k.add_host("h1"),
        lambda: k.remove_host("h0"),
        lambda: k.add_principal("bob"),
        lambda: k.create_network("net"),
        lambda: k.add_link("l", "a", "b"),
        lambda: k.register_image("img"),
        lambda: k.create_disk("e", 4096),
        lambda: k.attach_disk(vm, disk),
        lambda: k.launch_container("h0", "app"),
        lambda: k.apply_config("host:h0", []),
        lambda: k.send_frames(vm, [b"x"]),
        lambda: k.deliver_frames(vm, [b"x"]),
    ]
    for call in calls:
        with pytest.raises(InvalidArgument, match="closed") as info:
            call()
        assert info.value.thing == "kernel"
    check()
    assert vm.state is VMState.RUNNING
    assert k.vm("web") is vm  # reading a closed kernel's registry is fine
