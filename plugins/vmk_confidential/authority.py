"""The trust authority: challenges, evidence verification, signed results, sealed releases.

Design: a relying party separate from the hosts, modelled on the request ->
challenge -> evidence flow of Confidential Containers' key broker.  A request
for a workload returns a fresh 32-byte nonce that lives ``nonce_ttl_ns`` on the
authority's clock (the kernel clock when it runs inside a kernel).  Evidence
answers one nonce, which is consumed whatever the verdict, so a replay is
caught.  The authority verifies the report and chain against its
reference-value policy and answers with a result it signs (ECDSA P-384 over
canonical JSON) that lists every check it ran and every failure by code.  Only
when the verdict is VERIFIED does the answer carry a release: the workload's
secret sealed with HPKE (DHKEM P-384, HKDF-SHA384, AES-256-GCM) to the key bound
in REPORT_DATA, and an X.509 certificate for that key issued by the
authority's CA.

Messages are JSON objects with base64 byte fields; the same handlers serve the
HTTP app and the in-process transport.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import os
import random
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vmkernel.errors import InvalidArgument, TrustAuthorityError

from .certs import new_p384_key
from .policy import ReferencePolicy
from .verify import Failure, Reason, Verification, verify_evidence

__all__ = [
    "HPKE_INFO",
    "HPKE_SUITE",
    "Challenge",
    "Evidence",
    "Outcome",
    "ReleaseRecord",
    "TrustAuthority",
    "canonical_json",
]

HPKE_SUITE = hpke.Suite(hpke.KEM.P384, hpke.KDF.HKDF_SHA384, hpke.AEAD.AES_256_GCM)
HPKE_INFO = b"vmkernel attestation secret v1"
_EPOCH = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
_CERT_LIFETIME = dt.timedelta(days=1)
_MAX_WORKLOAD = 200
_NONCE_HORIZON = 16  # keep consumed/expired nonces this many TTLs, so late replays are named as such


def canonical_json(value: Any) -> bytes:
    """The exact bytes a result signature covers."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(msg: Mapping[str, Any], name: str, *, optional: bool = False) -> bytes | None:
    value = msg.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise InvalidArgument(f"evidence.{name}", value, "a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgument(f"evidence.{name}", value, "valid base64") from exc


@dataclass(frozen=True)
class Challenge:
    workload: str
    nonce: bytes
    expires_ns: int

    def to_json(self) -> dict[str, Any]:
        return {"workload": self.workload, "nonce": self.nonce.hex(), "expires_ns": self.expires_ns}

    @classmethod
    def from_json(cls, msg: Mapping[str, Any]) -> Challenge:
        try:
            return cls(str(msg["workload"]), bytes.fromhex(str(msg["nonce"])), int(msg["expires_ns"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise InvalidArgument("challenge", dict(msg), "workload, nonce (hex) and expires_ns") from exc


@dataclass(frozen=True)
class Evidence:
    """What the guest sends back: the report, the chain the host serves, and its public key."""

    nonce: bytes
    report: bytes
    vcek: bytes
    ask: bytes
    ark: bytes | None
    public_key: bytes  # SubjectPublicKeyInfo DER of the guest key bound in REPORT_DATA

    def to_json(self) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "nonce": self.nonce.hex(),
            "report": _b64(self.report),
            "vcek": _b64(self.vcek),
            "ask": _b64(self.ask),
            "public_key": _b64(self.public_key),
        }
        if self.ark is not None:
            msg["ark"] = _b64(self.ark)
        return msg

    @classmethod
    def from_json(cls, msg: Mapping[str, Any]) -> Evidence:
        try:
            nonce = bytes.fromhex(str(msg.get("nonce")))
        except ValueError as exc:
            raise InvalidArgument("evidence.nonce", msg.get("nonce"), "a hex string") from exc
        fields = {n: _unb64(msg, n) for n in ("report", "vcek", "ask", "public_key")}
        return cls(
            nonce=nonce,
            report=fields["report"] or b"",
            vcek=fields["vcek"] or b"",
            ask=fields["ask"] or b"",
            ark=_unb64(msg, "ark", optional=True),
            public_key=fields["public_key"] or b"",
        )


@dataclass(frozen=True)
class Outcome:
    """The authority's signed answer to evidence, with the release when VERIFIED."""

    result: dict[str, Any]
    signature: bytes
    sealed_secret: bytes | None = None
    certificate: bytes | None = None  # PEM

    @property
    def verdict(self) -> str:
        return str(self.result.get("verdict"))

    @property
    def codes(self) -> list[str]:
        return [str(f["code"]) for f in self.result.get("failures", [])]

    @property
    def failures(self) -> list[tuple[str, str]]:
        return [(str(f["code"]), str(f["detail"])) for f in self.result.get("failures", [])]

    def signature_valid(self, authority_key: ec.EllipticCurvePublicKey) -> bool:
        try:
            authority_key.verify(self.signature, canonical_json(self.result), ec.ECDSA(hashes.SHA384()))
            return True
        except InvalidSignature:
            return False

    def to_json(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"result": self.result, "signature": _b64(self.signature)}
        if self.sealed_secret is not None and self.certificate is not None:
            msg["release"] = {
                "sealed_secret": _b64(self.sealed_secret),
                "certificate": self.certificate.decode("ascii"),
            }
        return msg

    @classmethod
    def from_json(cls, msg: Mapping[str, Any]) -> Outcome:
        try:
            result = msg["result"]
            signature = base64.b64decode(msg["signature"], validate=True)
            release = msg.get("release")
            sealed = cert = None
            if release is not None:
                sealed = base64.b64decode(release["sealed_secret"], validate=True)
                cert = str(release["certificate"]).encode("ascii")
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise TrustAuthorityError(
                "response", "a malformed attestation result", "result and signature"
            ) from exc
        if not isinstance(result, dict):
            raise TrustAuthorityError("response", f"result of type {type(result).__name__}", "a JSON object")
        return cls(result=result, signature=signature, sealed_secret=sealed, certificate=cert)


@dataclass
class _Nonce:
    workload: str
    issued_ns: int
    expires_ns: int
    used: bool = False


@dataclass(frozen=True)
class ReleaseRecord:
    """One answer the authority gave: what it decided and whether it released anything."""

    workload: str
    nonce: str
    verdict: str
    codes: tuple[str, ...]
    checks: tuple[str, ...]
    released: bool
    result_sha256: str


@dataclass
class _Stats:
    challenges: int = 0
    verified: int = 0
    rejected: int = 0
    by_code: dict[str, int] = field(default_factory=dict)


class TrustAuthority:
    """The verifier and key broker.  Thread-safe: the HTTP app calls it from a server thread."""

    def __init__(
        self,
        policy: ReferencePolicy,
        *,
        clock: Callable[[], int],
        secrets: Mapping[str, bytes] | None = None,
        rng: random.Random | None = None,
        name: str = "vmkernel trust authority",
    ) -> None:
        self.policy = policy
        self._clock = clock
        self._rng = rng
        self._secrets: dict[str, bytes] = dict(secrets or {})
        self._nonces: dict[bytes, _Nonce] = {}
        self._chain_cache: dict[bytes, bool] = {}
        self._lock = threading.Lock()
        self.records: list[ReleaseRecord] = []
        self.stats = _Stats()
        self._key = new_p384_key(rng)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.ca_certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(1)
            .not_valid_before(_EPOCH - dt.timedelta(days=1))
            .not_valid_after(_EPOCH + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA384())
        )

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        """The key that signs results and certificates (the CA certificate's key)."""
        return self._key.public_key()

    def _random(self, n: int) -> bytes:
        return self._rng.randbytes(n) if self._rng is not None else os.urandom(n)

    def secret_for(self, workload: str) -> bytes:
        """The secret the authority releases to ``workload`` (created on first use)."""
        with self._lock:
            return self._secret_locked(workload)

    def _secret_locked(self, workload: str) -> bytes:
        if workload not in self._secrets:
            self._secrets[workload] = self._random(32)
        return self._secrets[workload]

    def known_secrets(self) -> list[bytes]:
        with self._lock:
            return list(self._secrets.values())

    # -- protocol ------------------------------------------------------------------

    def handle_request(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        """request -> challenge."""
        workload = msg.get("workload")
        if not isinstance(workload, str) or not 0 < len(workload) <= _MAX_WORKLOAD:
            raise InvalidArgument("request.workload", workload, f"a string of 1..{_MAX_WORKLOAD} characters")
        with self._lock:
            now = self._clock()
            self._prune(now)
            nonce = self._random(32)
            record = _Nonce(workload, now, now + self.policy.nonce_ttl_ns)
            self._nonces[nonce] = record
            self.stats.challenges += 1
            return Challenge(workload, nonce, record.expires_ns).to_json()

    def handle_evidence(self, msg: Mapping[str, Any]) -> dict[str, Any]:
        """evidence -> signed result (+ release)."""
        return self.attest(msg).to_json()

    def attest(self, msg: Mapping[str, Any]) -> Outcome:
        try:
            evidence: Evidence | None = Evidence.from_json(msg)
            problem = ""
        except InvalidArgument as exc:
            evidence, problem = None, str(exc)
        with self._lock:
            now = self._clock()
            if evidence is None:
                v = Verification()
                v.fail(Reason.EVIDENCE_MALFORMED, problem)
                return self._answer(v, "", str(msg.get("nonce", ""))[:64], None, now)
            record = self._nonces.get(evidence.nonce)
            v = self._verify(evidence)
            v.checks.append("nonce_fresh")
            if record is None:
                v.fail(Reason.NONCE_UNKNOWN, "this authority never issued that nonce (or forgot it long ago)")
            else:
                if record.used:
                    v.fail(Reason.NONCE_REPLAYED, "the nonce was already answered once")
                if now > record.expires_ns:
                    v.fail(
                        Reason.NONCE_EXPIRED, f"the nonce expired at {record.expires_ns} ns, now is {now} ns"
                    )
            if record is not None:
                record.used = True
            workload = record.workload if record is not None else ""
            return self._answer(v, workload, evidence.nonce.hex(), evidence, now)

    def _verify(self, ev: Evidence) -> Verification:
        return verify_evidence(
            ev.report,
            ev.vcek,
            ev.ask,
            ev.ark,
            self.policy,
            nonce=ev.nonce,
            public_key_der=ev.public_key,
            chain_cache=self._chain_cache,
        )

    def _guest_key(self, ev: Evidence, v: Verification) -> ec.EllipticCurvePublicKey | None:
        try:
            key = serialization.load_der_public_key(ev.public_key)
        except ValueError:
            key = None
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
            v.fail(Reason.EVIDENCE_MALFORMED, "the guest public key is not an EC P-384 SubjectPublicKeyInfo")
            return None
        return key

    def _answer(
        self, v: Verification, workload: str, nonce_hex: str, ev: Evidence | None, now: int
    ) -> Outcome:
        key = self._guest_key(ev, v) if ev is not None else None
        passed = v.passed and "nonce_fresh" in v.checks and key is not None and bool(workload)
        result: dict[str, Any] = {
            "version": 1,
            "verdict": "VERIFIED" if passed else "REJECTED",
            "workload": workload,
            "nonce": nonce_hex,
            "time_ns": now,
            **v.summary(),
            "public_key_sha256": hashlib.sha256(ev.public_key).hexdigest() if ev is not None else "",
        }
        sealed = cert_pem = None
        if passed and key is not None and ev is not None:
            secret = self._secret_locked(workload)
            sealed = HPKE_SUITE.encrypt(secret, key, info=HPKE_INFO + ev.nonce)
            cert = self._issue(key, workload, now)
            cert_pem = cert.public_bytes(serialization.Encoding.PEM)
            result["release"] = {
                "sealed_secret_sha256": hashlib.sha256(sealed).hexdigest(),
                "certificate_serial": f"{cert.serial_number:x}",
            }
            self.stats.verified += 1
        else:
            result["release"] = None
            self.stats.rejected += 1
            for code in v.codes:
                self.stats.by_code[code] = self.stats.by_code.get(code, 0) + 1
        body = canonical_json(result)
        signature = self._key.sign(body, ec.ECDSA(hashes.SHA384()))
        self.records.append(
            ReleaseRecord(
                workload=workload,
                nonce=nonce_hex,
                verdict=result["verdict"],
                codes=tuple(v.codes),
                checks=tuple(v.checks),
                released=sealed is not None,
                result_sha256=hashlib.sha256(body).hexdigest(),
            )
        )
        return Outcome(result=result, signature=signature, sealed_secret=sealed, certificate=cert_pem)

    def _issue(self, key: ec.EllipticCurvePublicKey, workload: str, now_ns: int) -> x509.Certificate:
        start = _EPOCH + dt.timedelta(microseconds=now_ns // 1000)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, workload)]))
            .issuer_name(self.ca_certificate.subject)
            .public_key(key)
            .serial_number(int.from_bytes(self._random(16), "big") >> 1 | 1)
            .not_valid_before(start)
            .not_valid_after(start + _CERT_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"urn:vmkernel:workload:{workload}")]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA384())
        )

    def _prune(self, now: int) -> None:
        horizon = _NONCE_HORIZON * self.policy.nonce_ttl_ns
        stale = [n for n, r in self._nonces.items() if now - r.issued_ns > horizon]
        for n in stale:
            del self._nonces[n]

    def tick(self, now_ns: int) -> None:
        """Drop nonces far past their expiry (called on every kernel clock advance)."""
        with self._lock:
            self._prune(now_ns)

    def outstanding_nonces(self) -> int:
        with self._lock:
            now = self._clock()
            return sum(1 for r in self._nonces.values() if not r.used and now <= r.expires_ns)


def failures_of(outcome: Outcome) -> list[Failure]:
    return [Failure(Reason(code), detail) for code, detail in outcome.failures]
