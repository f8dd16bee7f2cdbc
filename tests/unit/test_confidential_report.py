"""The SEV-SNP report layout: offsets, round trip, signature encoding, reserved fields, a real report."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from vmk_confidential.report import (
    REPORT_SIZE,
    SIGNED_SIZE,
    AttestationReport,
    Tcb,
    reserved_violations,
    sign_report,
)

from vmkernel.errors import InvalidArgument

DATA = Path(__file__).resolve().parents[1] / "data" / "confidential"


def real_report() -> bytes:
    return bytes.fromhex((DATA / "report_milan.hex").read_text().strip())


def test_field_offsets_follow_the_abi() -> None:
    rep = AttestationReport(
        version=2,
        guest_svn=7,
        policy=0x30000 | (1 << 19),
        vmpl=3,
        sig_algo=1,
        report_data=bytes(range(64)),
        measurement=b"\xaa" * 48,
        host_data=b"\xbb" * 32,
        reported_tcb=Tcb(3, 0, 8, 115).to_u64(),
        chip_id=b"\xcc" * 64,
    )
    body = rep.body()
    assert len(body) == SIGNED_SIZE == 0x2A0
    assert struct.unpack_from("<Q", body, 0x08)[0] >> 19 & 1 == 1  # DEBUG is bit 19 of POLICY
    assert struct.unpack_from("<I", body, 0x30)[0] == 3  # VMPL
    assert struct.unpack_from("<I", body, 0x34)[0] == 1  # SIG_ALGO
    assert body[0x50:0x90] == bytes(range(64))  # REPORT_DATA
    assert body[0x90:0xC0] == b"\xaa" * 48  # MEASUREMENT
    assert body[0xC0:0xE0] == b"\xbb" * 32  # HOST_DATA
    assert body[0x180:0x188] == bytes([3, 0, 0, 0, 0, 0, 8, 115])  # REPORTED_TCB, Milan layout
    assert body[0x1A0:0x1E0] == b"\xcc" * 64  # CHIP_ID
    assert rep.debug and not rep.migrate_ma


def test_signature_is_little_endian_r_and_s_at_0x2a0() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    raw = sign_report(AttestationReport(report_data=b"\x01" * 64), key)
    assert len(raw) == REPORT_SIZE == 1184
    r = int.from_bytes(raw[0x2A0:0x2E8], "little")
    s = int.from_bytes(raw[0x2E8:0x330], "little")
    key.public_key().verify(utils.encode_dss_signature(r, s), raw[:0x2A0], ec.ECDSA(hashes.SHA384()))
    assert raw[0x2A0 + 48 : 0x2E8] == bytes(24) and not any(raw[0x330:])
    assert reserved_violations(raw) == []


def test_real_milan_report_parses_and_reencodes_exactly() -> None:
    raw = real_report()
    rep = AttestationReport.parse(raw)
    assert rep.version == 2 and rep.sig_algo == 1 and rep.vmpl == 0
    assert rep.policy == 0x30000 and not rep.debug and not rep.migrate_ma
    assert rep.reported == Tcb(bootloader=3, tee=0, snp=8, microcode=115)
    assert rep.measurement.hex().startswith("7a1e5c266c0108db")
    assert rep.body() == raw[:SIGNED_SIZE]
    assert reserved_violations(raw) == []


@pytest.mark.parametrize(
    ("offset", "what"),
    [
        (0x4C, "0x04c"),
        (0x190, "0x188"),
        (0x1EB, "0x1eb"),
        (0x250, "0x1f8"),
        (0x400, "0x330"),
        (0x2D8, "signature r"),
    ],
)
def test_each_reserved_field_is_detected(offset: int, what: str) -> None:
    raw = bytearray(real_report())
    raw[offset] = 1
    found = reserved_violations(bytes(raw))
    assert len(found) == 1 and what in found[0]


def test_policy_reserved_bits_are_detected() -> None:
    raw = bytearray(real_report())
    raw[0x08 + 2] &= ~0x02  # clear bit 17, which must be one
    assert any("bit 17" in f for f in reserved_violations(bytes(raw)))
    raw = bytearray(real_report())
    raw[0x0F] = 0x80  # bit 63
    assert any("26-63" in f for f in reserved_violations(bytes(raw)))


def test_version_3_cpuid_bytes_are_fields_not_reserved() -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    raw = sign_report(AttestationReport(version=3, cpuid_fam_id=0x19, cpuid_mod_id=1, cpuid_step=1), key)
    assert raw[0x188:0x18B] == bytes([0x19, 1, 1]) and reserved_violations(raw) == []
    assert AttestationReport.parse(raw).cpuid_fam_id == 0x19


def test_parse_rejects_wrong_lengths_and_fields_check_sizes() -> None:
    with pytest.raises(InvalidArgument, match="report length"):
        AttestationReport.parse(bytes(100))
    with pytest.raises(InvalidArgument, match="report_data"):
        AttestationReport(report_data=b"short").body()
    with pytest.raises(InvalidArgument, match="tcb"):
        Tcb(bootloader=300).to_u64()
