"""SEV-SNP launch measurement: pages folded one by one into a SHA-384 launch digest.

Design: SNP_LAUNCH_UPDATE extends the launch digest with a PAGE_INFO structure
per 4 KiB page (SNP firmware ABI, "PAGE_INFO" layout): the current digest, the
page's contents digest (SHA-384 of the page for normal and VMSA pages, zeros
for zero/unmeasured/secrets/CPUID pages), the structure length 0x70, the page
type, the IMI flag, the VMPL 1..3 permissions and the GPA.  The new digest is
SHA-384 of those 112 bytes.  VMSA pages are recorded at GPA 0xFFFFFFFFF000.
The same sequence of updates therefore gives the same 48 bytes that the
``sev-snp-measure`` tool and the hardware compute.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Sequence

from vmkernel.errors import InvalidArgument

from .memory import PAGE_SIZE

__all__ = ["VMSA_GPA", "LaunchDigest", "PageType"]

VMSA_GPA = 0xFFFFFFFFF000
_DIGEST = 48
_ZEROS = bytes(_DIGEST)


class PageType(enum.IntEnum):
    """PAGE_INFO page types of SNP_LAUNCH_UPDATE."""

    NORMAL = 0x01
    VMSA = 0x02
    ZERO = 0x03
    UNMEASURED = 0x04
    SECRETS = 0x05
    CPUID = 0x06


class LaunchDigest:
    """The running launch digest of one guest (the firmware's guest context)."""

    def __init__(self, seed: bytes = _ZEROS) -> None:
        if len(seed) != _DIGEST:
            raise InvalidArgument("launch digest seed", len(seed), f"{_DIGEST} bytes")
        self._ld = seed
        self.pages = 0

    @property
    def digest(self) -> bytes:
        return self._ld

    def _update(self, page_type: PageType, gpa: int, contents: bytes) -> None:
        info = self._ld + contents + struct.pack("<HBBBBBBQ", 0x70, int(page_type), 0, 0, 0, 0, 0, gpa)
        self._ld = hashlib.sha384(info).digest()
        self.pages += 1

    def update(self, page_type: PageType, gpa: int, page: bytes | None = None) -> None:
        """Extend with one page.  ``page`` is required (4096 bytes) for NORMAL and VMSA pages only."""
        if gpa % PAGE_SIZE or gpa < 0:
            raise InvalidArgument("gpa", gpa, f"a non-negative {PAGE_SIZE}-byte aligned address")
        if page_type in (PageType.NORMAL, PageType.VMSA):
            if page is None or len(page) != PAGE_SIZE:
                raise InvalidArgument("page", None if page is None else len(page), f"{PAGE_SIZE} bytes")
            self._update(page_type, gpa, hashlib.sha384(page).digest())
        else:
            self._update(page_type, gpa, _ZEROS)

    def update_normal_pages(self, start_gpa: int, data: bytes) -> None:
        """Measure consecutive pages of contents starting at ``start_gpa``."""
        if len(data) % PAGE_SIZE:
            raise InvalidArgument("data length", len(data), f"a multiple of {PAGE_SIZE}")
        view = memoryview(data)
        for off in range(0, len(data), PAGE_SIZE):
            self._update(
                PageType.NORMAL, start_gpa + off, hashlib.sha384(view[off : off + PAGE_SIZE]).digest()
            )

    def update_pages(self, page_type: PageType, gpas: Sequence[int], data: bytes | None = None) -> None:
        """Batched form of :meth:`update` over scattered pages."""
        for i, gpa in enumerate(gpas):
            page = None if data is None else data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
            self.update(page_type, gpa, page)

    def update_vmsa(self, page: bytes) -> None:
        self.update(PageType.VMSA, VMSA_GPA, page)
