"""Random processor worlds for tests: chaotic tables and well-formed guests.

Design: a world is described by plain data (a seed and a few flags) and built
the same way on any ``Processor`` class, so differential tests build it on
``vmkernel.fast`` and ``vmkernel.reference`` and compare every result.
``chaos_world`` fills a few table pages with random entries (huge pages,
reserved bits, self references, targets past the end of memory) so walks hit
every fault; ``guest_world`` builds well-formed two-stage mappings with random
page sizes and per-domain permissions, where most translations succeed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from vmk_processor.tables import ALL_RWX, PAGE_SIZE, PRESENT, PS, PageTables, phys_io

__all__ = ["ENTRY_POINTS", "World", "chaos_address", "chaos_world", "guest_world", "outcome"]

#: Entry point of each domain in test worlds (index = domain).
ENTRY_POINTS = (0xFFFF_8000_0000_1000, 0xFFFF_8000_0000_2000, 0x40_0000)
_INDICES = (0, 1, 2, 255, 256, 511)
_CHAOS_MEMORY = 1 << 20
_CHAOS_TABLES = tuple(range(0x1000, 0x9000, 0x1000))


@dataclass
class World:
    """A built world: the processor and what was mapped."""

    cpu: Any
    #: (vm, domain) -> list of (vaddr, size) mapped in that first stage.
    mapped: dict[tuple[int, int], list[tuple[int, int]]] = field(default_factory=dict)
    #: vm -> (host base, bytes) of the frames it owns.
    regions: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: Addresses worth translating.
    addresses: list[int] = field(default_factory=list)
    #: Addresses of entries worth rewriting (physical).
    entries: list[int] = field(default_factory=list)
    #: First-stage leaves: (vm, domain, vaddr, size, physical address of the entry).
    leaves: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    #: Second-stage leaves: (vm, gpa, size, physical address of the entry).
    s2_leaves: list[tuple[int, int, int, int]] = field(default_factory=list)


def _sign_extend(vaddr: int) -> int:
    return vaddr | (0xFFFF << 48) if vaddr & (1 << 47) else vaddr


def chaos_address(rng: random.Random) -> int:
    """An address whose table indices are among the few the chaos tables fill."""
    v = 0
    for level in (4, 3, 2, 1):
        v |= rng.choice(_INDICES) << (3 + 9 * level)
    v |= rng.choice((0, 1, 0xFF8, 0xFFF, rng.randrange(PAGE_SIZE)))
    v = _sign_extend(v)
    roll = rng.random()
    if roll < 0.05:
        v ^= 1 << 50  # non-canonical
    elif roll < 0.08:
        v = (1 << 64) - 1
    elif roll < 0.12:
        v |= rng.randrange(1 << 21)  # inside a huge page
    return v


def _chaos_entry(rng: random.Random) -> int:
    target = rng.choice(
        (
            *_CHAOS_TABLES,
            rng.randrange(_CHAOS_MEMORY // PAGE_SIZE) * PAGE_SIZE,
            0,
            0x20_0000,
            0x20_2000,
            _CHAOS_MEMORY,
            0xF_FFFF_FFFF_F000,
        )
    )
    perms = ALL_RWX if rng.random() < 0.6 else rng.randrange(1 << 9) << 52
    bits = target | perms | (rng.randrange(8) << 61)
    if rng.random() < 0.9:
        bits |= PRESENT
    if rng.random() < 0.25:
        bits |= PS
    if rng.random() < 0.1:
        bits |= 1 << rng.randrange(12, 21)
    return bits | rng.choice((0, 0, 0x2, 0x66))  # ignored x86 bits


def chaos_world(cls: Any, seed: int, *, hypervisor: bool, isolation: bool, tlb_entries: int = 16) -> World:
    """Random tables on 8 pages of a 1 MiB processor, roots of VMs 0-2 pointing into them."""
    rng = random.Random(seed)
    cpu = cls(_CHAOS_MEMORY, hypervisor, isolation=isolation, max_vm_id=7, tlb_entries=tlb_entries)
    world = World(cpu)
    write_bytes, _ = phys_io(cpu)
    for table in _CHAOS_TABLES:
        for index in rng.sample(_INDICES, rng.randrange(2, len(_INDICES) + 1)):
            write_bytes(table + 8 * index, _chaos_entry(rng).to_bytes(8, "little"))
            world.entries.append(table + 8 * index)
    for vm in (0, 1, 2):
        for domain in (0, 1, 2):
            if rng.random() < 0.85:
                cpu.set_table_root(vm, domain, rng.choice(_CHAOS_TABLES))
        if vm and rng.random() < 0.9:
            cpu.set_stage2_root(vm, rng.choice(_CHAOS_TABLES))
    for vm in (1, 2):
        if rng.random() < 0.5:
            start = rng.randrange(256) * PAGE_SIZE
            cpu.set_frame_owner(start, rng.randrange(0, 256 - start // PAGE_SIZE + 1) * PAGE_SIZE, vm)
    for domain, point in enumerate(ENTRY_POINTS):
        cpu.set_entry_points(domain, [point])
    world.addresses = [chaos_address(rng) for _ in range(24)]
    return world


def guest_world(
    cls: Any,
    seed: int,
    *,
    vms: int = 2,
    isolation: bool = False,
    hypervisor: bool = True,
    tlb_entries: int = 64,
) -> World:
    """Well-formed guests: VM ``v`` owns 4 MiB at ``4 MiB * v``; its second
    stage maps guest-physical ``[0, 4 MiB)`` there with random page sizes; its
    first stages (one per domain) map random pages to random guest-physical
    pages with random per-domain permissions.  VM 0 (host) maps physical pages."""
    rng = random.Random(seed)
    region = 4 << 20
    cpu = cls(region * (vms + 1), hypervisor, isolation=isolation, max_vm_id=7, tlb_entries=tlb_entries)
    world = World(cpu)
    write_bytes, read_u64 = phys_io(cpu)
    for domain, point in enumerate(ENTRY_POINTS):
        cpu.set_entry_points(domain, [point])
    host_next = [region - PAGE_SIZE]

    def host_alloc() -> int:
        host_next[0] -= PAGE_SIZE
        return host_next[0]

    for vm in range(0, vms + 1):
        base = region * vm
        world.regions[vm] = (base, region)
        if vm:
            cpu.set_frame_owner(base, region, vm)
            s2_next = [base + region]

            def s2_alloc(s2_next: list[int] = s2_next) -> int:
                s2_next[0] -= PAGE_SIZE
                return s2_next[0]

            s2 = PageTables(write_bytes, read_u64, s2_alloc)
            for chunk in range(0, region, 2 << 20):
                if rng.random() < 0.5:
                    at = s2.map(chunk, base + chunk, 2 << 20)
                    world.s2_leaves.append((vm, chunk, 2 << 20, at))
                else:
                    for i, at in enumerate(s2.map_pages(chunk, base + chunk, 512)):
                        world.s2_leaves.append((vm, chunk + i * PAGE_SIZE, PAGE_SIZE, at))
            cpu.set_stage2_root(vm, s2.root)
            # Guest tables live at guest-physical [1 MiB, 2 MiB), written through the offset map.
            g_next = [1 << 20]

            def g_alloc(g_next: list[int] = g_next) -> int:
                g_next[0] += PAGE_SIZE
                return g_next[0]

            def g_write(gpa: int, data: bytes, base: int = base) -> None:
                write_bytes(base + gpa, data)

            def g_read(gpa: int, base: int = base) -> int:
                return read_u64(base + gpa)

            io: tuple[Any, Any, Any] = (g_write, g_read, g_alloc)
            limit = 1 << 20  # guest data pages below the table area
        else:
            io = (write_bytes, read_u64, host_alloc)
            limit = 2 << 20
        # Physical address of a first-stage entry (guest tables are at base + gpa).
        host_of = base if vm else 0
        for domain in (0, 1, 2):
            tables = PageTables(*io)
            cpu.set_table_root(vm, domain, tables.root)
            mapped = world.mapped.setdefault((vm, domain), [])
            for _ in range(rng.randrange(3, 9)):
                size = rng.choice((PAGE_SIZE, PAGE_SIZE, PAGE_SIZE, 2 << 20, 1 << 30))
                vaddr = _sign_extend(rng.randrange(1 << 48) & ~(size - 1))
                if size == 1 << 30:
                    target = 0
                elif size == 2 << 20:
                    target = rng.randrange(0, (limit if vm == 0 else region), size)
                else:
                    target = rng.randrange(0, limit, PAGE_SIZE)
                perms = ALL_RWX if rng.random() < 0.5 else rng.randrange(1 << 9) << 52
                at = tables.map(vaddr, target, size, perms) + host_of
                world.entries.append(at)
                world.leaves.append((vm, domain, vaddr, size, at))
                mapped.append((vaddr, size))
                for _ in range(3):
                    off = rng.choice((0, size - 1, rng.randrange(size), rng.randrange(min(size, 1 << 22))))
                    world.addresses.append(vaddr + off)
    return world


def outcome(call: Any, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """``("ok", result)`` or ``("err", type name, attributes)``: comparable across implementations."""
    try:
        result = call(*args, **kwargs)
    except Exception as exc:
        attrs = {
            name: getattr(exc, name)
            for name in ("kind", "stage", "level", "address", "gpa", "code", "thing", "value", "expected")
            if hasattr(exc, name)
        }
        return ("err", type(exc).__name__, attrs, str(exc))
    if isinstance(result, (bytes, bytearray, memoryview)):
        result = bytes(result)
    return ("ok", result)
