"""Evidence verification: every check runs, every failure is named by a reason code.

Design: the verifier never stops at the first problem and never reports
success by omission.  It returns the list of checks it ran and one
:class:`Failure` per failed check; evidence passes only when the list of
failures is empty *and* every mandatory check ran.  When a step cannot run
(a VCEK that does not parse, a report of the wrong length) the checks that
depend on it fail with their own code instead of being skipped.

The trust root is the ARK pinned in the policy for the VCEK's generation; an
ARK shipped in the evidence is only compared with it, never used.
"""

from __future__ import annotations

import enum
import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.utils import CryptographyDeprecationWarning

from .certs import generation_of, vcek_info
from .policy import ReferencePolicy
from .report import (
    REPORT_SIZE,
    SIG_R,
    SIG_S,
    SIGNED_SIZE,
    SUPPORTED_VERSIONS,
    AttestationReport,
    reserved_violations,
)

__all__ = [
    "MANDATORY_CHECKS",
    "Failure",
    "Reason",
    "Verification",
    "bind_report_data",
    "verify_evidence",
]


class Reason(enum.StrEnum):
    """Why evidence was rejected.  One code per distinct failure."""

    REPORT_TRUNCATED = "REPORT_TRUNCATED"
    REPORT_OVERLONG = "REPORT_OVERLONG"
    VERSION_UNSUPPORTED = "VERSION_UNSUPPORTED"
    RESERVED_NONZERO = "RESERVED_NONZERO"
    SIG_ALGO_UNSUPPORTED = "SIG_ALGO_UNSUPPORTED"
    SIGNATURE_BIG_ENDIAN = "SIGNATURE_BIG_ENDIAN"
    SIGNATURE_INVALID = "SIGNATURE_INVALID"
    CERT_MALFORMED = "CERT_MALFORMED"
    ROOT_NOT_PINNED = "ROOT_NOT_PINNED"
    CHAIN_GENERATION_MISMATCH = "CHAIN_GENERATION_MISMATCH"
    ASK_NOT_ISSUED_BY_ARK = "ASK_NOT_ISSUED_BY_ARK"
    VCEK_NOT_ISSUED_BY_ASK = "VCEK_NOT_ISSUED_BY_ASK"
    VCEK_TCB_MISMATCH = "VCEK_TCB_MISMATCH"
    VCEK_CHIP_MISMATCH = "VCEK_CHIP_MISMATCH"
    MEASUREMENT_NOT_ALLOWED = "MEASUREMENT_NOT_ALLOWED"
    TCB_BELOW_MINIMUM = "TCB_BELOW_MINIMUM"
    DEBUG_ENABLED = "DEBUG_ENABLED"
    MIGRATE_MA_ENABLED = "MIGRATE_MA_ENABLED"
    VMPL_NOT_ALLOWED = "VMPL_NOT_ALLOWED"
    HOST_DATA_NOT_ALLOWED = "HOST_DATA_NOT_ALLOWED"
    REPORT_DATA_MISMATCH = "REPORT_DATA_MISMATCH"
    NONCE_MISMATCH = "NONCE_MISMATCH"
    KEY_BINDING_MISMATCH = "KEY_BINDING_MISMATCH"
    NONCE_UNKNOWN = "NONCE_UNKNOWN"
    NONCE_EXPIRED = "NONCE_EXPIRED"
    NONCE_REPLAYED = "NONCE_REPLAYED"
    EVIDENCE_MALFORMED = "EVIDENCE_MALFORMED"


# Checks every verification must run before it may pass.
MANDATORY_CHECKS = (
    "report_length",
    "report_version",
    "reserved_fields",
    "sig_algo",
    "signature",
    "root_pinned",
    "chain_generation",
    "ask_signature",
    "vcek_signature",
    "vcek_tcb",
    "vcek_chip",
    "measurement",
    "minimum_tcb",
    "debug",
    "migrate_ma",
    "vmpl",
    "host_data",
    "report_data",
)


@dataclass(frozen=True)
class Failure:
    code: Reason
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code.value, "detail": self.detail}


@dataclass
class Verification:
    """The outcome of :func:`verify_evidence`."""

    checks: list[str] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    report: AttestationReport | None = None

    @property
    def codes(self) -> list[str]:
        return [f.code.value for f in self.failures]

    @property
    def passed(self) -> bool:
        return not self.failures and all(c in self.checks for c in MANDATORY_CHECKS)

    def fail(self, code: Reason, detail: str) -> None:
        self.failures.append(Failure(code, detail))

    def summary(self) -> dict[str, Any]:
        return {
            "checks": list(self.checks),
            "failures": [f.as_dict() for f in self.failures],
            "report": self.report.summary() if self.report is not None else None,
        }


def bind_report_data(nonce: bytes, public_key_der: bytes) -> bytes:
    """REPORT_DATA binding a challenge nonce and the guest's public key (SPKI DER).

    The first 32 bytes are SHA-256 of the nonce and the last 32 SHA-256 of the
    key, so a verifier can tell a wrong nonce from a wrong key.
    """
    return (
        hashlib.sha256(b"vmkernel-nonce\x00" + nonce).digest()
        + hashlib.sha256(b"vmkernel-key\x00" + public_key_der).digest()
    )


def _load_cert(der: bytes | None, name: str, v: Verification) -> x509.Certificate | None:
    if der is None:
        v.fail(Reason.CERT_MALFORMED, f"{name} certificate missing from the evidence")
        return None
    try:
        with warnings.catch_warnings():
            # AMD's real VCEKs carry a serial number RFC 5280 disallows; they are still AMD's certificates
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        v.fail(Reason.CERT_MALFORMED, f"{name} certificate does not parse as DER X.509: {exc}")
        return None


def _spki_of(der: bytes) -> bytes | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            cert = x509.load_der_x509_certificate(der)
        return cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except ValueError:
        return None


_CACHE_LIMIT = 4096


def _issued_by(
    cert: x509.Certificate, issuer: x509.Certificate, cache: dict[bytes, bool] | None = None
) -> bool:
    """Whether ``issuer`` signed ``cert``; ``cache`` remembers verdicts by the exact DER bytes of both."""
    key = b""
    if cache is not None:
        key = hashlib.sha256(_der(issuer) + b"\x00" + _der(cert)).digest()
        if key in cache:
            return cache[key]
    try:
        cert.verify_directly_issued_by(issuer)
        ok = True
    except (ValueError, TypeError, InvalidSignature):
        ok = False
    if cache is not None:
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[key] = ok
    return ok


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _ecdsa_ok(key: ec.EllipticCurvePublicKey, body: bytes, r: int, s: int) -> bool:
    if not (0 < r < 1 << 384 and 0 < s < 1 << 384):
        return False
    try:
        key.verify(utils.encode_dss_signature(r, s), body, ec.ECDSA(hashes.SHA384()))
        return True
    except InvalidSignature:
        return False


def _check_chain(
    v: Verification,
    policy: ReferencePolicy,
    vcek: x509.Certificate | None,
    ask: x509.Certificate | None,
    ark_der: bytes | None,
    cache: dict[bytes, bool] | None,
) -> None:
    gen = generation_of(vcek) if vcek is not None else None
    pinned = policy.pinned_roots.get(gen) if gen is not None else None
    v.checks.append("root_pinned")
    if pinned is None:
        v.fail(Reason.ROOT_NOT_PINNED, f"no root is pinned for CPU generation {gen!r}")
    elif ark_der is not None and _spki_of(ark_der) != policy.pinned_key(gen or ""):
        v.fail(Reason.ROOT_NOT_PINNED, f"the ARK in the evidence is not the root pinned for {gen}")
    v.checks.append("chain_generation")
    ask_gen = generation_of(ask) if ask is not None else None
    if gen is None or ask_gen != gen:
        v.fail(Reason.CHAIN_GENERATION_MISMATCH, f"ASK is for generation {ask_gen!r}, VCEK for {gen!r}")
    v.checks.append("ask_signature")
    if ask is None or pinned is None or not _issued_by(ask, pinned, cache):
        v.fail(Reason.ASK_NOT_ISSUED_BY_ARK, f"ASK is not signed by the pinned {gen} root")
    v.checks.append("vcek_signature")
    if vcek is None or ask is None or not _issued_by(vcek, ask, cache):
        v.fail(Reason.VCEK_NOT_ISSUED_BY_ASK, "VCEK is not signed by the ASK in the evidence")


def verify_evidence(
    report: bytes,
    vcek_der: bytes | None,
    ask_der: bytes | None,
    ark_der: bytes | None,
    policy: ReferencePolicy,
    *,
    expected_report_data: bytes | None = None,
    nonce: bytes | None = None,
    public_key_der: bytes | None = None,
    chain_cache: dict[bytes, bool] | None = None,
) -> Verification:
    """Judge an SNP report and its VCEK/ASK(/ARK) chain against ``policy``.

    REPORT_DATA must equal ``bind_report_data(nonce, public_key_der)`` when
    both are given, or ``expected_report_data`` when that is given; with none
    of them the ``report_data`` check fails (a verifier never skips it).
    ``chain_cache`` (a dict the caller keeps) remembers certificate signature
    checks by the exact bytes of certificate and issuer.
    """
    v = Verification()
    vcek = _load_cert(vcek_der, "VCEK", v)
    ask = _load_cert(ask_der, "ASK", v)
    _check_chain(v, policy, vcek, ask, ark_der, chain_cache)

    v.checks.append("report_length")
    if len(report) < REPORT_SIZE:
        v.fail(Reason.REPORT_TRUNCATED, f"report is {len(report)} bytes, expected {REPORT_SIZE}")
        return v
    if len(report) > REPORT_SIZE:
        v.fail(Reason.REPORT_OVERLONG, f"report is {len(report)} bytes, expected {REPORT_SIZE}")
        return v
    rep = AttestationReport.parse(report)
    v.report = rep

    v.checks.append("report_version")
    if rep.version not in SUPPORTED_VERSIONS:
        v.fail(Reason.VERSION_UNSUPPORTED, f"version {rep.version}, expected one of {SUPPORTED_VERSIONS}")

    v.checks.append("sig_algo")
    if rep.sig_algo != 1:
        v.fail(
            Reason.SIG_ALGO_UNSUPPORTED, f"SIG_ALGO is {rep.sig_algo}, expected 1 (ECDSA P-384 with SHA-384)"
        )

    v.checks.append("signature")
    body = report[:SIGNED_SIZE]
    key = vcek.public_key() if vcek is not None else None
    big_endian = False
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        v.fail(Reason.SIGNATURE_INVALID, "no ECDSA P-384 VCEK key to verify the report signature with")
    elif not _ecdsa_ok(key, body, rep.signature_r, rep.signature_s):
        r_be = int.from_bytes(report[SIG_R], "big")
        s_be = int.from_bytes(report[SIG_S], "big")
        if _ecdsa_ok(key, body, r_be, s_be):
            big_endian = True
            v.fail(Reason.SIGNATURE_BIG_ENDIAN, "r and s are stored big-endian, expected little-endian")
        else:
            v.fail(
                Reason.SIGNATURE_INVALID, "the signature over bytes 0x000-0x29F does not verify with the VCEK"
            )

    v.checks.append("reserved_fields")
    for problem in reserved_violations(report, signature_fields=not big_endian):
        v.fail(Reason.RESERVED_NONZERO, problem)

    info = vcek_info(vcek) if vcek is not None else None
    v.checks.append("vcek_tcb")
    if info is None or info.tcb is None or info.tcb != rep.reported:
        got = info.tcb.as_dict() if info is not None and info.tcb is not None else None
        v.fail(
            Reason.VCEK_TCB_MISMATCH, f"VCEK certifies TCB {got}, REPORTED_TCB is {rep.reported.as_dict()}"
        )
    v.checks.append("vcek_chip")
    if info is None or info.chip_id != rep.chip_id:
        v.fail(Reason.VCEK_CHIP_MISMATCH, "the VCEK's hwID is not the report's CHIP_ID")

    v.checks.append("measurement")
    if rep.measurement not in policy.allowed_measurements:
        v.fail(
            Reason.MEASUREMENT_NOT_ALLOWED, f"measurement {rep.measurement.hex()} is not a reference value"
        )
    v.checks.append("minimum_tcb")
    if not rep.reported.at_least(policy.minimum_tcb):
        v.fail(
            Reason.TCB_BELOW_MINIMUM,
            f"REPORTED_TCB {rep.reported.as_dict()} is below the minimum {policy.minimum_tcb.as_dict()}",
        )
    v.checks.append("debug")
    if rep.debug and not policy.allow_debug:
        v.fail(Reason.DEBUG_ENABLED, f"guest policy {rep.policy:#x} has DEBUG (bit 19) set")
    v.checks.append("migrate_ma")
    if rep.migrate_ma and not policy.allow_migrate_ma:
        v.fail(Reason.MIGRATE_MA_ENABLED, f"guest policy {rep.policy:#x} has MIGRATE_MA (bit 18) set")
    v.checks.append("vmpl")
    if rep.vmpl not in policy.allowed_vmpls:
        v.fail(Reason.VMPL_NOT_ALLOWED, f"VMPL {rep.vmpl}, expected one of {sorted(policy.allowed_vmpls)}")
    v.checks.append("host_data")
    if rep.host_data not in policy.allowed_host_data:
        v.fail(Reason.HOST_DATA_NOT_ALLOWED, f"HOST_DATA {rep.host_data.hex()} is not allowed")

    v.checks.append("report_data")
    if nonce is not None and public_key_der is not None:
        expected = bind_report_data(nonce, public_key_der)
        if rep.report_data[:32] != expected[:32]:
            v.fail(Reason.NONCE_MISMATCH, "REPORT_DATA does not bind the nonce this evidence answers")
        if rep.report_data[32:] != expected[32:]:
            v.fail(Reason.KEY_BINDING_MISMATCH, "REPORT_DATA does not bind the presented public key")
    elif expected_report_data is not None:
        if rep.report_data != expected_report_data:
            v.fail(Reason.REPORT_DATA_MISMATCH, "REPORT_DATA is not the expected value")
    else:
        v.fail(Reason.REPORT_DATA_MISMATCH, "no nonce or expected REPORT_DATA to check it against")
    return v


def chain_ders(*certs: x509.Certificate) -> list[bytes]:
    return [_der(c) for c in certs]
