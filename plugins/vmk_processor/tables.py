"""Build x86-64-format page tables in an emulated processor's memory.

Design: the builder knows nothing about stages.  It writes entries through a
``write_u64(addr, value)`` / ``read_u64(addr)`` pair and takes new table pages
from an ``alloc()`` callable, so the same code builds host tables (physical
addresses), second-stage tables (host-physical) and a guest's first-stage
tables (guest-physical, written through the second stage).  Works with both
``vmkernel.fast.Processor`` and ``vmkernel.reference.Processor``.
"""

from __future__ import annotations

from collections.abc import Callable

from vmkernel import Access, Domain
from vmkernel.errors import InvalidArgument

__all__ = [
    "ADDR_MASK",
    "ALL_RWX",
    "PAGE_SIZE",
    "PRESENT",
    "PS",
    "PageTables",
    "entry",
    "perm_bits",
    "phys_io",
]

PAGE_SIZE = 4096
PRESENT = 1
PS = 1 << 7
ADDR_MASK = 0x000F_FFFF_FFFF_F000
#: Read, write and execute for every domain (bits 52-60).
ALL_RWX = 0o777 << 52
_SIZES = {4096: 1, 2 << 20: 2, 1 << 30: 3}


def perm_bits(domain: Domain | int, *accesses: Access | int) -> int:
    """The entry bits granting ``accesses`` to ``domain``."""
    bits = 0
    for access in accesses:
        bits |= 1 << (52 + 3 * int(domain) + int(access))
    return bits


def entry(addr: int, perms: int = ALL_RWX, *, huge: bool = False, present: bool = True) -> int:
    """A page-table entry pointing at ``addr`` (a table, or a page when ``huge``/at level 1)."""
    return (addr & ADDR_MASK) | perms | (PS if huge else 0) | (PRESENT if present else 0)


def phys_io(cpu: object) -> tuple[Callable[[int, bytes], None], Callable[[int], int]]:
    """``(write_bytes, read_u64)`` on a processor's physical memory."""
    read_phys = cpu.read_phys  # type: ignore[attr-defined]

    def read_u64(addr: int) -> int:
        return int.from_bytes(read_phys(addr, 8), "little")

    return cpu.write_phys, read_u64  # type: ignore[attr-defined]


class PageTables:
    """One 4-level table tree rooted at ``root`` (allocated on creation)."""

    def __init__(
        self,
        write_bytes: Callable[[int, bytes], None],
        read_u64: Callable[[int], int],
        alloc: Callable[[], int],
        *,
        table_perms: int = ALL_RWX,
    ) -> None:
        self._write_bytes = write_bytes
        self._read = read_u64
        self._alloc = alloc
        self._table_perms = table_perms
        self.tables: list[int] = []
        self.root = self._new_table()

    def _write(self, addr: int, value: int) -> None:
        self._write_bytes(addr, value.to_bytes(8, "little"))

    def _new_table(self) -> int:
        page = self._alloc()
        self._write_bytes(page, bytes(PAGE_SIZE))
        self.tables.append(page)
        return page

    def slot(self, vaddr: int, level: int) -> int:
        """Address of the entry for ``vaddr`` at ``level`` (4 = root), creating tables above it."""
        table = self.root
        for lvl in range(4, level, -1):
            at = table + 8 * ((vaddr >> (3 + 9 * lvl)) & 511)
            e = self._read(at)
            if not e & PRESENT or (e & PS and lvl < 4):
                nxt = self._new_table()
                self._write(at, entry(nxt, self._table_perms))
                table = nxt
            else:
                table = e & ADDR_MASK
        return table + 8 * ((vaddr >> (3 + 9 * level)) & 511)

    def map(self, vaddr: int, paddr: int, size: int = PAGE_SIZE, perms: int = ALL_RWX) -> int:
        """Maps the ``size`` page at ``vaddr`` to ``paddr``; returns the leaf entry's address."""
        level = _SIZES.get(size)
        if level is None:
            raise InvalidArgument("size", size, "4096, 2 MiB or 1 GiB")
        if vaddr % size or paddr % size:
            raise InvalidArgument("vaddr, paddr", (vaddr, paddr), f"multiples of the page size {size}")
        at = self.slot(vaddr, level)
        self._write(at, entry(paddr, perms, huge=level > 1))
        return at

    def map_pages(self, vaddr: int, paddr: int, count: int, perms: int = ALL_RWX) -> list[int]:
        """Maps ``count`` consecutive 4 KiB pages, one table write per leaf table;
        returns the addresses of the leaf entries."""
        if vaddr % PAGE_SIZE or paddr % PAGE_SIZE:
            raise InvalidArgument("vaddr, paddr", (vaddr, paddr), "multiples of 4096")
        done = 0
        leaves: list[int] = []
        while done < count:
            v = vaddr + done * PAGE_SIZE
            first = self.slot(v, 1)
            n = min(count - done, 512 - (v >> 12) % 512)
            block = b"".join(
                entry(paddr + (done + i) * PAGE_SIZE, perms).to_bytes(8, "little") for i in range(n)
            )
            self._write_bytes(first, block)
            leaves.extend(range(first, first + 8 * n, 8))
            done += n
        return leaves

    def unmap(self, vaddr: int, size: int = PAGE_SIZE) -> None:
        """Clears the leaf entry of the ``size`` page at ``vaddr``."""
        self._write(self.slot(vaddr, _SIZES[size]), 0)
