"""Provisioning: the guest's side of attestation, from key generation to an identity certificate.

Design: the guest generates an EC P-384 key pair inside the VM and binds its
public key and the authority's nonce into REPORT_DATA.  The security module
signs the report; the host forwards report and chain as evidence.  A release
comes back HPKE-sealed to the guest's key, so the host only ever carries
ciphertext: the security module places the sealed blob in a private guest
page, and the guest opens it there and keeps the secret in private memory.
The identity certificate is accepted only if it is issued by the authority's
CA for the guest's own key.  On any failure nothing is kept and
:class:`AttestationError` names every failed check.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vmkernel.errors import AttestationError, TrustAuthorityError

from .authority import HPKE_INFO, HPKE_SUITE, Challenge, Evidence, Outcome
from .certs import new_p384_key
from .memory import PAGE_SIZE
from .psp import DELIVERY_GPA, GuestContext, SecurityModule
from .service import Transport
from .verify import bind_report_data

__all__ = ["SECRET_GPA", "GuestAgent", "Provisioned"]

SECRET_GPA = 0x007F_8000  # private page where the guest keeps the opened secret


@dataclass(frozen=True)
class Provisioned:
    """What a successful attestation gave the guest."""

    certificate: x509.Certificate
    outcome: Outcome
    secret_gpa: int
    secret_length: int


class GuestAgent:
    """The attestation agent inside one confidential guest."""

    def __init__(self, ctx: GuestContext, psp: SecurityModule, *, rng: random.Random | None = None) -> None:
        self.ctx = ctx
        self.psp = psp
        self._key = new_p384_key(rng)
        self.public_key_der = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.provisioned: Provisioned | None = None

    def evidence(self, challenge: Challenge, *, vmpl: int = 0) -> Evidence:
        """Ask the security module for a report bound to ``challenge`` and this guest's key."""
        report = self.psp.report(self.ctx, bind_report_data(challenge.nonce, self.public_key_der), vmpl=vmpl)
        vcek, ask, ark = self.psp.chain_der()
        return Evidence(challenge.nonce, report, vcek, ask, ark, self.public_key_der)

    def attest(self, transport: Transport, workload: str, *, vmpl: int = 0) -> Provisioned:
        """The whole flow: request, challenge, evidence, result, release."""
        challenge = transport.request(workload)
        outcome = transport.submit(self.evidence(challenge, vmpl=vmpl))
        return self.accept(outcome, challenge, transport.ca_certificate())

    def accept(self, outcome: Outcome, challenge: Challenge, ca: x509.Certificate) -> Provisioned:
        """Check the authority's answer and, if it releases, take the secret and certificate."""
        ca_key = ca.public_key()

        if not isinstance(ca_key, ec.EllipticCurvePublicKey) or not outcome.signature_valid(ca_key):
            raise TrustAuthorityError(
                "result", "a result signature that does not verify", "the CA's signature"
            )
        if outcome.result.get("nonce") != challenge.nonce.hex():
            raise TrustAuthorityError(
                "result", "a result for another nonce", f"nonce {challenge.nonce.hex()}"
            )
        if outcome.result.get("public_key_sha256") != hashlib.sha256(self.public_key_der).hexdigest():
            raise TrustAuthorityError("result", "a result for another guest key", "the key this guest bound")
        if outcome.verdict != "VERIFIED" or outcome.sealed_secret is None or outcome.certificate is None:
            raise AttestationError(
                self.ctx.vm, outcome.failures or [("EVIDENCE_MALFORMED", "nothing released")]
            )
        cert = x509.load_pem_x509_certificate(outcome.certificate)
        own = self._key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if (
            cert.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            != own
        ):
            raise TrustAuthorityError(
                "result", "a certificate for another key", "a certificate for the guest key"
            )
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise TrustAuthorityError(
                "result", "a certificate not issued by the CA", "the CA's signature"
            ) from exc
        # The module places the sealed blob in private memory; the guest opens it there.
        self.psp.deliver(self.ctx, outcome.sealed_secret)
        head = self.ctx.engine.guest_read(DELIVERY_GPA, 4)
        sealed = self.ctx.engine.guest_read(DELIVERY_GPA + 4, int.from_bytes(head, "little"))
        secret = HPKE_SUITE.decrypt(sealed, self._key, info=HPKE_INFO + challenge.nonce)
        pages = -(-len(secret) // PAGE_SIZE)
        self.ctx.engine.mark_private([SECRET_GPA + i * PAGE_SIZE for i in range(pages)])
        self.ctx.engine.guest_write(SECRET_GPA, secret)
        self.provisioned = Provisioned(cert, outcome, SECRET_GPA, len(secret))
        return self.provisioned

    def secret(self) -> bytes | None:
        """The released secret as the guest reads it from its private memory."""
        if self.provisioned is None:
            return None
        return self.ctx.engine.guest_read(self.provisioned.secret_gpa, self.provisioned.secret_length)
