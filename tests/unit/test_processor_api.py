"""The processor API on both implementations: the contract, registers, domains,
TLB behaviour, buffers and every bad input of the spec (a typed error, the
same one from both implementations)."""

from __future__ import annotations

import array
import threading
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from vmk_processor.tables import ALL_RWX, PageTables, perm_bits, phys_io
from vmk_processor.testing import outcome

from vmkernel import Access, Domain, fast, reference
from vmkernel.errors import (
    FAULT_KINDS,
    BufferLayoutError,
    DomainEntryFault,
    InvalidArgument,
    RegisterAccessFault,
    TranslationFault,
)

IMPLS = pytest.mark.parametrize("impl", [fast, reference], ids=["fast", "reference"])
MiB = 1 << 20


def host_cpu(impl: ModuleType, memory: int = 8 * MiB, **kw: Any) -> tuple[Any, PageTables]:
    cpu = impl.Processor(memory_bytes=memory, hypervisor=False, **kw)
    nxt = [memory]

    def alloc() -> int:
        nxt[0] -= 4096
        return nxt[0]

    tables = PageTables(*phys_io(cpu), alloc)
    cpu.set_table_root(0, Domain.HYPERVISOR, tables.root)
    return cpu, tables


def guest_cpu(impl: ModuleType, **kw: Any) -> tuple[Any, PageTables, PageTables]:
    """VM 1: stage 2 maps gpa [0, 4 MiB) to hpa [4 MiB, 8 MiB) with 2 MiB pages;
    its first stage lives at gpa 1 MiB."""
    cpu = impl.Processor(memory_bytes=8 * MiB, hypervisor=True, **kw)
    write, read = phys_io(cpu)
    nxt = [8 * MiB]

    def alloc() -> int:
        nxt[0] -= 4096
        return nxt[0]

    s2 = PageTables(write, read, alloc)
    s2.map(0, 4 * MiB, 2 * MiB)
    s2.map(2 * MiB, 6 * MiB, 2 * MiB)
    cpu.set_stage2_root(1, s2.root)
    g = [MiB]

    def galloc() -> int:
        g[0] += 4096
        return g[0]

    s1 = PageTables(lambda a, d: write(4 * MiB + a, d), lambda a: read(4 * MiB + a), galloc)
    cpu.set_table_root(1, Domain.HYPERVISOR, s1.root)
    return cpu, s1, s2


@IMPLS
def test_contract(impl: ModuleType) -> None:
    cpu = impl.Processor(memory_bytes=64 << 20, hypervisor=False)
    cpu.write_phys(0x1234, b"hello")
    assert cpu.read_phys(0x1234, 5) == b"hello"
    assert cpu.vm_register == 0
    assert cpu.domain == Domain.HYPERVISOR
    tables = PageTables(*phys_io(cpu), iter(range(0x10000, 0x100000, 4096)).__next__)
    tables.map(0x7000_0000_0000, 0x20_0000)
    cpu.set_table_root(0, Domain.HYPERVISOR, tables.root)
    assert cpu.translate(0x7000_0000_0123, Access.READ) == 0x20_0123
    vaddrs = np.array([0x7000_0000_0008, 0x1000], dtype=np.uint64)
    out = np.zeros(2, dtype=np.uint64)
    codes = cpu.translate_batch(vaddrs, Access.READ, out)
    assert list(codes) == [0, FAULT_KINDS.index("not-present")]
    assert out.tolist() == [0x20_0008, 0]
    with pytest.raises(TranslationFault) as info:
        cpu.translate(0x1000, Access.READ)
    assert (info.value.kind, info.value.stage, info.value.level, info.value.address) == (
        "not-present",
        1,
        4,
        0x1000,
    )


@IMPLS
def test_huge_pages_and_tlb_counters(impl: ModuleType) -> None:
    cpu, tables = host_cpu(impl)
    tables.map(1 << 30, 0, 1 << 30)  # 1 GiB page over all 8 MiB
    tables.map(0x4000_0000_0000, 2 * MiB, 2 * MiB)
    assert cpu.translate((1 << 30) + 0x12345, Access.WRITE) == 0x12345
    assert cpu.translate(0x4000_0000_0000 + 0x1FFFFF, Access.READ) == 4 * MiB - 1
    assert cpu.translate(0x4000_0000_0000 + 0x100, Access.EXECUTE) == 2 * MiB + 0x100
    stats = cpu.stats()
    assert (stats["tlb_misses"], stats["tlb_hits"]) == (2, 1)
    with pytest.raises(TranslationFault) as info:  # inside the 1 GiB page, past memory
        cpu.translate((1 << 30) + 9 * MiB, Access.READ)
    assert (info.value.kind, info.value.level) == ("out-of-memory-range", 3)


@IMPLS
def test_guest_walk_goes_through_stage2(impl: ModuleType) -> None:
    cpu, s1, _ = guest_cpu(impl)
    s1.map(0x5000, 0x30_0000)
    cpu.write_vm_register(1)
    assert cpu.translate(0x5ABC, Access.READ) == 4 * MiB + 0x30_0ABC
    assert cpu.stats()["table_reads"] == 4 * (3 + 1) + 3  # 4 x (3 stage-2 reads + 1) + 3 for the data
    cpu.write_vm_register(0)  # host has no tables: different result, no flush
    with pytest.raises(TranslationFault):
        cpu.translate(0x5ABC, Access.READ)
    cpu.write_vm_register(1)
    assert cpu.translate(0x5ABD, Access.READ) == 4 * MiB + 0x30_0ABD
    assert cpu.stats()["tlb_hits"] == 1


@IMPLS
def test_stage2_fault_names_stage_level_and_gpa(impl: ModuleType) -> None:
    cpu, s1, _ = guest_cpu(impl)
    s1.map(0x5000, 0x50_0000)  # gpa 5 MiB: not mapped by stage 2
    cpu.write_vm_register(1)
    with pytest.raises(TranslationFault) as info:
        cpu.translate(0x5000, Access.READ)
    f = info.value
    assert (f.kind, f.stage, f.level, f.address, f.gpa, f.code) == ("not-present", 2, 2, 0x5000, 0x50_0000, 1)


@IMPLS
def test_permissions_registers_and_domains(impl: ModuleType) -> None:
    cpu, tables = host_cpu(impl)
    tables.map(
        0x5000,
        0x9000,
        perms=perm_bits(Domain.HYPERVISOR, Access.READ, Access.WRITE) | perm_bits(Domain.OS, Access.READ),
    )
    cpu.set_table_root(0, Domain.OS, tables.root)
    cpu.set_entry_points(Domain.OS, [0xFFFF_8000_0000_0000])
    cpu.set_entry_points(Domain.HYPERVISOR, [0xFFFF_F000_0000_0000])
    assert cpu.translate(0x5000, Access.WRITE) == 0x9000
    with pytest.raises(DomainEntryFault):
        cpu.enter_domain(Domain.OS, 0x1234)
    assert cpu.domain == Domain.HYPERVISOR
    cpu.enter_domain(Domain.OS, 0xFFFF_8000_0000_0000)
    assert cpu.domain == Domain.OS
    assert cpu.translate(0x5000, Access.READ) == 0x9000
    with pytest.raises(TranslationFault) as info:
        cpu.translate(0x5000, Access.WRITE)
    assert (info.value.kind, info.value.level) == ("permission", 1)
    with pytest.raises(RegisterAccessFault):
        cpu.write_vm_register(3)
    assert cpu.vm_register == 0
    assert cpu.read_register("vmr") == 0
    with pytest.raises(RegisterAccessFault):
        cpu.read_register("stage2_root")
    with pytest.raises(RegisterAccessFault):
        cpu.set_entry_points(Domain.OS, [])
    cpu.enter_domain(Domain.HYPERVISOR, 0xFFFF_F000_0000_0000)
    cpu.set_register_permission("stage2_root", Domain.OS, True, False)
    assert cpu.register_permission("stage2_root", Domain.OS) == (True, False)
    assert cpu.register_permission("vmr", Domain.HYPERVISOR) == (True, True)


@IMPLS
def test_invalidation_scopes(impl: ModuleType) -> None:
    cpu, s1, s2 = guest_cpu(impl)
    leaf = s1.map(0x5000, 0x30_0000)
    cpu.write_vm_register(1)
    assert cpu.translate(0x5000, Access.READ) == 0x70_0000
    write, _ = phys_io(cpu)
    write(4 * MiB + leaf, (0x30_1000 | ALL_RWX | 1).to_bytes(8, "little"))
    assert cpu.translate(0x5000, Access.READ) == 0x70_0000  # stale until invalidated
    cpu.invalidate_vm(2)
    assert cpu.translate(0x5000, Access.READ) == 0x70_0000
    cpu.invalidate_page(1, 0x5FFF)
    assert cpu.translate(0x5000, Access.READ) == 0x70_1000
    # Move guest-physical [2 MiB, 4 MiB) to host 2 MiB: drops entries built from it.
    s2.map(2 * MiB, 2 * MiB, 2 * MiB)
    assert cpu.translate(0x5000, Access.READ) == 0x70_1000
    cpu.invalidate_gpa(1, 0x30_1000)
    assert cpu.translate(0x5000, Access.READ) == 0x30_1000
    cpu.invalidate_all()
    assert cpu.translate(0x5000, Access.READ) == cpu.walk(0x5000, Access.READ)


@IMPLS
def test_ownership_changes_drop_only_the_entries_they_must(impl: ModuleType) -> None:
    cpu, s1, _ = guest_cpu(impl, isolation=True)
    s1.map(0x5000, 0x30_0000)  # gpa 3 MiB -> hpa 7 MiB
    cpu.set_frame_owner(4 * MiB, 4 * MiB, 1)  # VM 1 owns its memory, tables included
    cpu.write_vm_register(1)
    assert cpu.translate(0x5000, Access.READ) == 0x70_0000
    cpu.reset_stats()
    cpu.set_frame_owner(0x1000, 0x1000, 2)  # frames VM 1 never used, from the host to VM 2
    assert cpu.translate(0x5000, Access.READ) == 0x70_0000
    assert cpu.stats()["tlb_hits"] == 1  # VM 1's entry stayed cached
    cpu.grant_frames(2, 7 * MiB, 0x1000)  # widening VM 2's access drops nothing either
    assert cpu.translate(0x5000, Access.READ) == 0x70_0000 and cpu.stats()["tlb_hits"] == 2
    cpu.set_frame_owner(7 * MiB, 0x1000, 2)  # VM 1 loses the frame its entry points at
    res = outcome(cpu.translate, 0x5000, Access.READ)
    assert res[2]["kind"] == "isolation"  # dropped, walked again, refused
    cpu.grant_frames(1, 7 * MiB, 0x1000)
    assert cpu.translate(0x5000, Access.READ) == 0x70_0000
    cpu.revoke_frames(1, 7 * MiB, 0x1000)
    assert outcome(cpu.translate, 0x5000, Access.READ)[2]["kind"] == "isolation"


@IMPLS
def test_batch_buffers(impl: ModuleType) -> None:
    cpu, tables = host_cpu(impl)
    tables.map(0x5000, 0x9000)
    addrs = [0x5000, 0x5008, 0x6000, 1 << 63]
    want = [0x9000, 0x9008, 0, 0]
    codes_want = [0, 0, FAULT_KINDS.index("not-present"), FAULT_KINDS.index("non-canonical")]
    inputs: list[tuple[Any, Any]] = [
        (array.array("Q", addrs), array.array("Q", [0] * 4)),
        (np.array(addrs, dtype=np.uint64), np.zeros(4, dtype=np.uint64)),
        (array.array("Q", addrs).tobytes(), bytearray(32)),
        (memoryview(array.array("Q", addrs)), memoryview(bytearray(32))),
        (memoryview(b"\0" + array.array("Q", addrs).tobytes())[1:], memoryview(bytearray(33))[1:]),
    ]
    for src, out in inputs:
        codes = cpu.translate_batch(src, Access.READ, out)
        assert isinstance(codes, bytearray)
        assert list(codes) == codes_want
        assert np.frombuffer(bytes(out), dtype=np.uint64).tolist() == want
    inplace = array.array("Q", addrs)  # out may be the input buffer itself
    cpu.translate_batch(inplace, Access.READ, inplace)
    assert list(inplace) == want
    assert list(cpu.translate_batch(array.array("Q"), Access.READ, array.array("Q"))) == []


def test_batch_releases_the_gil() -> None:
    cpu, tables = host_cpu(fast)
    tables.map(0x5000, 0x9000)
    src = np.full(1 << 20, 0x5000, dtype=np.uint64)
    out = np.zeros_like(src)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(3):
                cpu.translate_batch(src, Access.READ, out)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        assert cpu.translate(0x5000, Access.READ) == 0x9000  # other threads still get the lock
    for t in threads:
        t.join()
    assert not errors
    assert int(out[-1]) == 0x9000


def _bad_inputs() -> list[tuple[str, Any, type[BaseException], str]]:
    """(name, call(cpu), error type, thing/kind) for every bad input of the spec."""
    return [
        ("non-canonical", lambda c: c.translate(1 << 47, 0), TranslationFault, "non-canonical"),
        (
            "non-canonical-high",
            lambda c: c.translate(0x8000_0000_0000_0000, 0),
            TranslationFault,
            "non-canonical",
        ),
        ("max-u64", lambda c: c.translate(2**64 - 1, 0), TranslationFault, "not-present"),
        ("too-big", lambda c: c.translate(2**64, 0), InvalidArgument, "vaddr"),
        ("negative", lambda c: c.translate(-1, 0), InvalidArgument, "vaddr"),
        ("not-int", lambda c: c.translate(1.5, 0), InvalidArgument, "vaddr"),
        ("8-bytes-at-fff", lambda c: c.translate(0x5FFF, 0, 8), TranslationFault, "page-crossing"),
        ("8-bytes-at-max", lambda c: c.translate(2**64 - 1, 0, 8), TranslationFault, "page-crossing"),
        ("bad-size", lambda c: c.translate(0x5000, 0, 3), InvalidArgument, "size"),
        ("bad-access", lambda c: c.translate(0x5000, 3), InvalidArgument, "access"),
        ("read-wraps", lambda c: c.read_phys(2**64 - 1, 2), InvalidArgument, "addr + n"),
        ("read-past-end", lambda c: c.read_phys(8 * MiB - 1, 2), InvalidArgument, "addr + n"),
        ("write-wraps", lambda c: c.write_phys(2**64 - 1, b"ab"), InvalidArgument, "addr + len(data)"),
        ("write-not-bytes", lambda c: c.write_phys(0, 5), InvalidArgument, "data"),
        ("vm-zero-stage2", lambda c: c.set_stage2_root(0, 0), InvalidArgument, "vm"),
        ("vm-above-max", lambda c: c.write_vm_register(4096), InvalidArgument, "vm"),
        ("vm-negative", lambda c: c.write_vm_register(-1), InvalidArgument, "vm"),
        ("vm-zero-gpa", lambda c: c.invalidate_gpa(0, 0), InvalidArgument, "vm"),
        ("unknown-domain", lambda c: c.set_table_root(0, 3, 0), InvalidArgument, "domain"),
        ("unknown-domain-enter", lambda c: c.enter_domain(7, 0), InvalidArgument, "domain"),
        ("misaligned-root", lambda c: c.set_table_root(0, 0, 0x1001), InvalidArgument, "addr"),
        ("root-past-end", lambda c: c.set_table_root(0, 0, 8 * MiB), InvalidArgument, "addr"),
        ("gpa-wraps", lambda c: c.invalidate_gpa(1, 2**64 - 1, 2), InvalidArgument, "gpa + length"),
        ("noncanonical-invlpg", lambda c: c.invalidate_page(0, 1 << 47), InvalidArgument, "vaddr"),
        (
            "batch-len-7",
            lambda c: c.translate_batch(b"1234567", 0, bytearray(8)),
            BufferLayoutError,
            "len(vaddrs)",
        ),
        (
            "batch-out-len-7",
            lambda c: c.translate_batch(bytes(8), 0, bytearray(7)),
            BufferLayoutError,
            "len(out)",
        ),
        (
            "batch-len-mismatch",
            lambda c: c.translate_batch(bytes(8), 0, bytearray(16)),
            BufferLayoutError,
            "len(out)",
        ),
        (
            "batch-readonly-out",
            lambda c: c.translate_batch(bytes(8), 0, bytes(8)),
            BufferLayoutError,
            "out.readonly",
        ),
        (
            "batch-u32",
            lambda c: c.translate_batch(array.array("I", [1, 2]), 0, bytearray(8)),
            BufferLayoutError,
            "vaddrs.format",
        ),
        (
            "batch-2d",
            lambda c: c.translate_batch(np.zeros((2, 2), np.uint64), 0, np.zeros(4, np.uint64)),
            BufferLayoutError,
            "vaddrs.ndim",
        ),
        (
            "batch-strided",
            lambda c: c.translate_batch(np.zeros(8, np.uint64)[::2], 0, np.zeros(4, np.uint64)),
            BufferLayoutError,
            "vaddrs.c_contiguous",
        ),
        (
            "batch-not-buffer",
            lambda c: c.translate_batch([1, 2], 0, bytearray(16)),
            InvalidArgument,
            "vaddrs",
        ),
        ("register-name", lambda c: c.read_register("cr3"), InvalidArgument, "name"),
        ("owner-misaligned", lambda c: c.set_frame_owner(1, 4096, 1), InvalidArgument, "addr"),
        ("owner-past-end", lambda c: c.set_frame_owner(0, 16 * MiB, 1), InvalidArgument, "addr + length"),
        ("memory-size", lambda c: type(c)(memory_bytes=4097), InvalidArgument, "memory_bytes"),
        ("memory-huge", lambda c: type(c)(memory_bytes=1 << 40), InvalidArgument, "memory_bytes"),
        ("tlb-size", lambda c: type(c)(memory_bytes=4096, tlb_entries=100), InvalidArgument, "tlb_entries"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_inputs_are_typed_and_identical(case: tuple[str, Any, type[BaseException], str]) -> None:
    _, call, error, what = case
    results = []
    for impl in (fast, reference):
        cpu, tables = host_cpu(impl)
        tables.map(0x5000, 0x9000)
        with pytest.raises(error) as info:
            call(cpu)
        exc = info.value
        assert (exc.kind if isinstance(exc, TranslationFault) else exc.thing) == what  # type: ignore[attr-defined]
        results.append(outcome(call, cpu))
    assert results[0] == results[1]


@IMPLS
def test_hostile_tables_fault_without_crashing(impl: ModuleType) -> None:
    cpu = impl.Processor(memory_bytes=MiB, hypervisor=True, isolation=True)
    write, _ = phys_io(cpu)

    def put(at: int, value: int) -> None:
        write(at, value.to_bytes(8, "little"))

    put(0x1000, 0x1000 | ALL_RWX | 1)  # self-referencing stage-1 root (host)
    cpu.set_table_root(0, 0, 0x1000)
    assert cpu.translate(0x123, Access.READ) == 0x1123  # bounded walk: the x86 result
    put(0x2000, 0xF_FFFF_FFFF_F000 | ALL_RWX | 1)  # past the end of memory
    cpu.set_table_root(0, 1, 0x2000)
    put(0x3000, 0x200000 | ALL_RWX | 1 | 0x80)  # PS in a level-4 entry: reserved
    cpu.set_table_root(0, 2, 0x3000)
    cpu.set_entry_points(1, [1])
    cpu.set_entry_points(2, [2])
    cpu.set_entry_points(0, [0])
    cpu.enter_domain(1, 1)
    assert outcome(cpu.translate, 0, 0)[2]["kind"] == "out-of-memory-range"
    cpu.enter_domain(2, 2)
    assert outcome(cpu.translate, 0, 0)[2]["kind"] == "reserved-bit"
    cpu.enter_domain(0, 0)
    # A guest whose stage 2 points at another VM's frame faults with "isolation".
    cpu.set_frame_owner(0x10000, 0x10000, 1)
    cpu.set_frame_owner(0x20000, 0x1000, 2)
    put(0x10000, 0x20000 | ALL_RWX | 1)
    cpu.set_stage2_root(1, 0x10000)
    cpu.set_table_root(1, 0, 0)
    cpu.write_vm_register(1)
    res = outcome(cpu.translate, 0, 0)
    assert (res[2]["kind"], res[2]["stage"], res[2]["level"]) == ("isolation", 2, 3)
    assert cpu.isolation_violation(1) == 0x20000
    cpu.grant_frames(1, 0x20000, 0x1000)
    assert cpu.isolation_violation(1) is None
