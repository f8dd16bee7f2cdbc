"""The host security module: per-VM keys, measured launch, signed reports, secret delivery.

Design: one :class:`SecurityModule` per emulated host, like AMD's secure
processor on each chip: it has a chip id, a TCB version and a VCEK signed by
the vendor's ASK for its generation.  A launch goes LAUNCH_START (a fresh
memory-encryption key and a :class:`GuestContext`), LAUNCH_UPDATE (pages are
encrypted into private memory and folded into the launch digest),
LAUNCH_FINISH (the measurement is frozen).  The guest then asks for reports
carrying its own 64 bytes of REPORT_DATA; the module fills in everything else
and signs with the VCEK.  Keys never leave the module: the engine it hands out
encrypts and decrypts on its own.

:class:`LaunchImage` is what a confidential VM boots: firmware pages, zero
pages, a secrets page, a CPUID page and one VMSA page per vCPU.  The same
function measures an image for a launch and computes its reference value for a
policy, so the two cannot drift apart.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from vmkernel.errors import IllegalTransition, InvalidArgument

from .certs import Vendor, new_p384_key
from .measure import LaunchDigest, PageType
from .memory import PAGE_SIZE, DictPageStore, EncryptionMode, MemoryEncryptionEngine, PageStore
from .report import (
    POLICY_DEBUG,
    POLICY_MIGRATE_MA,
    POLICY_RESERVED_ONE,
    POLICY_SMT,
    AttestationReport,
    Tcb,
    sign_report,
)

__all__ = [
    "DEFAULT_TCB",
    "FIRMWARE_GPA",
    "SECRETS_GPA",
    "GuestContext",
    "LaunchImage",
    "SecurityModule",
    "default_firmware",
    "guest_policy",
]

DEFAULT_TCB = Tcb(bootloader=3, tee=0, snp=8, microcode=115)
FIRMWARE_GPA = 0x0080_0000
ZERO_GPA = 0x007F_0000
ZERO_PAGES = 4
SECRETS_GPA = 0x007F_4000
CPUID_GPA = 0x007F_5000
DELIVERY_GPA = 0x007F_6000  # where the module places a released secret (private, not measured)


@functools.lru_cache(maxsize=8)
def default_firmware(pages: int = 16) -> bytes:
    """The built-in guest firmware image: deterministic bytes, so its measurement is a fixed reference."""
    out = bytearray()
    counter = 0
    while len(out) < pages * PAGE_SIZE:
        out += hashlib.sha512(b"vmkernel confidential firmware v1" + counter.to_bytes(4, "little")).digest()
        counter += 1
    return bytes(out[: pages * PAGE_SIZE])


def _vmsa_page(vcpu: int) -> bytes:
    page = bytearray(PAGE_SIZE)
    page[0:8] = b"VMSA\x00\x00\x00\x01"
    page[8:12] = vcpu.to_bytes(4, "little")
    page[0x100:0x108] = (0xFFFFFFF0 if vcpu == 0 else 0).to_bytes(8, "little")  # reset vector of the BSP
    return bytes(page)


def guest_policy(*, debug: bool = False, migrate_ma: bool = False, smt: bool = True) -> int:
    """The 64-bit SNP guest policy word (ABI 0.0, bit 17 set as required)."""
    policy = POLICY_RESERVED_ONE
    if smt:
        policy |= POLICY_SMT
    if debug:
        policy |= POLICY_DEBUG
    if migrate_ma:
        policy |= POLICY_MIGRATE_MA
    return policy


@dataclass(frozen=True)
class LaunchImage:
    """The initial memory of a confidential VM."""

    firmware: bytes = field(default_factory=default_firmware)
    vcpus: int = 1

    def __post_init__(self) -> None:
        if not self.firmware or len(self.firmware) % PAGE_SIZE:
            raise InvalidArgument(
                "firmware length", len(self.firmware), f"a non-zero multiple of {PAGE_SIZE}"
            )
        if not 1 <= self.vcpus <= 512:
            raise InvalidArgument("vcpus", self.vcpus, "1..512")

    def reference_measurement(self) -> bytes:
        """The launch digest this image produces (what a policy lists)."""
        digest = LaunchDigest()
        self._measure(digest)
        return digest.digest

    def _measure(self, digest: LaunchDigest) -> None:
        self._measure_memory(digest)
        for vcpu in range(self.vcpus):
            digest.update_vmsa(_vmsa_page(vcpu))

    def _measure_memory(self, digest: LaunchDigest) -> None:
        digest.update_normal_pages(FIRMWARE_GPA, self.firmware)
        digest.update_pages(PageType.ZERO, [ZERO_GPA + i * PAGE_SIZE for i in range(ZERO_PAGES)])
        digest.update(PageType.SECRETS, SECRETS_GPA)
        digest.update(PageType.CPUID, CPUID_GPA)

    def reference_measurements(self, max_vcpus: int) -> list[bytes]:
        """The measurements of this image with 1..max_vcpus vCPUs, in one pass."""
        return list(_reference_measurements(self.firmware, max_vcpus))

    def firmware_gpas(self) -> list[int]:
        return [FIRMWARE_GPA + off for off in range(0, len(self.firmware), PAGE_SIZE)]


@functools.lru_cache(maxsize=16)
def _reference_measurements(firmware: bytes, max_vcpus: int) -> tuple[bytes, ...]:
    digest = LaunchDigest()
    LaunchImage(firmware=firmware)._measure_memory(digest)
    out = []
    for vcpu in range(max_vcpus):
        digest.update_vmsa(_vmsa_page(vcpu))
        out.append(digest.digest)
    return tuple(out)


@dataclass
class GuestContext:
    """The security module's state for one guest."""

    vm: str
    engine: MemoryEncryptionEngine
    policy: int
    host_data: bytes
    digest: LaunchDigest = field(default_factory=LaunchDigest)
    report_id: bytes = field(default_factory=lambda: os.urandom(32))
    measurement: bytes | None = None
    reports: int = 0

    @property
    def finished(self) -> bool:
        return self.measurement is not None


class SecurityModule:
    """The emulated secure processor of one host."""

    def __init__(
        self,
        host: str,
        vendor: Vendor,
        *,
        generation: str = "Milan",
        tcb: Tcb = DEFAULT_TCB,
        chip_id: bytes | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.host = host
        self.generation = generation
        self.tcb = tcb
        self._rng = rng
        self.chip_id = chip_id if chip_id is not None else self._random(64)
        self._vcek_key = new_p384_key(rng)
        self.vcek = vendor.issue_vcek(generation, self.chip_id, tcb, self._vcek_key.public_key())
        roots = vendor.roots(generation)
        self.ask = roots.ask
        self.ark = roots.ark
        self.guests: dict[str, GuestContext] = {}

    def _random(self, n: int) -> bytes:
        return self._rng.randbytes(n) if self._rng is not None else os.urandom(n)

    def chain_der(self) -> tuple[bytes, bytes, bytes]:
        """VCEK, ASK and ARK as DER, as the host's certificate cache serves them."""
        enc = serialization.Encoding.DER
        return self.vcek.public_bytes(enc), self.ask.public_bytes(enc), self.ark.public_bytes(enc)

    def chain(self) -> tuple[x509.Certificate, x509.Certificate, x509.Certificate]:
        return self.vcek, self.ask, self.ark

    # -- launch ------------------------------------------------------------------

    def launch_start(
        self,
        vm: str,
        *,
        policy: int,
        mode: EncryptionMode = EncryptionMode.SEV,
        store: PageStore | None = None,
        host_data: bytes = bytes(32),
    ) -> GuestContext:
        """LAUNCH_START: a fresh key for ``vm`` and an empty launch digest."""
        if len(host_data) != 32:
            raise InvalidArgument("host_data", len(host_data), "32 bytes")
        while True:
            key = self._random(64)
            if key[:32] != key[32:]:
                break
        engine = MemoryEncryptionEngine(store if store is not None else DictPageStore(), key, mode, vm=vm)
        ctx = GuestContext(
            vm=vm, engine=engine, policy=policy, host_data=host_data, report_id=self._random(32)
        )
        self.guests[vm] = ctx
        return ctx

    def launch_update(
        self, ctx: GuestContext, page_type: PageType, gpas: list[int], data: bytes | None = None
    ) -> None:
        """LAUNCH_UPDATE: encrypt pages into private memory and extend the launch digest.

        ``data`` holds the contents of NORMAL pages; other types are measured
        as zeros (zero, unmeasured, secrets and CPUID pages).
        """
        self._check_open(ctx)
        if page_type is PageType.VMSA:
            raise InvalidArgument("page_type", page_type.name, "a memory page type (use launch_update_vmsa)")
        ctx.engine.mark_private(gpas)
        if page_type is PageType.NORMAL:
            if data is None or len(data) != len(gpas) * PAGE_SIZE:
                raise InvalidArgument("data", None if data is None else len(data), f"{len(gpas)} pages")
            ctx.engine.guest_write_pages(gpas, data)
            ctx.digest.update_pages(page_type, gpas, data)
        else:
            ctx.engine.guest_write_pages(gpas, bytes(PAGE_SIZE * len(gpas)))
            ctx.digest.update_pages(page_type, gpas)

    def launch_update_vmsa(self, ctx: GuestContext, page: bytes) -> None:
        """LAUNCH_UPDATE of a vCPU's save area (kept outside guest memory)."""
        self._check_open(ctx)
        ctx.digest.update_vmsa(page)

    def launch_image(self, ctx: GuestContext, image: LaunchImage) -> bytes:
        """Load and measure a whole :class:`LaunchImage`, then finish; returns the measurement."""
        self.launch_update(ctx, PageType.NORMAL, image.firmware_gpas(), image.firmware)
        self.launch_update(ctx, PageType.ZERO, [ZERO_GPA + i * PAGE_SIZE for i in range(ZERO_PAGES)])
        self.launch_update(ctx, PageType.SECRETS, [SECRETS_GPA])
        self.launch_update(ctx, PageType.CPUID, [CPUID_GPA])
        for vcpu in range(image.vcpus):
            self.launch_update_vmsa(ctx, _vmsa_page(vcpu))
        return self.launch_finish(ctx)

    @staticmethod
    def _check_open(ctx: GuestContext) -> None:
        if ctx.finished:
            raise IllegalTransition("guest context", ctx.vm, "finished", "launch update", ["started"])

    def launch_finish(self, ctx: GuestContext) -> bytes:
        """LAUNCH_FINISH: freeze the measurement."""
        if ctx.measurement is None:
            ctx.measurement = ctx.digest.digest
        return ctx.measurement

    # -- reports -----------------------------------------------------------------

    def report(self, ctx: GuestContext, report_data: bytes, *, vmpl: int = 0) -> bytes:
        """MSG_REPORT_REQ from the guest: a signed 1184-byte report with its REPORT_DATA."""
        if ctx.measurement is None:
            raise IllegalTransition("guest context", ctx.vm, "launching", "attestation report", ["finished"])
        if len(report_data) != 64:
            raise InvalidArgument("report_data", len(report_data), "64 bytes")
        if not 0 <= vmpl <= 3:
            raise InvalidArgument("vmpl", vmpl, "0..3")
        ctx.reports += 1
        tcb = self.tcb.to_u64()
        fields = AttestationReport(
            version=2,
            policy=ctx.policy,
            vmpl=vmpl,
            sig_algo=1,
            current_tcb=tcb,
            platform_info=1,
            report_data=report_data,
            measurement=ctx.measurement,
            host_data=ctx.host_data,
            report_id=ctx.report_id,
            reported_tcb=tcb,
            chip_id=self.chip_id,
            committed_tcb=tcb,
            current_build=4,
            current_minor=52,
            current_major=1,
            committed_build=4,
            committed_minor=52,
            committed_major=1,
            launch_tcb=tcb,
        )
        return sign_report(fields, self._vcek_key)

    def sign(self, fields: AttestationReport, *, big_endian: bool = False) -> bytes:
        """Sign arbitrary report fields with this chip's VCEK (to build faulty-firmware inputs)."""
        return sign_report(fields, self._vcek_key, big_endian=big_endian)

    # -- secret delivery -----------------------------------------------------------

    def deliver(self, ctx: GuestContext, sealed: bytes) -> int:
        """Place a sealed secret in the guest's private delivery pages; returns the GPA.

        The blob is written through the engine, so the host sees only ciphertext.
        """
        blob = len(sealed).to_bytes(4, "little") + sealed
        pages = -(-len(blob) // PAGE_SIZE)
        gpas = [DELIVERY_GPA + i * PAGE_SIZE for i in range(pages)]
        ctx.engine.mark_private(gpas)
        ctx.engine.guest_write_pages(gpas, blob + bytes(pages * PAGE_SIZE - len(blob)))
        return DELIVERY_GPA

    def destroy(self, vm: str) -> None:
        ctx = self.guests.pop(vm, None)
        if ctx is not None:
            ctx.engine.scrub()
