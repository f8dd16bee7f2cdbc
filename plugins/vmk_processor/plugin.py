"""The emulated processor as a kernel feature.

Design: one hypervisor-mode :class:`Processor` per kernel (in the stash) with
frame isolation on.  Launching a VM gives it the lowest free VM id and whole
2 MiB chunks of host memory that it owns: the first chunk holds its
second-stage tables and a two-page first-stage "hypervisor view" (an identity
map of guest-physical space with one 1 GiB page, reached at guest-physical
``memory_bytes``), the others back guest-physical ``[0, memory)`` through
2 MiB second-stage pages.  Scheduling (``vmk_tick`` round-robin, or
:meth:`ProcessorState.schedule`) writes the VM register from the hypervisor
domain and never flushes.  Guest memory reads and writes from scripts switch
to the VM and translate through both stages (isolation checked), so they see
exactly what the emulated hardware allows.

The guest-memory object is also a page store (``read_pages``,
``write_pages``, ``discard_pages``, ``pages``), so a memory encryption engine
keeps a confidential VM's pages in the memory the processor translates.  An
access of more than a few pages costs one ``translate_batch`` call and one
physical read or write per run of pages contiguous in host memory (a 2 MiB
chunk, or more when chunks are adjacent), never a call per page.  The plugin
remembers which pages hold data (``pages()``) so that checks over a VM's
memory need not scan all of it.  Destroy zeroes and frees the chunks and
drops the VM's TLB entries.  Host memory comes from
``kernel.config["processor.memory_mib"]`` (default 1024); the implementation
is the Rust one unless ``VMKERNEL_IMPL=reference``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import click
import numpy as np

from vmk_processor.tables import PAGE_SIZE, PageTables
from vmkernel import (
    VM,
    Access,
    Domain,
    Invariant,
    Kernel,
    ReportSection,
    StashKey,
    VMState,
    hookimpl,
    implementation,
)
from vmkernel.errors import FAULT_KINDS, CapacityError, InvalidArgument, TranslationFault

CHUNK = 2 << 20
DEFAULT_MEMORY_MIB = 1024
#: The hypervisor domain's entry point (where VM exits land).
HYPERVISOR_ENTRY = 0xFFFF_F000_0000_0000
#: Up to this many pages a scalar translation per page is cheaper than building a batch.
_SCALAR_PAGES = 4


def processor_class() -> Any:
    """``Processor`` of the implementation chosen by ``VMKERNEL_IMPL`` (``fast`` by default)."""
    return implementation().Processor


@dataclass
class VmMemory:
    """What the processor holds for one VM."""

    vm_id: int
    memory_bytes: int
    chunks: list[int]
    stage2_root: int
    view_root: int
    #: guest-physical pages that hold data (see GuestMemory.pages)
    written: set[int] = field(default_factory=set)


@dataclass
class ProcessorState:
    """Per-kernel processor state (``kernel.stash[PROCESSOR]``)."""

    cpu: Any
    free_chunks: list[int]
    vms: dict[str, VmMemory] = field(default_factory=dict)
    launching: set[str] = field(default_factory=set)
    switches: int = 0

    # -- memory ------------------------------------------------------------

    def ensure(self, kernel: Kernel, vm: VM) -> VmMemory:
        """The VM's memory, allocating and mapping it on first use."""
        mem = self.vms.get(vm.id)
        if mem is not None:
            return mem
        used = {m.vm_id for m in self.vms.values()}
        vm_id = next((i for i in range(1, self.cpu.max_vm_id + 1) if i not in used), None)
        size = vm.memory_mib << 20
        need = -(-size // CHUNK) + 1
        if vm_id is None or need > len(self.free_chunks):
            raise CapacityError(
                f"processor memory for vm {vm.name}",
                f"{need} chunks of 2 MiB and a VM id",
                f"{len(self.free_chunks)} free chunks and {self.cpu.max_vm_id - len(used)} free ids",
            )
        chunks = [self.free_chunks.pop(0) for _ in range(need)]
        for chunk in chunks:
            self.cpu.set_frame_owner(chunk, CHUNK, vm_id)
        meta = chunks[0]
        cursor = [meta]

        def alloc() -> int:
            page = cursor[0]
            cursor[0] += PAGE_SIZE
            return page

        write, read = self.cpu.write_phys, self._read_u64
        s2 = PageTables(write, read, alloc)
        for i, chunk in enumerate(chunks[1:]):
            s2.map(i * CHUNK, chunk, CHUNK)
        # The hypervisor view: first-stage tables in two pages of the metadata chunk,
        # mapped by stage 2 at guest-physical memory_bytes, identity-mapping [0, 1 GiB).
        view_gpa = -(-size // CHUNK) * CHUNK
        view_host = alloc()
        alloc()
        s2.map_pages(view_gpa, view_host, 2)
        view = PageTables(
            lambda gpa, data: write(view_host + gpa - view_gpa, data),
            lambda gpa: read(view_host + gpa - view_gpa),
            iter((view_gpa, view_gpa + PAGE_SIZE)).__next__,
        )
        view.map(0, 0, 1 << 30, perms=_hypervisor_rw())
        self.cpu.set_stage2_root(vm_id, s2.root)
        self.cpu.set_table_root(vm_id, Domain.HYPERVISOR, view.root)
        mem = VmMemory(vm_id, size, chunks, s2.root, view.root)
        self.vms[vm.id] = mem
        kernel.emit("processor.map", f"vm:{vm.id}", vm_id=vm_id, chunks=len(chunks), stage2_root=s2.root)
        return mem

    def _read_u64(self, addr: int) -> int:
        return int.from_bytes(self.cpu.read_phys(addr, 8), "little")

    def release(self, kernel: Kernel, vm_id_str: str, *, emit: bool = True) -> None:
        """Zeroes and frees a VM's frames and drops its TLB entries."""
        mem = self.vms.pop(vm_id_str, None)
        if mem is None:
            return
        if self.cpu.vm_register == mem.vm_id:
            self.cpu.write_vm_register(0)
        for chunk in mem.chunks:
            self.cpu.write_phys(chunk, bytes(CHUNK))
            self.cpu.set_frame_owner(chunk, CHUNK, 0)
        self.cpu.invalidate_vm(mem.vm_id)
        self.free_chunks = sorted(self.free_chunks + mem.chunks)
        if emit:
            kernel.emit("processor.unmap", f"vm:{vm_id_str}", vm_id=mem.vm_id, chunks=len(mem.chunks))

    # -- scheduling ----------------------------------------------------------

    def schedule(self, kernel: Kernel, vm: VM | str | None) -> int:
        """Runs ``vm`` (None: the host) by writing the VM register; no TLB flush."""
        vm_id = 0 if vm is None else self.ensure(kernel, kernel.vm(vm)).vm_id
        if self.cpu.vm_register != vm_id:
            self.cpu.write_vm_register(vm_id)
            self.switches += 1
        return vm_id


def _hypervisor_rw() -> int:
    return (1 << (52 + Access.READ)) | (1 << (52 + Access.WRITE))


class GuestMemory:
    """A VM's guest-physical memory as the host sees it: every access is
    translated by the processor (both stages, isolation checked).

    Byte access: :meth:`read`, :meth:`write`, :meth:`translate`.  Page access
    (the ``PageStore`` protocol of a memory encryption engine): whole 4 KiB
    pages at page-aligned guest-physical addresses, zeros for pages never
    written, :meth:`pages` lists the pages that hold data.
    """

    page_size = PAGE_SIZE

    def __init__(self, state: ProcessorState, kernel: Kernel, vm: VM) -> None:
        self._state = state
        self._kernel = kernel
        self._vm = vm
        self.size = vm.memory_mib << 20

    # -- translation -----------------------------------------------------------

    def _memory(self) -> VmMemory:
        """The VM's mapped memory (UnknownResource once the VM is destroyed)."""
        return self._state.ensure(self._kernel, self._kernel.vm(self._vm.id))

    def _host_runs(self, pages: Sequence[int], access: Access) -> list[tuple[int, int, int]]:
        """``(first index, page count, host address)`` per run of ``pages`` contiguous in host memory.

        One batch translation for all pages (as the VM, from the hypervisor
        domain); a fault is raised as the scalar call raises it.
        """
        if not len(pages):
            return []
        state = self._state
        cpu = state.cpu
        previous = cpu.vm_register
        state.schedule(self._kernel, self._vm)
        try:
            if len(pages) <= _SCALAR_PAGES:
                runs: list[tuple[int, int, int]] = []
                for i, page in enumerate(pages):
                    hpa = cpu.translate(page, access)
                    if runs and runs[-1][2] + runs[-1][1] * PAGE_SIZE == hpa:
                        runs[-1] = (runs[-1][0], runs[-1][1] + 1, runs[-1][2])
                    else:
                        runs.append((i, 1, hpa))
                return runs
            vaddrs = np.asarray(pages, dtype=np.uint64)
            hpas = np.empty_like(vaddrs)
            codes = cpu.translate_batch(vaddrs, access, hpas)
            if codes.count(0) != len(codes):
                bad = len(codes) - len(codes.lstrip(b"\x00"))
                cpu.translate(int(vaddrs[bad]), access)  # raises the typed fault
                raise TranslationFault(FAULT_KINDS[codes[bad]], 1, 0, int(vaddrs[bad]))
        finally:
            cpu.write_vm_register(previous)
        starts = [0, *(np.flatnonzero(np.diff(hpas) != PAGE_SIZE) + 1).tolist()]
        ends = [*starts[1:], len(hpas)]
        return [(a, b - a, int(hpas[a])) for a, b in zip(starts, ends, strict=True)]

    def _spans(self, gpa: int, n: int, access: Access) -> list[tuple[int, int]]:
        """``(host address, length)`` of each host-contiguous piece of ``[gpa, gpa + n)``."""
        if not isinstance(gpa, int) or not isinstance(n, int) or gpa < 0 or n < 0:
            raise InvalidArgument("gpa, n", (gpa, n), "non-negative integers")
        if gpa + n > self.size:
            raise InvalidArgument("gpa + n", gpa + n, f"at most {self.size} (the VM's memory size)")
        if n == 0:
            self._memory()
            return []
        first = gpa - gpa % PAGE_SIZE
        if gpa + n - first <= PAGE_SIZE:  # inside one page: one scalar translation
            return [(self._host_runs((first,), access)[0][2] + gpa - first, n)]
        pages = range(first, gpa + n, PAGE_SIZE)
        spans = []
        for index, count, hpa in self._host_runs(pages, access):
            lo = max(gpa, pages[index])
            hi = min(gpa + n, pages[index] + count * PAGE_SIZE)
            spans.append((hpa + lo - pages[index], hi - lo))
        return spans

    # -- bytes -------------------------------------------------------------------

    def read(self, gpa: int, n: int) -> bytes:
        """``n`` bytes at guest-physical ``gpa``."""
        cpu = self._state.cpu
        return b"".join([cpu.read_phys(hpa, take) for hpa, take in self._spans(gpa, n, Access.READ)])

    def write(self, gpa: int, data: bytes) -> None:
        """Writes ``data`` at guest-physical ``gpa``."""
        view = memoryview(bytes(data))
        spans = self._spans(gpa, len(view), Access.WRITE)
        done = 0
        for hpa, take in spans:
            self._state.cpu.write_phys(hpa, view[done : done + take])
            done += take
        if spans:
            self._note_bytes(gpa, view)

    def translate(self, gpa: int) -> int:
        """The host-physical address behind guest-physical ``gpa``."""
        return self._spans(gpa, 1, Access.READ)[0][0]

    # -- pages (the PageStore protocol) --------------------------------------------

    def _check_pages(self, gpas: Sequence[int]) -> list[int]:
        out = []
        for i, gpa in enumerate(gpas):
            if isinstance(gpa, bool) or not isinstance(gpa, int | np.integer):
                raise InvalidArgument(f"gpas[{i}]", gpa, "an int guest-physical page address")
            gpa = int(gpa)
            if gpa % PAGE_SIZE:
                raise InvalidArgument(
                    f"gpas[{i}]",
                    gpa,
                    f"a {PAGE_SIZE}-byte aligned guest-physical address ({gpa:#x} is "
                    f"{gpa % PAGE_SIZE:#x} bytes into its page)",
                )
            if not 0 <= gpa <= self.size - PAGE_SIZE:
                raise InvalidArgument(
                    f"gpas[{i}]",
                    gpa,
                    f"a page of vm {self._vm.name}'s {self.size >> 20} MiB of guest memory "
                    f"(an address in [0, {self.size:#x}); {gpa:#x} is outside it)",
                )
            out.append(gpa)
        return out

    def read_pages(self, gpas: Sequence[int]) -> bytes:
        """The stored bytes of each page, concatenated (zeros for a page never written)."""
        pages = self._check_pages(gpas)
        if not pages:
            self._memory()
            return b""
        cpu = self._state.cpu
        return b"".join(
            [cpu.read_phys(hpa, count * PAGE_SIZE) for _, count, hpa in self._host_runs(pages, Access.READ)]
        )

    def write_pages(self, gpas: Sequence[int], data: bytes | bytearray | memoryview) -> None:
        """Stores ``len(gpas)`` pages from ``data`` (``len(gpas) * 4096`` bytes)."""
        pages = self._check_pages(gpas)
        try:
            view = memoryview(data).cast("B")
        except TypeError:
            raise InvalidArgument("data", type(data).__name__, "a C-contiguous bytes-like object") from None
        if view.nbytes != len(pages) * PAGE_SIZE:
            raise InvalidArgument(
                "data length",
                view.nbytes,
                f"{len(pages)} pages of {PAGE_SIZE} bytes = {len(pages) * PAGE_SIZE}",
            )
        if not pages:
            self._memory()
            return
        cpu = self._state.cpu
        for index, count, hpa in self._host_runs(pages, Access.WRITE):
            cpu.write_phys(hpa, view[index * PAGE_SIZE : (index + count) * PAGE_SIZE])
        self._note_pages(pages, view)

    def discard_pages(self, gpas: Sequence[int]) -> None:
        """Forgets pages: they read as zeros again."""
        pages = self._check_pages(gpas)
        if not pages:
            return
        cpu = self._state.cpu
        for _, count, hpa in self._host_runs(pages, Access.WRITE):
            cpu.write_phys(hpa, bytes(count * PAGE_SIZE))
        self._memory().written.difference_update(pages)

    def pages(self) -> list[int]:
        """The pages that hold data: written since the memory was mapped and not
        discarded, except pages whose last whole-page write was all zeros."""
        return sorted(self._memory().written)

    def _note_pages(self, pages: Sequence[int], view: memoryview) -> None:
        rows = np.frombuffer(view, dtype=np.uint8).reshape(len(pages), PAGE_SIZE)
        nonzero: list[bool] = np.asarray(rows.any(axis=1)).tolist()
        written = self._state.vms[self._vm.id].written  # mapped: the write just went through
        for page, keep in zip(pages, nonzero, strict=True):  # in order: a repeated page's last write wins
            if keep:
                written.add(page)
            else:
                written.discard(page)

    def _note_bytes(self, gpa: int, view: memoryview) -> None:
        """Tracks a byte write: whole pages by their contents, a partial page when data went into it."""
        end = gpa + view.nbytes
        if view.nbytes < PAGE_SIZE and (end - 1) // PAGE_SIZE == gpa // PAGE_SIZE:  # the common small write
            if view.tobytes().count(0) != view.nbytes:
                self._state.vms[self._vm.id].written.add(gpa - gpa % PAGE_SIZE)
            return
        first_whole = gpa + -gpa % PAGE_SIZE
        last_whole = end - end % PAGE_SIZE
        if last_whole > first_whole:
            self._note_pages(
                range(first_whole, last_whole, PAGE_SIZE), view[first_whole - gpa : last_whole - gpa]
            )
        written = self._state.vms[self._vm.id].written
        # Each piece lies inside one page: before the first whole page, after the last one.
        for lo, hi in ((gpa, min(first_whole, end)), (max(last_whole, gpa), end)):
            if hi > lo and view[lo - gpa : hi - gpa].tobytes().count(0) != hi - lo:
                written.add(lo - lo % PAGE_SIZE)


PROCESSOR: StashKey[ProcessorState] = StashKey("processor")


def state_of(kernel: Kernel) -> ProcessorState:
    """The processor state of ``kernel``."""
    return kernel.stash[PROCESSOR]


@hookimpl
def vmk_configure(kernel: Kernel) -> None:
    mib = kernel.config.get("processor.memory_mib", DEFAULT_MEMORY_MIB)
    if not isinstance(mib, int) or mib < 4 or mib > 4096 or mib % 2:
        raise InvalidArgument("processor.memory_mib", mib, "an even number of MiB in [4, 4096]")
    cpu = processor_class()(mib << 20, True, isolation=True)
    cpu.set_entry_points(Domain.HYPERVISOR, [HYPERVISOR_ENTRY])
    # Chunk 0 stays with the host (its own tables and scratch space).
    kernel.stash[PROCESSOR] = ProcessorState(cpu, list(range(CHUNK, mib << 20, CHUNK)))


# First: a VM's memory exists before any other plugin's launch loads pages into it (a
# confidential launch encrypts its image there), and an allocation made by this launch is
# released by the rollback of a launch another plugin vetoes.
@hookimpl(tryfirst=True)
def vmk_vm_launch(kernel: Kernel, vm: VM) -> None:
    state = state_of(kernel)
    if vm.id not in state.vms:
        state.launching.add(vm.id)
    state.ensure(kernel, vm)


# Last: the frames are zeroed only once every plugin that might veto the destroy has
# run, so a vetoed destroy leaves the VM its memory (a confidential VM its ciphertext).
@hookimpl(trylast=True)
def vmk_vm_destroy(kernel: Kernel, vm: VM) -> None:
    state_of(kernel).release(kernel, vm.id)


@hookimpl
def vmk_rollback(kernel: Kernel, operation: str, subject: str, error: BaseException) -> None:
    state = kernel.stash.get(PROCESSOR, None)
    if state is None:
        return
    vm_id = subject.removeprefix("vm:")
    if operation == "vm.launch" and vm_id in state.launching:
        state.release(kernel, vm_id, emit=False)
    state.launching.discard(vm_id)
    if operation == "vm.destroy" and vm_id not in state.vms:
        pass  # frames already zeroed; the VM gets fresh memory on its next use


@hookimpl
def vmk_tick(kernel: Kernel, now_ns: int) -> None:
    """Round-robin: each tick runs the next running VM (by VM id)."""
    state = kernel.stash.get(PROCESSOR, None)
    if state is None:
        return
    state.launching.clear()
    running = sorted(m.vm_id for vid, m in state.vms.items() if _state_of_vm(kernel, vid) is VMState.RUNNING)
    if not running:
        return
    current = state.cpu.vm_register
    nxt = next((v for v in running if v > current), running[0])
    if nxt != current:
        state.cpu.write_vm_register(nxt)
        state.switches += 1


def _state_of_vm(kernel: Kernel, vm_id: str) -> VMState | None:
    try:
        return kernel.vm(vm_id).state
    except LookupError:
        return None


@hookimpl
def vmk_guest_memory(kernel: Kernel, vm: VM) -> GuestMemory:
    state = state_of(kernel)
    state.ensure(kernel, vm)
    return GuestMemory(state, kernel, vm)


@hookimpl
def vmk_invariants(kernel: Kernel) -> list[Invariant]:
    state = kernel.stash.get(PROCESSOR, None)
    if state is None:
        return []

    def isolation() -> str | None:
        for vid, mem in sorted(state.vms.items(), key=lambda kv: kv[1].vm_id):
            bad = state.cpu.isolation_violation(mem.vm_id)
            if bad is not None:
                return f"vm {vid} (VM id {mem.vm_id}) reaches host frame {bad:#x} it does not own"
        owned = [c for m in state.vms.values() for c in m.chunks]
        if len(owned) != len(set(owned)) or set(owned) & set(state.free_chunks):
            return "a 2 MiB chunk is owned twice or owned while free"
        return None

    def registered() -> str | None:
        known = {vm.id for vm in kernel.vms()}
        stray = sorted(set(state.vms) - known)
        return f"memory still mapped for destroyed vms {stray}" if stray else None

    return [Invariant("processor.isolation", isolation), Invariant("processor.no-stray-vms", registered)]


@hookimpl
def vmk_report(kernel: Kernel) -> ReportSection | None:
    state = kernel.stash.get(PROCESSOR, None)
    if state is None:
        return None
    cpu = state.cpu
    stats = cpu.stats()
    lines = [
        f"host memory {cpu.memory_bytes >> 20} MiB, {len(state.free_chunks)} free 2 MiB chunks",
        f"VM register {cpu.vm_register}, domain {Domain(cpu.domain).name.lower()}, "
        f"{state.switches} VM switches",
        "TLB: " + ", ".join(f"{k} {v}" for k, v in stats.items()),
    ]
    for vid, mem in sorted(state.vms.items(), key=lambda kv: kv[1].vm_id):
        lines.append(
            f"vm {vid}: VM id {mem.vm_id}, {mem.memory_bytes >> 20} MiB, stage-2 root {mem.stage2_root:#x}"
        )
    return ReportSection("processor", lines)


@hookimpl
def vmk_demo(kernel: Kernel, demo: Any) -> None:
    state = state_of(kernel)
    vms = [vm for vm in kernel.vms() if vm.state is VMState.RUNNING] or kernel.vms()
    if not vms:
        demo.step("processor: no VMs to map")
        return
    for vm in vms[:3]:
        mem = kernel.guest_memory(vm)
        text = f"hello from {vm.name}".encode()
        mem.write(0x1000, text)
        demo.step(
            f"processor: {vm.name} is VM id {state.vms[vm.id].vm_id}; wrote {text!r} at gpa 0x1000 "
            f"-> host {mem.translate(0x1000):#x}"
        )
    before = state.cpu.stats()
    for vm in vms[:3]:
        assert kernel.guest_memory(vm).read(0x1000, 5) == b"hello"
    after = state.cpu.stats()
    demo.step("processor: read back every VM's page after VM switches without a TLB flush")
    demo.record("processor.tlb_hits_after_switches", after["tlb_hits"] - before["tlb_hits"])
    demo.record("processor.vm_switches", state.switches)
    bad = [inv.name for inv in vmk_invariants(kernel) if inv.check() is not None]
    demo.record("processor.invariants_violated", bad)


@hookimpl
def vmk_cli_commands(group: click.Group) -> None:
    @group.group("processor")
    def processor() -> None:
        """The emulated processor (VM register, two-stage translation)."""

    @processor.command("selftest")
    @click.option("--vms", default=2, show_default=True, help="VMs to map and switch between.")
    def selftest(vms: int) -> None:
        """Map a few VMs, write and read their memory through translation, print the counters."""
        with Kernel(
            seed=0,
            plugins=[sys.modules[__name__]],
            autoload=False,
            config={"processor.memory_mib": 64},
        ) as kernel:
            for i in range(vms):
                vm = kernel.create_vm(f"vm{i}", memory_mib=4)
                kernel.launch_vm(vm)
                kernel.guest_memory(vm).write(0x10, f"vm{i}".encode())
            for vm in kernel.vms():
                click.echo(f"{vm.name}: {kernel.guest_memory(vm).read(0x10, 3)!r}")
            for section in kernel.report():
                if section.title == "processor":
                    click.echo("\n".join(section.lines))
