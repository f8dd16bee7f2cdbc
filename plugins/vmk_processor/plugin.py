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
exactly what the emulated hardware allows.  Destroy zeroes and frees the
chunks and drops the VM's TLB entries.  Host memory comes from
``kernel.config["processor.memory_mib"]`` (default 1024); the implementation
is the Rust one unless ``VMKERNEL_IMPL=reference``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import click

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
from vmkernel.errors import CapacityError, InvalidArgument

CHUNK = 2 << 20
DEFAULT_MEMORY_MIB = 1024
#: The hypervisor domain's entry point (where VM exits land).
HYPERVISOR_ENTRY = 0xFFFF_F000_0000_0000


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
    """A VM's guest-physical memory as scripts see it: every access is
    translated by the processor (both stages, isolation checked)."""

    def __init__(self, state: ProcessorState, kernel: Kernel, vm: VM) -> None:
        self._state = state
        self._kernel = kernel
        self._vm = vm
        self.size = vm.memory_mib << 20

    def _spans(self, gpa: int, n: int, access: Access) -> list[tuple[int, int]]:
        if not isinstance(gpa, int) or not isinstance(n, int) or gpa < 0 or n < 0:
            raise InvalidArgument("gpa, n", (gpa, n), "non-negative integers")
        if gpa + n > self.size:
            raise InvalidArgument("gpa + n", gpa + n, f"at most {self.size} (the VM's memory size)")
        state = self._state
        cpu = state.cpu
        previous = cpu.vm_register
        state.schedule(self._kernel, self._vm)
        try:
            spans = []
            at = gpa
            while at < gpa + n:
                take = min(PAGE_SIZE - at % PAGE_SIZE, gpa + n - at)
                spans.append((cpu.translate(at, access), take))
                at += take
        finally:
            cpu.write_vm_register(previous)
        return spans

    def read(self, gpa: int, n: int) -> bytes:
        """``n`` bytes at guest-physical ``gpa``."""
        cpu = self._state.cpu
        return b"".join(cpu.read_phys(hpa, take) for hpa, take in self._spans(gpa, n, Access.READ))

    def write(self, gpa: int, data: bytes) -> None:
        """Writes ``data`` at guest-physical ``gpa``."""
        view = memoryview(bytes(data))
        done = 0
        for hpa, take in self._spans(gpa, len(view), Access.WRITE):
            self._state.cpu.write_phys(hpa, view[done : done + take])
            done += take

    def translate(self, gpa: int) -> int:
        """The host-physical address behind guest-physical ``gpa``."""
        return self._spans(gpa, 1, Access.READ)[0][0]


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


@hookimpl
def vmk_vm_launch(kernel: Kernel, vm: VM) -> None:
    state = state_of(kernel)
    if vm.id not in state.vms:
        state.launching.add(vm.id)
    state.ensure(kernel, vm)


@hookimpl
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
