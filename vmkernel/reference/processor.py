"""Pure-Python reference model of the emulated processor.

The processor has physical memory, a hypervisor status register (HSR, fixed at
construction), a VM register (VMR), a domain register (DR) with the
non-hierarchical domains hypervisor / OS / application, first-stage table roots
per (VM, domain), a second-stage root per VM, a domain access table of entry
points, per-domain permissions on the privileged registers, optional frame
ownership (isolation) and a TLB tagged by VM, domain, page number and page size.

Design notes (the Rust processor in ``vmkernel.fast`` follows this model bit
for bit, statistics included, which the differential tests check):

* Page tables are x86-64 4-level tables (present bit 0, page-size bit 7,
  address bits 12-51).  The x86 R/W, U/S and NX meanings are replaced by
  per-domain R/W/X bits 52+3d .. 54+3d and a per-domain security bit 61+d.
  Permissions are ANDed over every level of both stages; the walk stops at the
  first entry that denies the access, so a fault names the level.
* With a hypervisor and VMR != 0 every first-stage table read goes through the
  VM's second stage (which needs read permission), so a cold walk makes at
  most 24 reads.  The host (VMR = 0) and a processor without hypervisor use
  the first stage alone.  Walks have no side effects (no accessed/dirty bits).
* The TLB is direct-mapped; an entry holds the host page, the permissions of
  its domain combined over both stages, and the guest-physical pages it was
  built from (so ``invalidate_gpa`` can drop it).  Its page size is the
  smaller of the two stages' sizes; it is 4 KiB when isolation is on for a
  guest (ownership is per 4 KiB frame) or when the page runs past the end of
  memory, so a hit never needs a check that the walk did not make.  A hit that
  lacks the permission walks again, so faults never depend on the TLB.
* Only successful walks are cached; writing VMR never flushes.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

from vmkernel.enums import Domain
from vmkernel.errors import (
    FAULT_KINDS,
    BufferLayoutError,
    DomainEntryFault,
    InvalidArgument,
    RegisterAccessFault,
    TranslationFault,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["Processor"]

PAGE_SIZE = 4096
MAX_MEMORY = 1 << 32
DEFAULT_MAX_VM_ID = 4095
DEFAULT_TLB_ENTRIES = 4096
_MASK64 = (1 << 64) - 1
_MASK48 = (1 << 48) - 1
_ADDR = 0x000F_FFFF_FFFF_F000
_PRESENT = 1
_PS = 1 << 7
_RSV_1G = ((1 << 30) - 1) & ~((1 << 13) - 1)  # bits 13-29 of a 1 GiB leaf
_RSV_2M = ((1 << 21) - 1) & ~((1 << 13) - 1)  # bits 13-20 of a 2 MiB leaf
_SHIFTS = (12, 21, 30)  # size class -> page shift
_HASH = 0x9E37_79B9_7F4A_7C15
_READ = 0

# Fault codes (index into FAULT_KINDS).
_NOT_PRESENT = 1
_PERMISSION = 2
_RESERVED = 3
_NON_CANONICAL = 4
_OUT_OF_RANGE = 5
_ISOLATION = 6
_PAGE_CROSSING = 7

REGISTERS = ("vmr", "table_root", "stage2_root", "domain_table")
_READABLE = ("vmr", "table_root", "stage2_root")
# Default (read, write) per register for the OS and application domains; the
# hypervisor domain always has both.
_DEFAULT_PERMS = {
    1: {
        "vmr": (True, False),
        "table_root": (True, True),
        "stage2_root": (False, False),
        "domain_table": (True, False),
    },
    2: {
        "vmr": (False, False),
        "table_root": (False, False),
        "stage2_root": (False, False),
        "domain_table": (False, False),
    },
}

_U64 = "an integer in [0, 2**64)"
_DOMAIN = "Domain.HYPERVISOR, Domain.OS or Domain.APPLICATION (0, 1 or 2)"
_ACCESS = "Access.READ, Access.WRITE or Access.EXECUTE (0, 1 or 2)"
_SIZE = "1, 2, 4 or 8 (bytes)"
_U64_EXPECTED = (
    "a buffer of unsigned 64-bit integers (array('Q'), numpy uint64, memoryview cast 'Q') or of bytes"
)
_NATIVE_ORDER = "<" if sys.byteorder == "little" else ">"
_U64_FORMATS = frozenset(
    {"Q", "L", "N", "@Q", "@L", "@N", "=Q", f"{_NATIVE_ORDER}Q"}
    | ({"!Q"} if sys.byteorder == "big" else set())
)
_BYTE_FORMATS = frozenset({"B", "b", "c", "@B", "@b", "=B", "<B", ">B"})


class _Fault(Exception):
    """Internal: a walk stopped (code, stage, level, guest-physical address)."""

    def __init__(self, code: int, stage: int, level: int, gpa: int | None) -> None:
        super().__init__(code)
        self.code = code
        self.stage = stage
        self.level = level
        self.gpa = gpa


def _int(thing: str, value: object, lo: int, hi: int, expected: str) -> int:
    if isinstance(value, int) and lo <= value <= hi:
        return int(value)
    raise InvalidArgument(thing, value, expected)


def _u64(thing: str, value: object) -> int:
    return _int(thing, value, 0, _MASK64, _U64)


def _canonical(vaddr: int) -> bool:
    top = vaddr >> 47
    return top == 0 or top == 0x1FFFF


def _tag(vm: int, domain: int, size_class: int, vpn: int) -> int:
    return (1 << 63) | (size_class << 61) | (domain << 58) | (vm << 42) | vpn


def _u64_view(obj: object, thing: str, writable: bool) -> memoryview:
    """A flat 'Q' view of a u64 buffer or of raw bytes (no copy)."""
    try:
        view = memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgument(thing, obj, _U64_EXPECTED) from None
    if writable and view.readonly:
        raise BufferLayoutError(f"{thing}.readonly", True, "False (a writable buffer)")
    if view.ndim != 1:
        raise BufferLayoutError(f"{thing}.ndim", view.ndim, "1")
    if not view.c_contiguous:
        raise BufferLayoutError(f"{thing}.c_contiguous", False, "True (a C-contiguous buffer)")
    if view.format in _BYTE_FORMATS and view.itemsize == 1:
        if view.nbytes % 8:
            raise BufferLayoutError(f"len({thing})", view.nbytes, "a multiple of 8 bytes")
    elif view.itemsize != 8 or view.format not in _U64_FORMATS:
        raise BufferLayoutError(f"{thing}.format", view.format, f"'Q' ({_U64_EXPECTED})")
    if view.nbytes == 0:
        return memoryview(bytearray()).cast("Q")
    return view.cast("B").cast("Q")


class _Entry:
    __slots__ = ("dgpa", "dsize", "hpa", "perms", "tables", "tag", "vm")

    def __init__(
        self, tag: int, vm: int, hpa: int, perms: int, tables: tuple[int, ...], dgpa: int, dsize: int
    ) -> None:
        self.tag = tag
        self.vm = vm
        self.hpa = hpa
        self.perms = perms
        self.tables = tables
        self.dgpa = dgpa
        self.dsize = dsize


class Processor:
    """An emulated processor with a VM register, a domain register and
    domain-based two-stage x86-64-format address translation."""

    def __init__(
        self,
        memory_bytes: int = 64 << 20,
        hypervisor: bool = False,
        *,
        isolation: bool = False,
        max_vm_id: int = DEFAULT_MAX_VM_ID,
        tlb_entries: int = DEFAULT_TLB_ENTRIES,
    ) -> None:
        self._mem_len = _int(
            "memory_bytes",
            memory_bytes,
            PAGE_SIZE,
            MAX_MEMORY,
            f"a multiple of 4096 in [4096, {MAX_MEMORY}]",
        )
        if self._mem_len % PAGE_SIZE:
            raise InvalidArgument("memory_bytes", memory_bytes, f"a multiple of 4096 in [4096, {MAX_MEMORY}]")
        self._max_vm = _int("max_vm_id", max_vm_id, 1, 0xFFFF, "an integer in [1, 65535]")
        entries = _int("tlb_entries", tlb_entries, 16, 1 << 20, "a power of two in [16, 1048576]")
        if entries & (entries - 1):
            raise InvalidArgument("tlb_entries", tlb_entries, "a power of two in [16, 1048576]")
        self._tlb_bits = entries.bit_length() - 1
        self._hsr = bool(hypervisor)
        self._isolation = bool(isolation)
        self._mem = bytearray(self._mem_len)
        self._vmr = 0
        self._dr = 0
        self._roots: dict[tuple[int, int], int] = {}
        self._s2roots: dict[int, int] = {}
        self._entry_points: dict[int, set[int]] = {0: set(), 1: set(), 2: set()}
        self._perms: dict[int, dict[str, tuple[bool, bool]]] = {d: dict(p) for d, p in _DEFAULT_PERMS.items()}
        self._owner = [0] * (self._mem_len // PAGE_SIZE)
        self._grants: set[tuple[int, int]] = set()
        self._tlb: list[_Entry | None] = [None] * entries
        self._hits = self._misses = self._walks = self._reads = self._faults = 0

    # -- configuration ------------------------------------------------------

    @property
    def memory_bytes(self) -> int:
        """Size of physical memory in bytes."""
        return self._mem_len

    @property
    def hypervisor(self) -> bool:
        """The hypervisor status register (fixed at construction)."""
        return self._hsr

    @property
    def isolation(self) -> bool:
        """Whether guests may reach only frames they own or were granted."""
        return self._isolation

    @property
    def max_vm_id(self) -> int:
        """The largest accepted VM id (0 is the host)."""
        return self._max_vm

    @property
    def tlb_entries(self) -> int:
        """Number of TLB slots."""
        return len(self._tlb)

    @property
    def vm_register(self) -> int:
        """The VM register: the id of the running VM (0 = host)."""
        return self._vmr

    @property
    def domain(self) -> Domain:
        """The domain register: the current domain."""
        return Domain(self._dr)

    def _vm(self, value: object, guest: bool = False) -> int:
        lo = 1 if guest else 0
        what = "a guest VM id" if guest else "a VM id"
        return _int("vm", value, lo, self._max_vm, f"{what} in [{lo}, {self._max_vm}]")

    @staticmethod
    def _domain(value: object) -> int:
        return _int("domain", value, 0, 2, _DOMAIN)

    def _current_vm(self) -> int:
        return self._vmr if self._hsr else 0

    def _require(self, register: str, write: bool, expected: str | None = None) -> None:
        if self._dr == 0:
            return
        allowed = self._perms[self._dr][register][1 if write else 0]
        if not allowed:
            op = "write" if write else "read"
            raise RegisterAccessFault(
                register, self._dr, op, expected or f"a domain with {op} permission on {register}"
            )

    def _phys_range(self, thing: str, addr: int, length: int) -> None:
        if addr + length > self._mem_len:
            raise InvalidArgument(thing, addr + length, f"at most {self._mem_len} (memory_bytes)")

    def _frames(self, addr: object, length: object) -> range:
        a = _u64("addr", addr)
        n = _u64("length", length)
        if a % PAGE_SIZE:
            raise InvalidArgument("addr", a, "a multiple of 4096")
        if n % PAGE_SIZE:
            raise InvalidArgument("length", n, "a multiple of 4096")
        self._phys_range("addr + length", a, n)
        return range(a // PAGE_SIZE, (a + n) // PAGE_SIZE)

    def read_phys(self, addr: int, n: int) -> bytes:
        """``n`` bytes of physical memory at ``addr``."""
        a = _u64("addr", addr)
        count = _u64("n", n)
        self._phys_range("addr + n", a, count)
        return bytes(self._mem[a : a + count])

    def write_phys(self, addr: int, data: Buffer) -> None:
        """Writes ``data`` (any bytes-like object) to physical memory at ``addr``."""
        a = _u64("addr", addr)
        try:
            view = memoryview(data)
        except TypeError:
            raise InvalidArgument("data", data, "a bytes-like object") from None
        if not view.c_contiguous:
            raise BufferLayoutError("data.c_contiguous", False, "True (a C-contiguous buffer)")
        self._phys_range("addr + len(data)", a, view.nbytes)
        self._mem[a : a + view.nbytes] = view.cast("B") if view.nbytes else b""

    def set_table_root(self, vm: int, domain: Domain | int, addr: int) -> None:
        """Sets the first-stage root of ``(vm, domain)``: physical for the host or
        without hypervisor, guest-physical otherwise."""
        v = self._vm(vm)
        d = self._domain(domain)
        a = _u64("addr", addr)
        self._require("table_root", True)
        if self._dr != 0 and v != self._current_vm():
            raise RegisterAccessFault(
                "table_root", self._dr, "write", "the hypervisor domain, or the running VM's own roots"
            )
        if not self._hsr or v == 0:
            if a % PAGE_SIZE or a >= self._mem_len:
                raise InvalidArgument("addr", a, f"a 4096-aligned physical address below {self._mem_len}")
        elif a % PAGE_SIZE or a >> 48:
            raise InvalidArgument("addr", a, "a 4096-aligned guest-physical address below 2**48")
        self._roots[(v, d)] = a

    def table_root(self, vm: int, domain: Domain | int) -> int | None:
        """The first-stage root of ``(vm, domain)``, or None."""
        return self._roots.get((self._vm(vm), self._domain(domain)))

    def set_stage2_root(self, vm: int, addr: int) -> None:
        """Sets the second-stage (guest-physical -> host-physical) root of guest ``vm``."""
        v = self._vm(vm, guest=True)
        a = _u64("addr", addr)
        self._require("stage2_root", True)
        if a % PAGE_SIZE or a >= self._mem_len:
            raise InvalidArgument("addr", a, f"a 4096-aligned physical address below {self._mem_len}")
        self._s2roots[v] = a

    def stage2_root(self, vm: int) -> int | None:
        """The second-stage root of guest ``vm``, or None."""
        return self._s2roots.get(self._vm(vm, guest=True))

    def write_vm_register(self, vm: int) -> None:
        """Switches the running VM.  Only the hypervisor domain may; never flushes the TLB."""
        v = self._vm(vm)
        if self._dr != 0:
            raise RegisterAccessFault("vmr", self._dr, "write", "the hypervisor domain")
        self._vmr = v

    def read_register(self, name: str) -> int | None:
        """Reads ``vmr``, ``table_root`` (current VM and domain) or ``stage2_root`` (current VM)."""
        if name not in _READABLE:
            raise InvalidArgument("name", name, "'vmr', 'table_root' or 'stage2_root'")
        self._require(name, False)
        vm = self._current_vm()
        if name == "vmr":
            return self._vmr
        if name == "table_root":
            return self._roots.get((vm, self._dr))
        return self._s2roots.get(vm)

    def set_register_permission(self, register: str, domain: Domain | int, read: bool, write: bool) -> None:
        """Sets whether ``domain`` may read / write ``register``."""
        if register not in REGISTERS:
            raise InvalidArgument(
                "register", register, "'vmr', 'table_root', 'stage2_root' or 'domain_table'"
            )
        d = self._domain(domain)
        self._require("domain_table", True)
        if d == 0:
            raise InvalidArgument("domain", d, "Domain.OS or Domain.APPLICATION (the hypervisor's are fixed)")
        if register == "vmr" and write:
            raise InvalidArgument("write", write, "False (vmr is writable only from the hypervisor domain)")
        self._perms[d][register] = (bool(read), bool(write))

    def register_permission(self, register: str, domain: Domain | int) -> tuple[bool, bool]:
        """``(read, write)`` of ``domain`` on ``register``."""
        if register not in REGISTERS:
            raise InvalidArgument(
                "register", register, "'vmr', 'table_root', 'stage2_root' or 'domain_table'"
            )
        d = self._domain(domain)
        return (True, True) if d == 0 else self._perms[d][register]

    def set_entry_points(self, domain: Domain | int, addrs: Iterable[int]) -> None:
        """Replaces the allowed entry points of ``domain``."""
        d = self._domain(domain)
        points = {_u64("addrs[]", a) for a in addrs}
        self._require("domain_table", True)
        self._entry_points[d] = points

    def entry_points(self, domain: Domain | int) -> list[int]:
        """The allowed entry points of ``domain``, sorted."""
        return sorted(self._entry_points[self._domain(domain)])

    def enter_domain(self, domain: Domain | int, address: int) -> None:
        """Enters ``domain`` at ``address``; anywhere but an entry point faults."""
        d = self._domain(domain)
        a = _u64("address", address)
        points = self._entry_points[d]
        if a not in points:
            expected = f"one of its {len(points)} entry points" if points else "an entry point (it has none)"
            raise DomainEntryFault(d, a, expected)
        self._dr = d

    # -- frame ownership ----------------------------------------------------

    def set_frame_owner(self, addr: int, length: int, vm: int) -> None:
        """Gives the frames in ``[addr, addr + length)`` to ``vm`` (0 = host).

        With isolation on, the entries of the frames' previous owners are
        dropped (they may have reached these frames); the new owner had none
        through them, since faults are never cached.  Without isolation,
        ownership does not affect translation and nothing is dropped.
        """
        frames = self._frames(addr, length)
        v = self._vm(vm)
        self._require("stage2_root", True)
        previous = {self._owner[f] for f in frames} - {v}
        for f in frames:
            self._owner[f] = v
        if self._isolation:
            self._drop_vms(previous)

    def frame_owner(self, addr: int) -> int:
        """The owner of the frame holding physical address ``addr``."""
        a = _u64("addr", addr)
        if a >= self._mem_len:
            raise InvalidArgument("addr", a, f"a physical address below {self._mem_len}")
        return self._owner[a // PAGE_SIZE]

    def grant_frames(self, vm: int, addr: int, length: int) -> None:
        """Lets guest ``vm`` reach frames it does not own (nothing is dropped: access only widens)."""
        v = self._vm(vm, guest=True)
        frames = self._frames(addr, length)
        self._require("stage2_root", True)
        self._grants.update((v, f) for f in frames)

    def revoke_frames(self, vm: int, addr: int, length: int) -> None:
        """Withdraws grants made by ``grant_frames``; with isolation on, drops ``vm``'s entries."""
        v = self._vm(vm, guest=True)
        frames = self._frames(addr, length)
        self._require("stage2_root", True)
        self._grants.difference_update((v, f) for f in frames)
        if self._isolation:
            self._drop_vms({v})

    def _drop_vms(self, vms: set[int]) -> None:
        for slot, entry in enumerate(self._tlb):
            if entry is not None and entry.vm in vms:
                self._tlb[slot] = None

    def _accessible(self, vm: int, frame: int) -> bool:
        return self._owner[frame] == vm or (vm, frame) in self._grants

    def isolation_violation(self, vm: int) -> int | None:
        """The lowest host address that guest ``vm`` can reach through its
        second-stage tables (table pages included) without owning it or having
        it granted, or None."""
        v = self._vm(vm, guest=True)
        root = self._s2roots.get(v)
        if root is None:
            return None
        bad: list[int] = []
        ranges: list[tuple[int, int]] = []
        seen: set[tuple[int, int]] = set()
        stack = [(4, root)]
        while stack:
            level, table = stack.pop()
            if (level, table) in seen:
                continue
            seen.add((level, table))
            ranges.append((table, PAGE_SIZE))
            if table >= self._mem_len:
                continue
            for i in range(512):
                e = int.from_bytes(self._mem[table + 8 * i : table + 8 * i + 8], "little")
                if not e & _PRESENT or _reserved(e, level):
                    continue
                if level == 1 or (e & _PS and level in (2, 3)):
                    size = 1 << _SHIFTS[level - 1]
                    ranges.append((e & _ADDR & ~(size - 1), size))
                else:
                    stack.append((level - 1, e & _ADDR))
        ranges.sort()
        covered = 0  # first address not yet checked
        for start, size in ranges:
            lo = max(start, covered)
            hi = start + size
            if lo >= hi:
                continue
            covered = hi
            if lo >= self._mem_len:
                bad.append(lo)
                break
            for f in range(lo // PAGE_SIZE, min(hi, self._mem_len) // PAGE_SIZE):
                if not self._accessible(v, f):
                    bad.append(f * PAGE_SIZE)
                    break
            else:
                if hi > self._mem_len:
                    bad.append(self._mem_len)
            if bad:
                break
        return min(bad) if bad else None

    # -- translation --------------------------------------------------------

    def _read(self, hpa: int) -> int:
        self._reads += 1
        return int.from_bytes(self._mem[hpa : hpa + 8], "little")

    def _stage2(self, gpa: int, access: int, vm: int, domain: int) -> tuple[int, int, int]:
        """(host address, size class, permission mask) of guest-physical ``gpa``."""
        if gpa >> 48:
            raise _Fault(_OUT_OF_RANGE, 2, 4, gpa)
        table = self._s2roots.get(vm)
        if table is None:
            raise _Fault(_NOT_PRESENT, 2, 4, gpa)
        mask = 7
        level = 4
        pshift = 52 + 3 * domain
        while True:
            if table >= self._mem_len:
                raise _Fault(_OUT_OF_RANGE, 2, level, gpa)
            if self._isolation and not self._accessible(vm, table // PAGE_SIZE):
                raise _Fault(_ISOLATION, 2, level, gpa)
            e = self._read(table + 8 * ((gpa >> (3 + 9 * level)) & 511))
            if not e & _PRESENT:
                raise _Fault(_NOT_PRESENT, 2, level, gpa)
            if _reserved(e, level):
                raise _Fault(_RESERVED, 2, level, gpa)
            p = (e >> pshift) & 7
            if not (p >> access) & 1:
                raise _Fault(_PERMISSION, 2, level, gpa)
            mask &= p
            if level == 1 or (e & _PS and level < 4):
                break
            table = e & _ADDR
            level -= 1
        size = 1 << _SHIFTS[level - 1]
        hpa = (e & _ADDR & ~(size - 1)) | (gpa & (size - 1))
        if hpa >= self._mem_len:
            raise _Fault(_OUT_OF_RANGE, 2, level, gpa)
        if self._isolation and not self._accessible(vm, hpa // PAGE_SIZE):
            raise _Fault(_ISOLATION, 2, level, gpa)
        return hpa, level - 1, mask

    def _walk(self, vaddr: int, access: int) -> tuple[int, int, int, int, tuple[int, ...], int, int]:
        """Uncached walk: (hpa, vm, size class, mask, table gpas, data gpa base, data size)."""
        self._walks += 1
        vm = self._current_vm()
        domain = self._dr
        guest = vm != 0
        table = self._roots.get((vm, domain))
        if table is None:
            raise _Fault(_NOT_PRESENT, 1, 4, None)
        tables: list[int] = []
        mask = 7
        level = 4
        pshift = 52 + 3 * domain
        while True:
            index = (vaddr >> (3 + 9 * level)) & 511
            if guest:
                tables.append(table)
                ehpa = self._stage2(table + 8 * index, _READ, vm, domain)[0]
            else:
                if table >= self._mem_len:
                    raise _Fault(_OUT_OF_RANGE, 1, level, None)
                ehpa = table + 8 * index
            e = self._read(ehpa)
            if not e & _PRESENT:
                raise _Fault(_NOT_PRESENT, 1, level, None)
            if _reserved(e, level):
                raise _Fault(_RESERVED, 1, level, None)
            p = (e >> pshift) & 7
            if not (p >> access) & 1:
                raise _Fault(_PERMISSION, 1, level, None)
            mask &= p
            if level == 1 or (e & _PS and level < 4):
                break
            table = e & _ADDR
            level -= 1
        sc = level - 1
        size = 1 << _SHIFTS[sc]
        out = (e & _ADDR & ~(size - 1)) | (vaddr & (size - 1))
        if not guest:
            if out >= self._mem_len:
                raise _Fault(_OUT_OF_RANGE, 1, level, None)
            if (out & ~(size - 1)) + size > self._mem_len:
                sc = 0
            return out, vm, sc, mask, (), 0, 0
        hpa, s2sc, s2mask = self._stage2(out, access, vm, domain)
        sc = min(sc, s2sc)
        if self._isolation:
            sc = 0
        size = 1 << _SHIFTS[sc]
        if (hpa & ~(size - 1)) + size > self._mem_len:
            sc = 0
            size = PAGE_SIZE
        return hpa, vm, sc, mask & s2mask, tuple(tables), out & ~(size - 1), size

    def _check(self, vaddr: int, size: int) -> None:
        if not _canonical(vaddr):
            raise _Fault(_NON_CANONICAL, 1, 0, None)
        if (vaddr & 0xFFF) + size > PAGE_SIZE:
            raise _Fault(_PAGE_CROSSING, 1, 0, None)

    def _translate(self, vaddr: int, access: int, size: int) -> int:
        self._check(vaddr, size)
        vm = self._current_vm()
        domain = self._dr
        v48 = vaddr & _MASK48
        shift = 64 - self._tlb_bits
        for sc in (0, 1, 2):
            tag = _tag(vm, domain, sc, v48 >> _SHIFTS[sc])
            entry = self._tlb[((tag * _HASH) & _MASK64) >> shift]
            if entry is not None and entry.tag == tag:
                if (entry.perms >> access) & 1:
                    self._hits += 1
                    return entry.hpa | (vaddr & ((1 << _SHIFTS[sc]) - 1))
                break
        self._misses += 1
        hpa, vm, sc, mask, tables, dgpa, dsize = self._walk(vaddr, access)
        page = (1 << _SHIFTS[sc]) - 1
        tag = _tag(vm, domain, sc, v48 >> _SHIFTS[sc])
        self._tlb[((tag * _HASH) & _MASK64) >> shift] = _Entry(
            tag, vm, hpa & ~page, mask, tables, dgpa, dsize
        )
        return hpa

    def _raise(self, fault: _Fault, vaddr: int) -> TranslationFault:
        self._faults += 1
        return TranslationFault(FAULT_KINDS[fault.code], fault.stage, fault.level, vaddr, fault.gpa)

    def translate(self, vaddr: int, access: int, size: int = 1) -> int:
        """The host-physical address of a ``size``-byte ``access`` at ``vaddr`` in
        the current VM and domain; raises :class:`TranslationFault`."""
        v = _u64("vaddr", vaddr)
        a = _int("access", access, 0, 2, _ACCESS)
        s = _size(size)
        try:
            return self._translate(v, a, s)
        except _Fault as fault:
            raise self._raise(fault, v) from None

    def walk(self, vaddr: int, access: int, size: int = 1) -> int:
        """Like ``translate`` but bypassing the TLB (neither read nor filled)."""
        v = _u64("vaddr", vaddr)
        a = _int("access", access, 0, 2, _ACCESS)
        s = _size(size)
        try:
            self._check(v, s)
            return self._walk(v, a)[0]
        except _Fault as fault:
            raise self._raise(fault, v) from None

    def translate_batch(self, vaddrs: Buffer, access: int, out: Buffer, size: int = 1) -> bytearray:
        """Translates every address of the u64 buffer ``vaddrs`` into ``out`` (same
        length, 0 where a fault occurred) and returns the fault codes
        (``FAULT_KINDS`` index, 0 = translated), exactly as scalar calls would."""
        a = _int("access", access, 0, 2, _ACCESS)
        s = _size(size)
        src = _u64_view(vaddrs, "vaddrs", writable=False)
        dst = _u64_view(out, "out", writable=True)
        if len(dst) != len(src):
            raise BufferLayoutError("len(out)", len(dst), f"{len(src)} (the number of vaddrs)")
        items = src.tolist()  # read everything first: out may alias vaddrs
        codes = bytearray(len(items))
        for i, v in enumerate(items):
            try:
                dst[i] = self._translate(v, a, s)
            except _Fault as fault:
                self._faults += 1
                dst[i] = 0
                codes[i] = fault.code
        return codes

    # -- invalidation and statistics ----------------------------------------

    def invalidate_page(self, vm: int, vaddr: int) -> None:
        """Drops the entries of ``vm`` (every domain and page size) that map ``vaddr``."""
        v = self._vm(vm)
        addr = _u64("vaddr", vaddr)
        if not _canonical(addr):
            raise InvalidArgument("vaddr", addr, "a canonical address (bits 63-47 all equal)")
        shift = 64 - self._tlb_bits
        for sc in (0, 1, 2):
            for d in (0, 1, 2):
                tag = _tag(v, d, sc, (addr & _MASK48) >> _SHIFTS[sc])
                slot = ((tag * _HASH) & _MASK64) >> shift
                entry = self._tlb[slot]
                if entry is not None and entry.tag == tag:
                    self._tlb[slot] = None

    def invalidate_vm(self, vm: int) -> None:
        """Drops every entry of ``vm``."""
        v = self._vm(vm)
        for slot, entry in enumerate(self._tlb):
            if entry is not None and entry.vm == v:
                self._tlb[slot] = None

    def invalidate_all(self) -> None:
        """Empties the TLB."""
        self._tlb = [None] * len(self._tlb)

    def invalidate_gpa(self, vm: int, gpa: int, length: int = PAGE_SIZE) -> None:
        """Drops every entry of guest ``vm`` built from a guest-physical page in
        ``[gpa, gpa + length)`` (a first-stage table page or the mapped page)."""
        v = self._vm(vm, guest=True)
        g = _u64("gpa", gpa)
        n = _int("length", length, 1, _MASK64, "an integer in [1, 2**64)")
        if g + n > 1 << 64:
            raise InvalidArgument("gpa + length", g + n, "at most 2**64")
        lo = g & ~0xFFF
        hi = g + n
        for slot, entry in enumerate(self._tlb):
            if entry is None or entry.vm != v or not entry.dsize:
                continue
            if (entry.dgpa < hi and lo < entry.dgpa + entry.dsize) or any(lo <= t < hi for t in entry.tables):
                self._tlb[slot] = None

    def stats(self) -> dict[str, int]:
        """Counters: ``tlb_hits``, ``tlb_misses``, ``walks``, ``table_reads``, ``faults``."""
        return {
            "tlb_hits": self._hits,
            "tlb_misses": self._misses,
            "walks": self._walks,
            "table_reads": self._reads,
            "faults": self._faults,
        }

    def reset_stats(self) -> None:
        """Sets every counter to zero."""
        self._hits = self._misses = self._walks = self._reads = self._faults = 0

    def __repr__(self) -> str:
        return (
            f"<Processor memory_bytes={self._mem_len} hypervisor={self._hsr} "
            f"vm_register={self._vmr} domain={Domain(self._dr).name}>"
        )


def _size(value: object) -> int:
    if isinstance(value, int) and value in (1, 2, 4, 8):
        return int(value)
    raise InvalidArgument("size", value, _SIZE)


def _reserved(entry: int, level: int) -> bool:
    """Whether a present entry at ``level`` has a reserved bit set."""
    if not entry & _PS:
        return False
    if level == 4:
        return True
    if level == 3:
        return bool(entry & _RSV_1G)
    if level == 2:
        return bool(entry & _RSV_2M)
    return False
