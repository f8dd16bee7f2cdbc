"""Memory encryption engine: private guest pages stored under AES-XTS.

Design: a VM's physical memory is a :class:`PageStore`, a plain map from
page-aligned guest-physical address (GPA) to the 4 KiB that the memory chips
hold.  The engine sits between the store and its users.  The guest's accesses go
through the engine and see plaintext; the host and hypervisor read the store
directly and see ciphertext for pages marked private.  The cipher is AES-256-XTS
with the page's GPA as the 128-bit little-endian tweak, so the same plaintext at
two addresses encrypts differently, as in AMD's memory encryption.

Batches: callers hand the engine lists of pages, so one Python call covers a
whole batch and the per-page work is one ``cryptography`` XTS call (a few
microseconds with AES-NI).  A numpy formulation (two AES-ECB passes and the
GF(2^128) tweak masks for all pages at once) measured slower than that on
every batch size, so it serves only as the independent reference in the
tests.

Where pages live: the engine works on any store.  In a kernel with a
processor plugin the store is the VM's guest memory as the processor
translates it (so the host view, a saved memory image and the engine agree);
without one it is a :class:`DictPageStore`.  :class:`SplitPageStore` puts
GPAs from a boundary up (the entropy device's aperture at 2**40, which no
guest RAM reaches) into a second store.

Modes: in SEV-like mode a hypervisor write to a private page lands as raw bytes
(the guest later reads them decrypted, i.e. garbage); in SNP-like mode the
hardware forbids it and the write faults with :class:`TranslationFault`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from vmkernel.errors import InvalidArgument, TranslationFault

__all__ = [
    "PAGE_SIZE",
    "DictPageStore",
    "EncryptionMode",
    "MemoryEncryptionEngine",
    "PageStore",
    "SplitPageStore",
    "xts_pages",
]

PAGE_SIZE = 4096
_MAX_GPA = 1 << 52  # SEV-SNP guest physical addresses have at most 52 bits
_ZERO_PAGE = bytes(PAGE_SIZE)


class EncryptionMode(enum.Enum):
    """What the emulated hardware does when the hypervisor writes a private page."""

    SEV = "sev"  # the write lands as raw bytes
    SNP = "snp"  # the write faults (reverse-map table check)


@runtime_checkable
class PageStore(Protocol):
    """The memory that backs one VM, keyed by page-aligned guest-physical address.

    ``read_pages`` returns the stored bytes of each page (zeros for a page
    never written), concatenated; ``write_pages`` stores ``len(gpas)`` pages
    from ``data``; ``discard_pages`` forgets pages (they read as zeros again).
    """

    def read_pages(self, gpas: Sequence[int]) -> bytes: ...

    def write_pages(self, gpas: Sequence[int], data: bytes) -> None: ...

    def discard_pages(self, gpas: Sequence[int]) -> None: ...

    def pages(self) -> Iterable[int]: ...


class DictPageStore:
    """A sparse in-memory :class:`PageStore` (the default until guest memory plugs in)."""

    def __init__(self) -> None:
        self._pages: dict[int, bytes] = {}

    def read_pages(self, gpas: Sequence[int]) -> bytes:
        get = self._pages.get
        return b"".join([get(gpa, _ZERO_PAGE) for gpa in gpas])

    def write_pages(self, gpas: Sequence[int], data: bytes) -> None:
        view = memoryview(data)
        for i, gpa in enumerate(gpas):
            self._pages[gpa] = bytes(view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])

    def discard_pages(self, gpas: Sequence[int]) -> None:
        for gpa in gpas:
            self._pages.pop(gpa, None)

    def pages(self) -> Iterable[int]:
        return list(self._pages)


class SplitPageStore:
    """One address space over two stores: pages below ``boundary`` in ``low``, the others in ``high``.

    A batch that touches both is split, each store gets one call, and the
    pages come back in the order asked for.
    """

    def __init__(self, low: PageStore, high: PageStore, boundary: int) -> None:
        if boundary <= 0 or boundary % PAGE_SIZE:
            raise InvalidArgument("boundary", boundary, f"a positive multiple of {PAGE_SIZE}")
        self.low = low
        self.high = high
        self.boundary = boundary

    def _sides(self, gpas: Sequence[int]) -> tuple[list[int], list[int]]:
        low = [i for i, gpa in enumerate(gpas) if gpa < self.boundary]
        high = [i for i, gpa in enumerate(gpas) if gpa >= self.boundary]
        return low, high

    def read_pages(self, gpas: Sequence[int]) -> bytes:
        low, high = self._sides(gpas)
        if not high:
            return self.low.read_pages(gpas)
        if not low:
            return self.high.read_pages(gpas)
        out = bytearray(len(gpas) * PAGE_SIZE)
        for store, side in ((self.low, low), (self.high, high)):
            data = store.read_pages([gpas[i] for i in side])
            for j, i in enumerate(side):
                out[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = data[j * PAGE_SIZE : (j + 1) * PAGE_SIZE]
        return bytes(out)

    def write_pages(self, gpas: Sequence[int], data: bytes) -> None:
        low, high = self._sides(gpas)
        if not high:
            self.low.write_pages(gpas, data)
        elif not low:
            self.high.write_pages(gpas, data)
        else:
            view = memoryview(data)
            for store, side in ((self.low, low), (self.high, high)):
                part = b"".join([view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in side])
                store.write_pages([gpas[i] for i in side], part)

    def discard_pages(self, gpas: Sequence[int]) -> None:
        low, high = self._sides(gpas)
        if low:
            self.low.discard_pages([gpas[i] for i in low])
        if high:
            self.high.discard_pages([gpas[i] for i in high])

    def pages(self) -> Iterable[int]:
        return [*self.low.pages(), *self.high.pages()]


def _check_pages(gpas: Sequence[int], data: bytes | None = None) -> None:
    for gpa in gpas:
        if gpa % PAGE_SIZE or not 0 <= gpa < _MAX_GPA:
            raise InvalidArgument(
                "gpa", gpa, f"a {PAGE_SIZE}-byte aligned guest-physical address below 2**52"
            )
    if data is not None and len(data) != len(gpas) * PAGE_SIZE:
        raise InvalidArgument(
            "data length", len(data), f"{len(gpas)} pages of {PAGE_SIZE} bytes = {len(gpas) * PAGE_SIZE}"
        )


def _tweak(gpa: int) -> bytes:
    return gpa.to_bytes(16, "little")


def xts_pages(key: bytes, gpas: Sequence[int], data: bytes, *, decrypt: bool) -> bytes:
    """AES-XTS over whole pages, each with its own GPA tweak; returns the transformed bytes.

    ``key`` is 64 bytes (AES-256-XTS: data key then tweak key); page ``i`` of
    ``data`` is transformed with tweak ``gpas[i].to_bytes(16, "little")``.
    """
    out = []
    view = memoryview(data)
    for i, gpa in enumerate(gpas):
        cipher = Cipher(algorithms.AES(key), modes.XTS(_tweak(gpa)))
        one = cipher.decryptor() if decrypt else cipher.encryptor()
        out.append(one.update(view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]))
    return b"".join(out)


class MemoryEncryptionEngine:
    """One VM's view of its memory through the encryption engine.

    The key never leaves the engine (the emulated security module creates it
    and hands the engine to the VM context).  Guest accesses encrypt and
    decrypt private pages; ``host_read_pages`` and ``hypervisor_write`` see the
    store as the host does.
    """

    def __init__(self, store: PageStore, key: bytes, mode: EncryptionMode, *, vm: str = "") -> None:
        if len(key) != 64 or key[:32] == key[32:]:
            raise InvalidArgument("key", f"{len(key)} bytes", "64 bytes with distinct halves (AES-256-XTS)")
        self.store = store
        self.mode = mode
        self.vm = vm
        self._key = key
        self._private: set[int] = set()

    # -- page state ---------------------------------------------------------

    def mark_private(self, gpas: Sequence[int]) -> None:
        """Mark pages private (C-bit set): their stored bytes are now read through decryption."""
        _check_pages(gpas)
        self._private.update(gpas)

    def mark_shared(self, gpas: Sequence[int]) -> None:
        """Mark pages shared with the host: stored and read as plaintext."""
        _check_pages(gpas)
        self._private.difference_update(gpas)

    def is_private(self, gpa: int) -> bool:
        return gpa - gpa % PAGE_SIZE in self._private

    def private_pages(self) -> list[int]:
        return sorted(self._private)

    # -- guest view ------------------------------------------------------------

    def guest_write_pages(self, gpas: Sequence[int], data: bytes) -> None:
        """The guest writes whole pages: private ones are encrypted on the way to the store."""
        _check_pages(gpas, data)
        private = [i for i, gpa in enumerate(gpas) if gpa in self._private]
        if len(private) == len(gpas):
            self.store.write_pages(gpas, xts_pages(self._key, gpas, data, decrypt=False))
            return
        for i, gpa in enumerate(gpas):
            page = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
            if gpa in self._private:
                page = xts_pages(self._key, [gpa], page, decrypt=False)
            self.store.write_pages([gpa], page)

    def guest_read_pages(self, gpas: Sequence[int]) -> bytes:
        """The guest reads whole pages: private ones come back decrypted."""
        _check_pages(gpas)
        raw = self.store.read_pages(gpas)
        if all(gpa in self._private for gpa in gpas):
            return xts_pages(self._key, gpas, raw, decrypt=True)
        out = bytearray(raw)
        for i, gpa in enumerate(gpas):
            if gpa in self._private:
                sl = slice(i * PAGE_SIZE, (i + 1) * PAGE_SIZE)
                out[sl] = xts_pages(self._key, [gpa], raw[sl], decrypt=True)
        return bytes(out)

    def guest_read(self, gpa: int, n: int) -> bytes:
        """Read ``n`` bytes at any guest-physical address, as the guest sees them."""
        first, pages = self._span(gpa, n)
        data = self.guest_read_pages(pages)
        return data[gpa - first : gpa - first + n]

    def guest_write(self, gpa: int, data: bytes) -> None:
        """Write bytes at any guest-physical address as the guest (read-modify-write of whole pages)."""
        first, pages = self._span(gpa, len(data))
        buf = bytearray(self.guest_read_pages(pages))
        buf[gpa - first : gpa - first + len(data)] = data
        self.guest_write_pages(pages, bytes(buf))

    # -- host / hypervisor view -------------------------------------------------

    def host_read_pages(self, gpas: Sequence[int]) -> bytes:
        """What the host sees: the stored bytes (ciphertext for private pages)."""
        _check_pages(gpas)
        return self.store.read_pages(gpas)

    def hypervisor_write(self, gpa: int, data: bytes) -> None:
        """The hypervisor writes bytes without the VM's key.

        SEV-like: the bytes land raw in the store.  SNP-like: a write that
        touches a private page faults (the hardware's reverse-map check).
        """
        first, pages = self._span(gpa, len(data))
        if self.mode is EncryptionMode.SNP:
            for page in pages:
                if page in self._private:
                    raise TranslationFault("permission", 2, 1, max(gpa, page))
        buf = bytearray(self.store.read_pages(pages))
        buf[gpa - first : gpa - first + len(data)] = data
        self.store.write_pages(pages, bytes(buf))

    def hypervisor_write_pages(self, gpas: Sequence[int], data: bytes) -> None:
        """Batched whole-page form of :meth:`hypervisor_write`."""
        _check_pages(gpas, data)
        if self.mode is EncryptionMode.SNP:
            for gpa in gpas:
                if gpa in self._private:
                    raise TranslationFault("permission", 2, 1, gpa)
        self.store.write_pages(gpas, data)

    def scrub(self) -> None:
        """Forget the key (VM destroyed): stored ciphertext can no longer be read as plaintext."""
        self._key = bytes(range(64))  # a fixed non-secret key keeps the object usable but useless
        self._private.clear()

    @staticmethod
    def _span(gpa: int, n: int) -> tuple[int, list[int]]:
        if gpa < 0 or n < 0 or gpa + n > _MAX_GPA:
            raise InvalidArgument("address range", (gpa, n), "a range inside the 52-bit guest-physical space")
        first = gpa - gpa % PAGE_SIZE
        last = max(first, gpa + n - 1)
        return first, list(range(first, last - last % PAGE_SIZE + 1, PAGE_SIZE))
