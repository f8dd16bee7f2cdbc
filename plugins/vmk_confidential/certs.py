"""The vendor key hierarchy: ARK -> ASK -> VCEK, emulated and as AMD ships it.

Design: AMD signs a root key (ARK) per CPU generation, which signs an
intermediate (ASK), which signs one VCEK per chip and TCB version.  The VCEK
carries the chip id (``hwID``) and the TCB security versions in private
extensions under 1.3.6.1.4.1.3704.1, and its product name names the
generation.  :class:`Vendor` emulates that service for a cluster: each
generation gets its own ARK/ASK pair and each host's chip its own VCEK.  The
emulated ARK and ASK use ECDSA P-384 (the real ones are RSA-4096 with PSS,
which takes seconds to generate); the verifier accepts both, and the real
Milan chain in the test data exercises the RSA-PSS path.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vmkernel.errors import InvalidArgument

from .report import Tcb

__all__ = [
    "OID_HWID",
    "OID_PRODUCT_NAME",
    "GenerationRoots",
    "VcekInfo",
    "Vendor",
    "generation_of",
    "new_p384_key",
    "vcek_info",
]

_AMD = "1.3.6.1.4.1.3704.1."
OID_STRUCT_VERSION = x509.ObjectIdentifier(_AMD + "1")
OID_PRODUCT_NAME = x509.ObjectIdentifier(_AMD + "2")
OID_BL_SPL = x509.ObjectIdentifier(_AMD + "3.1")
OID_TEE_SPL = x509.ObjectIdentifier(_AMD + "3.2")
OID_SNP_SPL = x509.ObjectIdentifier(_AMD + "3.3")
OID_UCODE_SPL = x509.ObjectIdentifier(_AMD + "3.8")
OID_HWID = x509.ObjectIdentifier(_AMD + "4")

_NOT_BEFORE = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
_NOT_AFTER = dt.datetime(2049, 12, 31, tzinfo=dt.UTC)
_ORG = "vmkernel emulated CPU vendor"


def new_p384_key(rng: random.Random | None = None) -> ec.EllipticCurvePrivateKey:
    """A P-384 key: from OS entropy, or derived from ``rng`` when a test asks for determinism."""
    if rng is None:
        return ec.generate_private_key(ec.SECP384R1())
    return ec.derive_private_key(rng.getrandbits(380) + 1, ec.SECP384R1())


def _der_int(value: int) -> bytes:
    body = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big")
    return bytes([0x02, len(body)]) + body


def _parse_der_int(data: bytes) -> int:
    if len(data) < 3 or data[0] != 0x02 or data[1] != len(data) - 2:
        raise InvalidArgument("VCEK TCB extension", data.hex(), "a DER INTEGER")
    return int.from_bytes(data[2:], "big", signed=True)


def _name(cn: str, org: str = _ORG) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def generation_of(cert: x509.Certificate) -> str | None:
    """The CPU generation a vendor certificate belongs to (``Milan``), or ``None`` if it names none.

    VCEKs carry it in the product-name extension (``Milan-B0``); ARK and ASK in
    their common name (``ARK-Milan``, ``SEV-Milan``).
    """
    try:
        ext = cert.extensions.get_extension_for_oid(OID_PRODUCT_NAME).value
        raw = ext.value if isinstance(ext, x509.UnrecognizedExtension) else b""
        if len(raw) >= 2 and raw[0] in (0x16, 0x0C) and raw[1] == len(raw) - 2:
            return raw[2:].decode("ascii", "replace").split("-")[0]
    except x509.ExtensionNotFound:
        pass
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if cns:
        cn = str(cns[0].value)
        for prefix in ("ARK-", "SEV-", "ASK-"):
            if cn.startswith(prefix):
                return cn[len(prefix) :]
    return None


@dataclass(frozen=True)
class VcekInfo:
    """What a VCEK certifies: the chip, its TCB and its generation."""

    generation: str | None
    chip_id: bytes | None
    tcb: Tcb | None


def vcek_info(cert: x509.Certificate) -> VcekInfo:
    """Read the AMD extensions of a VCEK (missing pieces are ``None``)."""
    exts = {e.oid: e.value for e in cert.extensions}

    def raw(oid: x509.ObjectIdentifier) -> bytes | None:
        value = exts.get(oid)
        return value.value if isinstance(value, x509.UnrecognizedExtension) else None

    hwid = raw(OID_HWID)
    if hwid is not None and len(hwid) == 66 and hwid[:2] == b"\x04\x40":  # tolerate a DER-wrapped form
        hwid = hwid[2:]
    parts = [raw(oid) for oid in (OID_BL_SPL, OID_TEE_SPL, OID_SNP_SPL, OID_UCODE_SPL)]
    tcb = None
    if all(p is not None for p in parts):
        bl, tee, snp, ucode = (_parse_der_int(p) for p in parts if p is not None)
        tcb = Tcb(bootloader=bl, tee=tee, snp=snp, microcode=ucode)
    return VcekInfo(generation=generation_of(cert), chip_id=hwid, tcb=tcb)


@dataclass
class GenerationRoots:
    """The emulated ARK and ASK of one CPU generation."""

    generation: str
    ark_key: ec.EllipticCurvePrivateKey
    ark: x509.Certificate
    ask_key: ec.EllipticCurvePrivateKey
    ask: x509.Certificate


def _ca_cert(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    signer: ec.EllipticCurvePrivateKey,
    serial: int,
    path_len: int,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(signer, hashes.SHA384())
    )


class Vendor:
    """The emulated CPU vendor: one ARK/ASK per generation, one VCEK per (chip, TCB).

    ``rng`` makes every key derive from it (deterministic tests); by default
    keys come from OS entropy.  ``org`` lets tests build an attacker's vendor.
    """

    def __init__(self, *, rng: random.Random | None = None, org: str = _ORG) -> None:
        self._rng = rng
        self._org = org
        self._roots: dict[str, GenerationRoots] = {}
        self._serial = 1

    def _next_serial(self) -> int:
        self._serial += 1
        return self._serial

    def roots(self, generation: str) -> GenerationRoots:
        """The ARK and ASK of ``generation``, created on first use."""
        if generation not in self._roots:
            ark_key = new_p384_key(self._rng)
            ask_key = new_p384_key(self._rng)
            ark_name = _name(f"ARK-{generation}", self._org)
            ark = _ca_cert(ark_name, ark_name, ark_key.public_key(), ark_key, self._next_serial(), 1)
            ask = _ca_cert(
                _name(f"SEV-{generation}", self._org),
                ark_name,
                ask_key.public_key(),
                ark_key,
                self._next_serial(),
                0,
            )
            self._roots[generation] = GenerationRoots(generation, ark_key, ark, ask_key, ask)
        return self._roots[generation]

    def issue_vcek(
        self,
        generation: str,
        chip_id: bytes,
        tcb: Tcb,
        public_key: ec.EllipticCurvePublicKey,
        *,
        stepping: str = "B0",
    ) -> x509.Certificate:
        """Sign a VCEK for ``chip_id`` at ``tcb`` with the generation's ASK."""
        if len(chip_id) != 64:
            raise InvalidArgument("chip_id", len(chip_id), "64 bytes")
        roots = self.roots(generation)
        product = f"{generation}-{stepping}".encode("ascii")

        def ext(oid: x509.ObjectIdentifier, value: bytes) -> x509.UnrecognizedExtension:
            return x509.UnrecognizedExtension(oid, value)

        return (
            x509.CertificateBuilder()
            .subject_name(_name("SEV-VCEK", self._org))
            .issuer_name(roots.ask.subject)
            .public_key(public_key)
            .serial_number(self._next_serial())
            .not_valid_before(_NOT_BEFORE)
            .not_valid_after(_NOT_AFTER)
            .add_extension(ext(OID_STRUCT_VERSION, _der_int(0)), critical=False)
            .add_extension(ext(OID_PRODUCT_NAME, bytes([0x16, len(product)]) + product), critical=False)
            .add_extension(ext(OID_BL_SPL, _der_int(tcb.bootloader)), critical=False)
            .add_extension(ext(OID_TEE_SPL, _der_int(tcb.tee)), critical=False)
            .add_extension(ext(OID_SNP_SPL, _der_int(tcb.snp)), critical=False)
            .add_extension(ext(OID_UCODE_SPL, _der_int(tcb.microcode)), critical=False)
            .add_extension(ext(OID_HWID, chip_id), critical=False)
            .sign(roots.ask_key, hashes.SHA384())
        )
