"""Independent check: our first-stage walks against Unicorn's x86-64 MMU.

Random x86-64 tables (4 KiB, 2 MiB and 1 GiB pages, upper-half addresses,
holes, targets past the end of memory, random ignored bits) are built in our
processor's memory with no hypervisor, then the same bytes are loaded into a
Unicorn x86-64 CPU with long-mode paging on (CR4.PAE, EFER.LME/NXE, CR0.PG).
Physical memory holds its own addresses (the word at ``p`` is ``p``), so the
value a ``mov rax, [rbx]`` loads is the physical address Unicorn translated
to.  Every address must translate to the same physical address, or fault on
both sides.  20 worlds x ~600 addresses = over 10,000 addresses.
"""

from __future__ import annotations

import random
import struct
from types import ModuleType

import pytest
from vmk_processor.tables import ALL_RWX, PageTables, phys_io

from vmkernel import Access, Domain, fast, reference
from vmkernel.errors import TranslationFault

unicorn = pytest.importorskip(
    "unicorn", reason="the Unicorn CPU emulator (pip install unicorn) is not installed"
)
from unicorn import x86_const as X  # noqa: E402

MiB = 1 << 20
MEMORY = 8 * MiB
DATA_END = 6 * MiB  # data pages below, tables above
CODE_PHYS = DATA_END - 4096
CODE_VIRT = 0x2000


def build_world(seed: int, impl: ModuleType) -> tuple[object, list[int]]:
    rng = random.Random(seed)
    cpu = impl.Processor(MEMORY, False)
    write, read = phys_io(cpu)
    cpu.write_phys(0, b"".join(struct.pack("<Q", a) for a in range(0, DATA_END, 8)))
    nxt = iter(range(7 * MiB, MEMORY, 4096))
    tables = PageTables(write, read, nxt.__next__)
    addresses: list[int] = []
    for _ in range(60):
        size = rng.choices((4096, 2 * MiB, 1 << 30), (6, 3, 1))[0]
        pml4 = rng.randrange(1, 512)  # index 0 holds the code page
        vaddr = (pml4 << 39) | (rng.randrange(1 << 39) & ~(size - 1))
        if vaddr & (1 << 47):
            vaddr |= 0xFFFF << 48
        if size == 1 << 30:
            target = 0
        elif size == 2 * MiB:
            target = rng.choice((0, 2 * MiB, 4 * MiB, 8 * MiB))  # 8 MiB: past the end of memory
        else:
            target = rng.choice((rng.randrange(0, CODE_PHYS, 4096), MEMORY + 4096 * rng.randrange(4)))
        # Our permission bits live where x86 ignores them (52-62) or means NX (63):
        # keep the hypervisor's read bit so both sides agree the read is allowed.
        perms = (rng.randrange(1 << 12) << 52) | (1 << 52) | rng.choice((0, 2, 4, 6, 0x60))
        tables.map(vaddr, target, size, perms=perms & ~0x80 | (ALL_RWX & (1 << 52)))
        span = min(size, DATA_END if target < DATA_END else 4096)
        for _ in range(10):
            addresses.append(vaddr + (rng.randrange(span) & ~7))
    # Holes: addresses nobody mapped.
    for _ in range(20):
        addresses.append((rng.randrange(1, 256) << 39) | (rng.randrange(1 << 39) & ~7))
    tables.map(CODE_VIRT, CODE_PHYS)
    cpu.write_phys(CODE_PHYS, bytes.fromhex("488b03"))  # mov rax, [rbx]
    cpu.set_table_root(0, Domain.HYPERVISOR, tables.root)
    return cpu, addresses


def unicorn_cpu(cpu: object, root: int) -> object:
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(0, MEMORY)
    uc.mem_write(0, cpu.read_phys(0, MEMORY))  # type: ignore[attr-defined]
    uc.reg_write(X.UC_X86_REG_CR4, 1 << 5)  # PAE
    uc.msr_write(0xC000_0080, (1 << 8) | (1 << 10) | (1 << 11))  # EFER: LME, LMA, NXE
    uc.reg_write(X.UC_X86_REG_CR3, root)
    uc.reg_write(X.UC_X86_REG_CR0, (1 << 31) | (1 << 16) | 1)  # PG, WP, PE
    return uc


SENTINEL = 0xDEAD_BEEF_DEAD_BEEF  # never a physical address here


def unicorn_read(uc: object, vaddr: int) -> int | None:
    """The 8 bytes Unicorn loads from ``vaddr``, None if the load faults.  After a
    fault Unicorn can leave the load looking done, so RAX is preset to a sentinel
    and RIP must have moved past the instruction."""
    uc.reg_write(X.UC_X86_REG_RBX, vaddr)  # type: ignore[attr-defined]
    uc.reg_write(X.UC_X86_REG_RAX, SENTINEL)  # type: ignore[attr-defined]
    try:
        uc.emu_start(CODE_VIRT, CODE_VIRT + 3, count=1)  # type: ignore[attr-defined]
    except unicorn.UcError:
        return None
    rax = int(uc.reg_read(X.UC_X86_REG_RAX))  # type: ignore[attr-defined]
    if rax == SENTINEL or uc.reg_read(X.UC_X86_REG_RIP) != CODE_VIRT + 3:  # type: ignore[attr-defined]
        return None
    return rax


@pytest.mark.parametrize("seed", range(20))
def test_walks_match_unicorn(seed: int) -> None:
    ours, addresses = build_world(seed, fast)
    ref, _ = build_world(seed, reference)
    uc = unicorn_cpu(ours, ours.table_root(0, Domain.HYPERVISOR))  # type: ignore[attr-defined]
    assert len(addresses) >= 500
    hits = 0
    for vaddr in addresses:
        theirs = unicorn_read(uc, vaddr)
        results = []
        for cpu in (ours, ref):
            try:
                results.append(cpu.translate(vaddr, Access.READ))  # type: ignore[attr-defined]
            except TranslationFault as fault:
                assert fault.kind in ("not-present", "out-of-memory-range")
                results.append(None)
        assert results[0] == results[1] == theirs, hex(vaddr)
        if theirs is not None:
            hits += 1
    assert hits > len(addresses) // 3
    stats = ours.stats()  # type: ignore[attr-defined]
    assert stats["tlb_hits"] > 0 and stats["walks"] > 0
