"""The safe entropy device: hypervisor data read by the guest through its own decryption.

Design: for each request the device takes pages at guest-physical addresses
never used before under this VM's key (from an aperture above guest RAM), the
hypervisor fills them with its own data, and the guest reads them as private
memory, i.e. AES-XTS-decrypted with the VM key and the page address as tweak.
The hypervisor has no key, so whatever it writes (even predictable data)
reaches the guest as output it cannot predict.  Two checks keep a hostile
hypervisor from making the output repeat: a page address is never served
twice, and the digest of the hypervisor's page is never accepted twice
(:class:`EntropyDenied` for either).  Pages are released after the read.

SEV-like mode: the hypervisor writes straight into the private pages (the
write lands raw, as on SEV hardware).  SNP-like mode: such a write faults, so
the device takes the documented other path: the hypervisor writes fresh
*shared* pages, and the guest converts them to private (the page-state change
plus validation an SNP guest performs) without re-encrypting, then reads them
through decryption.  Both paths hand the guest the same function of
(key, address, hypervisor data).

Requests are served in batches of pages so one call costs two AES passes, not
one cipher call per page.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vmkernel.errors import EntropyDenied, InvalidArgument

from .memory import PAGE_SIZE, EncryptionMode, MemoryEncryptionEngine

__all__ = ["ENTROPY_APERTURE", "EntropyDevice", "EntropyStats"]

ENTROPY_APERTURE = 1 << 40  # above any guest RAM; 2**39 / 4096 pages before it runs out
_APERTURE_END = 1 << 51
_BATCH_PAGES = 256  # 1 MiB per AES pass
_MAX_READ = 1 << 30


@dataclass
class EntropyStats:
    requests: int = 0
    pages: int = 0
    bytes: int = 0
    denied_address: int = 0
    denied_digest: int = 0


class EntropyDevice:
    """``read(n)`` returns ``n`` bytes from freshly decrypted guest pages.

    ``source(n)`` is the hypervisor's data for ``n`` bytes; ``on_deny`` is told
    about each denied page (check name and value) before the error is raised.
    """

    def __init__(
        self,
        engine: MemoryEncryptionEngine,
        source: Callable[[int], bytes],
        *,
        vm: str = "",
        on_deny: Callable[[str, str], None] | None = None,
    ) -> None:
        self.engine = engine
        self.vm = vm or engine.vm
        self._source = source
        self._on_deny = on_deny
        self._next = ENTROPY_APERTURE
        self._used: set[int] = set()
        self._digests: set[bytes] = set()
        self.stats = EntropyStats()

    @property
    def path(self) -> str:
        """Which delivery path the device uses: ``direct-write`` (SEV) or ``shared-then-private`` (SNP)."""
        return "direct-write" if self.engine.mode is EncryptionMode.SEV else "shared-then-private"

    def read(self, n: int) -> bytes:
        """``n`` random bytes for the guest (``n`` >= 0)."""
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= _MAX_READ:
            raise InvalidArgument("n", n, f"an int in 0..{_MAX_READ}")
        self.stats.requests += 1
        out = []
        left = n
        while left > 0:
            pages = min(_BATCH_PAGES, -(-left // PAGE_SIZE))
            gpas = self._fresh(pages)
            chunk = self.serve(gpas, self._source(pages * PAGE_SIZE))
            out.append(chunk[: min(left, len(chunk))])
            left -= len(out[-1])
        return b"".join(out)

    def _fresh(self, pages: int) -> list[int]:
        start = self._next
        end = start + pages * PAGE_SIZE
        if end > _APERTURE_END:
            raise EntropyDenied(
                self.vm, "page address", f"{end:#x} beyond the entropy aperture (re-key the VM)"
            )
        self._next = end
        return list(range(start, end, PAGE_SIZE))

    def _deny(self, check: str, value: str) -> None:
        if check == "page address":
            self.stats.denied_address += 1
        else:
            self.stats.denied_digest += 1
        if self._on_deny is not None:
            self._on_deny(check, value)
        raise EntropyDenied(self.vm, check, value)

    def serve(self, gpas: Sequence[int], data: bytes) -> bytes:
        """The hypervisor offers ``data`` for the pages at ``gpas``; the guest's view comes back.

        Public so that a hostile hypervisor can be modelled: offering a used
        address or a page digest seen before is denied and nothing is read.
        """
        if len(data) != len(gpas) * PAGE_SIZE:
            raise InvalidArgument("data length", len(data), f"{len(gpas)} pages of {PAGE_SIZE} bytes")
        digests = []
        batch_gpas: set[int] = set()
        batch_digests: set[bytes] = set()
        view = memoryview(data)
        for i, gpa in enumerate(gpas):
            if gpa in self._used or gpa in batch_gpas:
                self._deny("page address", f"{gpa:#x}")
            d = hashlib.blake2b(view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE], digest_size=16).digest()
            if d in self._digests or d in batch_digests:
                self._deny("page digest", d.hex())
            batch_gpas.add(gpa)
            batch_digests.add(d)
            digests.append(d)
        self._used.update(gpas)
        self._digests.update(digests)
        engine = self.engine
        if engine.mode is EncryptionMode.SEV:
            engine.mark_private(gpas)
            engine.hypervisor_write_pages(gpas, data)  # lands raw in private memory
        else:
            engine.mark_shared(gpas)
            engine.hypervisor_write_pages(gpas, data)  # allowed: the pages are shared
            engine.mark_private(gpas)  # the guest's page-state change; contents are not re-encrypted
        try:
            out = engine.guest_read_pages(gpas)
        finally:
            engine.store.discard_pages(gpas)
            engine.mark_shared(gpas)
        self.stats.pages += len(gpas)
        self.stats.bytes += len(out)
        return out
