"""The SEV-SNP attestation report: the real 1184-byte layout, signing and parsing.

Design: the report is kept as its raw bytes plus a decoded view; verification
always works on the raw bytes (the signature covers 0x000-0x29F), so nothing
that the decoder ignores can slip past it.  Offsets follow the SNP firmware ABI
(ATTESTATION_REPORT): versions 2, 3 (CPUID family/model/stepping at 0x188) and 5
(mitigation vectors at 0x1F8) are understood.  The signature is ECDSA P-384 over
SHA-384 with r and s stored as 72-byte little-endian integers at 0x2A0 and 0x2E8.
The reported TCB uses the Milan/Genoa byte layout (boot loader, TEE, SNP and
microcode security versions).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from vmkernel.errors import InvalidArgument

__all__ = [
    "POLICY_DEBUG",
    "POLICY_MIGRATE_MA",
    "POLICY_RESERVED_ONE",
    "REPORT_SIZE",
    "SIGNED_SIZE",
    "AttestationReport",
    "Tcb",
    "reserved_violations",
    "sign_report",
]

REPORT_SIZE = 0x4A0  # 1184
SIGNED_SIZE = 0x2A0
SIG_R = slice(0x2A0, 0x2E8)
SIG_S = slice(0x2E8, 0x330)
SUPPORTED_VERSIONS = (2, 3, 5)

POLICY_SMT = 1 << 16
POLICY_RESERVED_ONE = 1 << 17  # must be set
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19
POLICY_SINGLE_SOCKET = 1 << 20
_POLICY_KNOWN = (1 << 26) - 1  # bits 26-63 are reserved, must be zero


@dataclass(frozen=True)
class Tcb:
    """A TCB version: security version numbers of the firmware components (Milan layout)."""

    bootloader: int = 0
    tee: int = 0
    snp: int = 0
    microcode: int = 0

    @classmethod
    def from_u64(cls, raw: int) -> Tcb:
        b = raw.to_bytes(8, "little")
        return cls(bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7])

    def to_u64(self) -> int:
        for name in ("bootloader", "tee", "snp", "microcode"):
            value = getattr(self, name)
            if not 0 <= value <= 255:
                raise InvalidArgument(f"tcb.{name}", value, "an integer 0..255")
        return int.from_bytes(
            bytes([self.bootloader, self.tee, 0, 0, 0, 0, self.snp, self.microcode]), "little"
        )

    def at_least(self, other: Tcb) -> bool:
        return (
            self.bootloader >= other.bootloader
            and self.tee >= other.tee
            and self.snp >= other.snp
            and self.microcode >= other.microcode
        )

    def as_dict(self) -> dict[str, int]:
        return {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp, "microcode": self.microcode}


def _fixed(name: str, value: bytes, size: int) -> bytes:
    if len(value) != size:
        raise InvalidArgument(name, len(value), f"{size} bytes")
    return value


@dataclass(frozen=True)
class AttestationReport:
    """Decoded fields of an SNP attestation report; ``raw`` is the exact 1184 bytes."""

    version: int = 2
    guest_svn: int = 0
    policy: int = POLICY_RESERVED_ONE | POLICY_SMT
    family_id: bytes = bytes(16)
    image_id: bytes = bytes(16)
    vmpl: int = 0
    sig_algo: int = 1
    current_tcb: int = 0
    platform_info: int = 0
    key_flags: int = 0  # AUTHOR_KEY_EN bit 0, MASK_CHIP_KEY bit 1, SIGNING_KEY bits 2-4 (0 = VCEK)
    report_data: bytes = bytes(64)
    measurement: bytes = bytes(48)
    host_data: bytes = bytes(32)
    id_key_digest: bytes = bytes(48)
    author_key_digest: bytes = bytes(48)
    report_id: bytes = bytes(32)
    report_id_ma: bytes = bytes(32)
    reported_tcb: int = 0
    cpuid_fam_id: int = 0
    cpuid_mod_id: int = 0
    cpuid_step: int = 0
    chip_id: bytes = bytes(64)
    committed_tcb: int = 0
    current_build: int = 0
    current_minor: int = 0
    current_major: int = 0
    committed_build: int = 0
    committed_minor: int = 0
    committed_major: int = 0
    launch_tcb: int = 0
    signature_r: int = 0
    signature_s: int = 0
    raw: bytes = field(default=b"", repr=False, compare=False)

    @property
    def debug(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)

    @property
    def migrate_ma(self) -> bool:
        return bool(self.policy & POLICY_MIGRATE_MA)

    @property
    def reported(self) -> Tcb:
        return Tcb.from_u64(self.reported_tcb)

    def body(self) -> bytes:
        """The signed part (0x000-0x29F) encoded from the fields."""
        out = bytearray(SIGNED_SIZE)
        struct.pack_into("<IIQ", out, 0x00, self.version, self.guest_svn, self.policy)
        out[0x10:0x20] = _fixed("family_id", self.family_id, 16)
        out[0x20:0x30] = _fixed("image_id", self.image_id, 16)
        struct.pack_into(
            "<IIQQI",
            out,
            0x30,
            self.vmpl,
            self.sig_algo,
            self.current_tcb,
            self.platform_info,
            self.key_flags,
        )
        out[0x50:0x90] = _fixed("report_data", self.report_data, 64)
        out[0x90:0xC0] = _fixed("measurement", self.measurement, 48)
        out[0xC0:0xE0] = _fixed("host_data", self.host_data, 32)
        out[0xE0:0x110] = _fixed("id_key_digest", self.id_key_digest, 48)
        out[0x110:0x140] = _fixed("author_key_digest", self.author_key_digest, 48)
        out[0x140:0x160] = _fixed("report_id", self.report_id, 32)
        out[0x160:0x180] = _fixed("report_id_ma", self.report_id_ma, 32)
        struct.pack_into("<Q", out, 0x180, self.reported_tcb)
        if self.version >= 3:
            struct.pack_into("<BBB", out, 0x188, self.cpuid_fam_id, self.cpuid_mod_id, self.cpuid_step)
        out[0x1A0:0x1E0] = _fixed("chip_id", self.chip_id, 64)
        struct.pack_into(
            "<QBBBxBBBxQ",
            out,
            0x1E0,
            self.committed_tcb,
            self.current_build,
            self.current_minor,
            self.current_major,
            self.committed_build,
            self.committed_minor,
            self.committed_major,
            self.launch_tcb,
        )
        return bytes(out)

    @classmethod
    def parse(cls, data: bytes) -> AttestationReport:
        """Decode a report.  Raises :class:`InvalidArgument` unless it is exactly 1184 bytes.

        Reserved bytes, versions and the signature are not judged here: see
        :func:`reserved_violations` and the verifier.
        """
        if len(data) != REPORT_SIZE:
            raise InvalidArgument("report length", len(data), f"exactly {REPORT_SIZE} bytes")
        version, svn, policy = struct.unpack_from("<IIQ", data, 0)
        vmpl, sig_algo, current_tcb, platform_info, key_flags = struct.unpack_from("<IIQQI", data, 0x30)
        (reported_tcb,) = struct.unpack_from("<Q", data, 0x180)
        fam, mod, step = struct.unpack_from("<BBB", data, 0x188) if version >= 3 else (0, 0, 0)
        (committed_tcb, cb, cmi, cma, mb, mmi, mma, launch_tcb) = struct.unpack_from(
            "<QBBBxBBBxQ", data, 0x1E0
        )
        return cls(
            version=version,
            guest_svn=svn,
            policy=policy,
            family_id=data[0x10:0x20],
            image_id=data[0x20:0x30],
            vmpl=vmpl,
            sig_algo=sig_algo,
            current_tcb=current_tcb,
            platform_info=platform_info,
            key_flags=key_flags,
            report_data=data[0x50:0x90],
            measurement=data[0x90:0xC0],
            host_data=data[0xC0:0xE0],
            id_key_digest=data[0xE0:0x110],
            author_key_digest=data[0x110:0x140],
            report_id=data[0x140:0x160],
            report_id_ma=data[0x160:0x180],
            reported_tcb=reported_tcb,
            cpuid_fam_id=fam,
            cpuid_mod_id=mod,
            cpuid_step=step,
            chip_id=data[0x1A0:0x1E0],
            committed_tcb=committed_tcb,
            current_build=cb,
            current_minor=cmi,
            current_major=cma,
            committed_build=mb,
            committed_minor=mmi,
            committed_major=mma,
            launch_tcb=launch_tcb,
            signature_r=int.from_bytes(data[SIG_R], "little"),
            signature_s=int.from_bytes(data[SIG_S], "little"),
            raw=bytes(data),
        )

    def summary(self) -> dict[str, Any]:
        """The fields people look at, JSON-ready (hex for byte strings)."""
        return {
            "version": self.version,
            "guest_svn": self.guest_svn,
            "policy": f"{self.policy:#x}",
            "debug": self.debug,
            "migrate_ma": self.migrate_ma,
            "vmpl": self.vmpl,
            "sig_algo": self.sig_algo,
            "report_data": self.report_data.hex(),
            "measurement": self.measurement.hex(),
            "host_data": self.host_data.hex(),
            "reported_tcb": self.reported.as_dict(),
            "chip_id": self.chip_id.hex(),
        }

    def with_fields(self, **changes: Any) -> AttestationReport:
        return replace(self, **changes)


def sign_report(
    report: AttestationReport, key: ec.EllipticCurvePrivateKey, *, big_endian: bool = False
) -> bytes:
    """Encode ``report`` and sign it as the security module does.

    ``big_endian`` stores r and s the wrong way round, to build bad inputs.
    """
    body = report.body()
    der = key.sign(body, ec.ECDSA(hashes.SHA384()))
    r, s = utils.decode_dss_signature(der)
    order: Literal["big", "little"] = "big" if big_endian else "little"
    sig = r.to_bytes(72, order) + s.to_bytes(72, order)
    return body + sig + bytes(REPORT_SIZE - SIGNED_SIZE - len(sig))


def _reserved_ranges(version: int) -> list[tuple[int, int]]:
    ranges = [(0x4C, 0x50), (0x1EB, 0x1EC), (0x1EF, 0x1F0), (0x330, REPORT_SIZE)]
    ranges.append((0x18B, 0x1A0) if version >= 3 else (0x188, 0x1A0))
    ranges.append((0x208, 0x2A0) if version >= 5 else (0x1F8, 0x2A0))
    # bits 5-31 of the key flags word are reserved
    return sorted(ranges)


def reserved_violations(data: bytes, *, signature_fields: bool = True) -> list[str]:
    """Describe every reserved field of a 1184-byte report that is not zero (empty when clean).

    ``signature_fields=False`` leaves out the upper 24 bytes of r and s, for a
    caller that judges the signature encoding itself.
    """
    version = int.from_bytes(data[0:4], "little")
    found = []
    for lo, hi in _reserved_ranges(version):
        chunk = data[lo:hi]
        if any(chunk):
            first = next(i for i, b in enumerate(chunk) if b)
            found.append(f"reserved bytes {lo:#05x}-{hi - 1:#05x} non-zero at {lo + first:#05x}")
    flags = int.from_bytes(data[0x48:0x4C], "little")
    if flags >> 5:
        found.append(f"reserved key-flag bits 5-31 at 0x048 set ({flags:#x})")
    policy = int.from_bytes(data[0x08:0x10], "little")
    if policy & ~_POLICY_KNOWN:
        found.append(f"reserved policy bits 26-63 set ({policy:#x})")
    if not policy & POLICY_RESERVED_ONE:
        found.append(f"policy bit 17 (must be one) is clear ({policy:#x})")
    # r and s are 48-byte integers in 72-byte fields: the upper 24 bytes are reserved
    for name, sl in (("r", SIG_R), ("s", SIG_S)) if signature_fields else ():
        tail = data[sl][48:]
        if any(tail):
            found.append(f"signature {name} bytes {sl.start + 48:#05x}-{sl.stop - 1:#05x} non-zero")
    return found
