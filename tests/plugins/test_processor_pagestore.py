"""The processor plugin's guest memory as a page store: whole pages through translation, in batches,
zeros for pages never written, the written pages tracked, typed errors, and the hook order that lets
another plugin load pages at launch.  Runs on both processor implementations."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import vmk_processor.plugin as processor_plugin
from vmk_confidential.memory import PageStore
from vmk_processor.plugin import PROCESSOR

from vmkernel import Kernel, hookimpl
from vmkernel.errors import HookFailed, InvalidArgument, UnknownResource

PAGE = 4096
MIB = 1 << 20


@pytest.fixture(params=["fast", "reference"])
def kernel(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[Kernel]:
    monkeypatch.setenv("VMKERNEL_IMPL", request.param)
    with Kernel(
        plugins=[processor_plugin], autoload=False, data_dir=tmp_path, config={"processor.memory_mib": 32}
    ) as k:
        yield k


class CountingCpu:
    """Wraps the kernel's processor and counts the calls the guest memory makes."""

    def __init__(self, cpu: Any) -> None:
        self._cpu = cpu
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._cpu, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return attr(*args, **kwargs)

        return counted


def test_guest_memory_is_a_page_store_and_round_trips(kernel: Kernel) -> None:
    vm = kernel.create_vm("a", memory_mib=8)
    kernel.launch_vm(vm)
    mem = kernel.guest_memory(vm)
    assert isinstance(mem, PageStore)
    gpas = [0x5000, 0x1000, 0x7F_F000, 0x3000]
    data = os.urandom(len(gpas) * PAGE)
    mem.write_pages(gpas, data)
    assert mem.read_pages(gpas) == data
    assert mem.read_pages(gpas[::-1]) == b"".join(data[i * PAGE : (i + 1) * PAGE] for i in (3, 2, 1, 0))
    for i, gpa in enumerate(gpas):  # the byte view and the host's physical memory agree with the page view
        assert mem.read(gpa, PAGE) == data[i * PAGE : (i + 1) * PAGE]
        assert (
            kernel.stash[PROCESSOR].cpu.read_phys(mem.translate(gpa), PAGE) == data[i * PAGE : (i + 1) * PAGE]
        )
    assert mem.read_pages([0x2000, 0]) == bytes(2 * PAGE)  # never written: zeros
    assert mem.pages() == sorted(gpas)
    assert mem.read_pages([]) == b""


def test_pages_tracks_written_discarded_and_zeroed_pages(kernel: Kernel) -> None:
    vm = kernel.create_vm("a", memory_mib=4)
    kernel.launch_vm(vm)
    mem = kernel.guest_memory(vm)
    mem.write_pages([0x1000, 0x2000, 0x3000], b"\x01" * 3 * PAGE)
    mem.discard_pages([0x2000])
    assert mem.pages() == [0x1000, 0x3000]
    assert mem.read_pages([0x2000]) == bytes(PAGE)
    mem.write_pages([0x3000], bytes(PAGE))  # rewritten with zeros: holds no data any more
    assert mem.pages() == [0x1000]
    mem.write(0x4FFE, b"\x00\x00\x07")  # a byte write: only the page that got a non-zero byte
    assert mem.pages() == [0x1000, 0x5000]
    mem.write(0x1000, bytes(PAGE + 10))  # covers page 0x1000 whole with zeros, 10 zero bytes of 0x2000
    assert mem.pages() == [0x5000]
    mem.write_pages([0x6000, 0x6000], b"\x02" * PAGE + bytes(PAGE))  # a repeated page: the last write wins
    assert mem.read_pages([0x6000]) == bytes(PAGE) and mem.pages() == [0x5000]
    mem.write(0x7000, b"\x03" * 5 * PAGE)
    assert mem.pages() == [0x5000, *range(0x7000, 0xC000, PAGE)]


def test_a_batch_is_one_translation_and_one_access_per_host_run(kernel: Kernel) -> None:
    vm = kernel.create_vm("a", memory_mib=8)
    kernel.launch_vm(vm)
    mem = kernel.guest_memory(vm)
    state = kernel.stash[PROCESSOR]
    counting = CountingCpu(state.cpu)
    state.cpu = counting
    try:
        # 1 MiB of consecutive pages, then two separate ranges of 64 pages in one batch.
        inside = list(range(0x10_0000, 0x20_0000, PAGE))
        data = os.urandom(len(inside) * PAGE)
        mem.write_pages(inside, data)
        assert counting.calls.get("translate_batch") == 1 and counting.calls.get("write_phys") == 1
        assert "translate" not in counting.calls
        counting.calls.clear()
        two = inside[:64] + inside[128:192]
        assert mem.read_pages(two) == data[: 64 * PAGE] + data[128 * PAGE : 192 * PAGE]
        assert counting.calls.get("translate_batch") == 1 and counting.calls.get("read_phys") == 2
        counting.calls.clear()
        assert mem.read(0x10_0000, len(data)) == data  # byte reads are batched the same way
        assert counting.calls.get("translate_batch") == 1 and counting.calls.get("read_phys") == 1
    finally:
        state.cpu = counting._cpu


@pytest.mark.parametrize(
    ("gpas", "data", "thing", "says"),
    [
        ([0x1001], None, "gpas[0]", "0x1001 is 0x1 bytes into its page"),
        ([0, 4 * MIB], None, "gpas[1]", "0x400000 is outside it"),
        ([-PAGE], None, "gpas[0]", "an address in [0, 0x400000)"),
        ([True], None, "gpas[0]", "an int guest-physical page address"),
        ([0x1000], b"short", "data length", "1 pages of 4096 bytes"),
    ],
)
def test_bad_pages_are_named(
    kernel: Kernel, gpas: list[Any], data: bytes | None, thing: str, says: str
) -> None:
    vm = kernel.create_vm("a", memory_mib=4)
    kernel.launch_vm(vm)
    mem = kernel.guest_memory(vm)
    calls = [lambda: mem.write_pages(gpas, data if data is not None else bytes(len(gpas) * PAGE))]
    if data is None:
        calls += [lambda: mem.read_pages(gpas), lambda: mem.discard_pages(gpas)]
    for call in calls:
        with pytest.raises(InvalidArgument) as info:
            call()
        assert info.value.thing == thing and says in str(info.value)
    assert mem.pages() == []


def test_memory_of_a_destroyed_vm_is_gone(kernel: Kernel) -> None:
    vm = kernel.create_vm("a", memory_mib=4)
    kernel.launch_vm(vm)
    mem = kernel.guest_memory(vm)
    mem.write_pages([0], b"\x05" * PAGE)
    kernel.destroy_vm(vm, force=True)
    with pytest.raises(UnknownResource):
        mem.read_pages([0])
    with pytest.raises(UnknownResource):
        mem.pages()
    assert vm.id not in kernel.stash[PROCESSOR].vms  # asking did not map it again


class LoadsAtLaunch:
    """Writes pages into guest memory in its own launch hook, and vetoes some launches afterwards."""

    def __init__(self) -> None:
        self.mapped_by_launch: list[bool] = []

    @hookimpl
    def vmk_vm_launch(self, kernel: Kernel, vm: Any) -> None:
        state = kernel.stash[PROCESSOR]
        self.mapped_by_launch.append(vm.id in state.launching)
        kernel.guest_memory(vm).write_pages([0], b"\x09" * PAGE)
        if vm.name.startswith("vetoed"):
            raise RuntimeError("refused after loading pages")


class VetoesDestroy:
    @hookimpl
    def vmk_vm_destroy(self, kernel: Kernel, vm: Any) -> None:
        raise RuntimeError("keep it")


@pytest.mark.parametrize("order", ["processor first", "processor last"])
def test_memory_is_mapped_before_other_launch_hooks_and_released_on_veto(tmp_path: Path, order: str) -> None:
    loader = LoadsAtLaunch()
    plugins = [processor_plugin, loader] if order == "processor first" else [loader, processor_plugin]
    with Kernel(plugins=plugins, autoload=False, data_dir=tmp_path, config={"processor.memory_mib": 16}) as k:
        state = k.stash[PROCESSOR]
        free = len(state.free_chunks)
        with pytest.raises(HookFailed):
            k.launch_vm(k.create_vm("vetoed", memory_mib=2))
        assert loader.mapped_by_launch == [True]  # the processor's launch had run and owned the mapping
        assert not state.vms and len(state.free_chunks) == free
        ok = k.create_vm("ok", memory_mib=2)
        k.launch_vm(ok)
        assert k.guest_memory(ok).read_pages([0]) == b"\x09" * PAGE
        assert k.check_invariants() is None


@pytest.mark.parametrize("order", ["processor first", "processor last"])
def test_a_vetoed_destroy_keeps_the_memory(tmp_path: Path, order: str) -> None:
    veto = VetoesDestroy()
    plugins = [processor_plugin, veto] if order == "processor first" else [veto, processor_plugin]
    with Kernel(plugins=plugins, autoload=False, data_dir=tmp_path, config={"processor.memory_mib": 16}) as k:
        vm = k.create_vm("kept", memory_mib=2)
        k.launch_vm(vm)
        k.guest_memory(vm).write_pages([0x1000], b"\x0a" * PAGE)
        k.stop_vm(vm)
        with pytest.raises(HookFailed):
            k.destroy_vm(vm)
        assert k.guest_memory(vm).read_pages([0x1000]) == b"\x0a" * PAGE
        assert k.guest_memory(vm).pages() == [0x1000]
