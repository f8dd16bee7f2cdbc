"""Verification: every bad input of the threat list is rejected with its own reason code."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from vmk_confidential.authority import Evidence, Outcome
from vmk_confidential.certs import Vendor
from vmk_confidential.lab import Lab
from vmk_confidential.policy import ReferencePolicy
from vmk_confidential.psp import LaunchImage, SecurityModule, default_firmware
from vmk_confidential.report import AttestationReport, Tcb
from vmk_confidential.verify import MANDATORY_CHECKS, Reason, verify_evidence

from vmkernel.errors import AttestationError, InvalidArgument

DATA = Path(__file__).resolve().parents[1] / "data" / "confidential"


@pytest.fixture(scope="module")
def lab() -> Lab:
    return Lab(seed=7, hosts=1)


def submit(lab: Lab, ev: Evidence) -> Outcome:
    outcome = lab.transport.submit(ev)
    assert outcome.signature_valid(lab.authority.public_key)
    return outcome


def resign(lab: Lab, ev: Evidence, **changes: object) -> Evidence:
    fields = AttestationReport.parse(ev.report).with_fields(**changes)
    return Evidence(ev.nonce, lab.module.sign(fields), ev.vcek, ev.ask, ev.ark, ev.public_key)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_good_evidence_is_verified_with_every_check_and_a_release(lab: Lab) -> None:
    outcome = submit(lab, lab.evidence(lab.launch()))
    assert outcome.verdict == "VERIFIED" and outcome.codes == []
    assert set(MANDATORY_CHECKS) | {"nonce_fresh"} <= set(outcome.result["checks"])
    assert outcome.sealed_secret is not None and outcome.certificate is not None


# Each case builds evidence from good evidence and names the code(s) it must produce.
def tampered(lab: Lab, ev: Evidence) -> Evidence:
    raw = bytearray(ev.report)
    raw[0x140] ^= 0x01  # REPORT_ID: no policy reads it, only the signature covers it
    return Evidence(ev.nonce, bytes(raw), ev.vcek, ev.ask, ev.ark, ev.public_key)


def big_endian(lab: Lab, ev: Evidence) -> Evidence:
    report = lab.module.sign(AttestationReport.parse(ev.report), big_endian=True)
    return Evidence(ev.nonce, report, ev.vcek, ev.ask, ev.ark, ev.public_key)


def attacker_ask(lab: Lab, ev: Evidence) -> Evidence:
    # An attacker's ASK (same names, own key) signs a VCEK for the same chip; the genuine ARK is sent.
    rogue = SecurityModule("rogue", Vendor(org="vmkernel emulated CPU vendor"), chip_id=lab.module.chip_id)
    ctx = rogue.launch_start("g", policy=AttestationReport.parse(ev.report).policy)
    rogue.launch_image(ctx, LaunchImage())
    report = rogue.report(ctx, AttestationReport.parse(ev.report).report_data)
    vcek, ask, _ = rogue.chain_der()
    return Evidence(ev.nonce, report, vcek, ask, ev.ark, ev.public_key)


def root_from_evidence(lab: Lab, ev: Evidence) -> Evidence:
    rogue = SecurityModule("rogue", Vendor(), chip_id=lab.module.chip_id)
    ctx = rogue.launch_start("g", policy=AttestationReport.parse(ev.report).policy)
    rogue.launch_image(ctx, LaunchImage())
    report = rogue.report(ctx, AttestationReport.parse(ev.report).report_data)
    return Evidence(ev.nonce, report, *rogue.chain_der(), ev.public_key)


def wrong_generation(lab: Lab, ev: Evidence) -> Evidence:
    genoa = lab.vendor.roots("Genoa")  # a genuine chain, of another CPU generation
    return Evidence(ev.nonce, ev.report, ev.vcek, der(genoa.ask), None, ev.public_key)


def vcek_other_tcb(lab: Lab, ev: Evidence) -> Evidence:
    # The same chip at an older TCB has its own VCEK; the report claims the current TCB.
    older = SecurityModule("h", lab.vendor, chip_id=lab.module.chip_id, tcb=Tcb(2, 0, 6, 100))
    fields = AttestationReport.parse(ev.report)
    vcek, ask, ark = older.chain_der()
    return Evidence(ev.nonce, older.sign(fields), vcek, ask, ark, ev.public_key)


def vcek_other_chip(lab: Lab, ev: Evidence) -> Evidence:
    other = SecurityModule("h2", lab.vendor)
    fields = AttestationReport.parse(ev.report)
    vcek, ask, ark = other.chain_der()
    return Evidence(ev.nonce, other.sign(fields), vcek, ask, ark, ev.public_key)


def wrong_measurement(lab: Lab, ev: Evidence) -> Evidence:
    agent = lab.launch(image=LaunchImage(firmware=default_firmware(15)))
    return agent.evidence(lab.challenge())


def debug(lab: Lab, ev: Evidence) -> Evidence:
    return lab.launch(debug=True).evidence(lab.challenge())


def migrate_ma(lab: Lab, ev: Evidence) -> Evidence:
    return lab.launch(migrate_ma=True).evidence(lab.challenge())


def vmpl3(lab: Lab, ev: Evidence) -> Evidence:
    return lab.launch().evidence(lab.challenge(), vmpl=3)


def host_data(lab: Lab, ev: Evidence) -> Evidence:
    return lab.launch(host_data=b"\x01" * 32).evidence(lab.challenge())


def sig_algo(lab: Lab, ev: Evidence) -> Evidence:
    return resign(lab, ev, sig_algo=2)


def low_tcb(lab: Lab, ev: Evidence) -> Evidence:
    old = SecurityModule("h", lab.vendor, chip_id=lab.module.chip_id, tcb=Tcb(3, 0, 7, 115))
    ctx = old.launch_start("g", policy=AttestationReport.parse(ev.report).policy)
    old.launch_image(ctx, LaunchImage())
    report = old.report(ctx, AttestationReport.parse(ev.report).report_data)
    return Evidence(ev.nonce, report, *old.chain_der(), ev.public_key)


def reserved(lab: Lab, ev: Evidence) -> Evidence:
    raw = bytearray(resign(lab, ev).report)
    raw[0x400] = 0xFF  # unsigned reserved tail: the signature still verifies
    return Evidence(ev.nonce, bytes(raw), ev.vcek, ev.ask, ev.ark, ev.public_key)


def truncated(lab: Lab, ev: Evidence) -> Evidence:
    return Evidence(ev.nonce, ev.report[:-1], ev.vcek, ev.ask, ev.ark, ev.public_key)


def overlong(lab: Lab, ev: Evidence) -> Evidence:
    return Evidence(ev.nonce, ev.report + b"\x00", ev.vcek, ev.ask, ev.ark, ev.public_key)


def other_key(lab: Lab, ev: Evidence) -> Evidence:
    other = lab.launch()
    return Evidence(ev.nonce, ev.report, ev.vcek, ev.ask, ev.ark, other.public_key_der)


def cross_nonce(lab: Lab, ev: Evidence) -> Evidence:
    fresh = lab.challenge()  # evidence made for ev.nonce, presented for another live nonce
    return Evidence(fresh.nonce, ev.report, ev.vcek, ev.ask, ev.ark, ev.public_key)


def unknown_nonce(lab: Lab, ev: Evidence) -> Evidence:
    return Evidence(b"\x42" * 32, ev.report, ev.vcek, ev.ask, ev.ark, ev.public_key)


def expired(lab: Lab, ev: Evidence) -> Evidence:
    lab.clock.advance(lab.policy.nonce_ttl_ns + 1)
    return ev


CASES: list[tuple[str, Callable[[Lab, Evidence], Evidence], set[str]]] = [
    ("tampered report", tampered, {"SIGNATURE_INVALID"}),
    ("big-endian r/s", big_endian, {"SIGNATURE_BIG_ENDIAN"}),
    ("attacker's ASK", attacker_ask, {"ASK_NOT_ISSUED_BY_ARK"}),
    ("root from the evidence", root_from_evidence, {"ROOT_NOT_PINNED", "ASK_NOT_ISSUED_BY_ARK"}),
    (
        "chain for the wrong CPU generation",
        wrong_generation,
        {"CHAIN_GENERATION_MISMATCH", "ASK_NOT_ISSUED_BY_ARK", "VCEK_NOT_ISSUED_BY_ASK"},
    ),
    ("VCEK from another TCB", vcek_other_tcb, {"VCEK_TCB_MISMATCH"}),
    ("VCEK of another chip", vcek_other_chip, {"VCEK_CHIP_MISMATCH"}),
    ("expired nonce", expired, {"NONCE_EXPIRED"}),
    ("wrong measurement", wrong_measurement, {"MEASUREMENT_NOT_ALLOWED"}),
    ("DEBUG = 1", debug, {"DEBUG_ENABLED"}),
    ("MIGRATE_MA = 1", migrate_ma, {"MIGRATE_MA_ENABLED"}),
    ("VMPL 3", vmpl3, {"VMPL_NOT_ALLOWED"}),
    ("HOST_DATA not allowed", host_data, {"HOST_DATA_NOT_ALLOWED"}),
    ("SIG_ALGO != 1", sig_algo, {"SIG_ALGO_UNSUPPORTED"}),
    ("TCB below minimum", low_tcb, {"TCB_BELOW_MINIMUM"}),
    ("non-zero reserved bytes", reserved, {"RESERVED_NONZERO"}),
    ("truncated report", truncated, {"REPORT_TRUNCATED"}),
    ("overlong report", overlong, {"REPORT_OVERLONG"}),
    ("key not the one bound", other_key, {"KEY_BINDING_MISMATCH"}),
    ("evidence for another nonce", cross_nonce, {"NONCE_MISMATCH"}),
    ("nonce never issued", unknown_nonce, {"NONCE_UNKNOWN", "NONCE_MISMATCH"}),
]


@pytest.mark.parametrize(("name", "make", "codes"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_rejected_with_its_reason(
    name: str, make: Callable[[Lab, Evidence], Evidence], codes: set[str]
) -> None:
    lab = Lab(seed=11)
    good = lab.evidence(lab.launch())
    outcome = submit(lab, make(lab, good))
    assert outcome.verdict == "REJECTED"
    assert set(outcome.codes) == codes, outcome.failures
    assert outcome.sealed_secret is None and outcome.certificate is None
    assert outcome.result["release"] is None
    assert all(detail for _, detail in outcome.failures)


def test_every_reason_code_of_the_list_is_distinct() -> None:
    singles = [next(iter(c)) for _, _, c in CASES if len(c) == 1]
    assert len(singles) == len(set(singles))
    assert {"CHAIN_GENERATION_MISMATCH", "ROOT_NOT_PINNED"} <= {code for _, _, c in CASES for code in c}


def test_replayed_nonce_is_rejected(lab: Lab) -> None:
    ev = lab.evidence(lab.launch())
    assert submit(lab, ev).verdict == "VERIFIED"
    again = submit(lab, ev)
    assert again.codes == ["NONCE_REPLAYED"] and again.sealed_secret is None


def test_rejection_consumes_the_nonce(lab: Lab) -> None:
    ev = lab.evidence(lab.launch())
    assert submit(lab, truncated(lab, ev)).verdict == "REJECTED"
    assert submit(lab, ev).codes == ["NONCE_REPLAYED"]


def test_malformed_evidence_gets_a_signed_rejection(lab: Lab) -> None:
    outcome = Outcome.from_json(lab.authority.handle_evidence({"nonce": "zz", "report": 5}))
    assert outcome.codes == ["EVIDENCE_MALFORMED"]
    assert outcome.signature_valid(lab.authority.public_key)


def test_non_p384_guest_key_is_rejected(lab: Lab) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    ev = lab.evidence(lab.launch())
    p256 = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    outcome = submit(lab, Evidence(ev.nonce, ev.report, ev.vcek, ev.ask, ev.ark, p256))
    assert "EVIDENCE_MALFORMED" in outcome.codes and outcome.sealed_secret is None


def test_guest_raises_attestation_error_naming_every_failure(lab: Lab) -> None:
    agent = lab.launch(debug=True)
    with pytest.raises(AttestationError) as info:
        agent.attest(lab.transport, "w", vmpl=3)
    assert set(info.value.codes) == {"DEBUG_ENABLED", "VMPL_NOT_ALLOWED"}
    assert "DEBUG_ENABLED" in str(info.value) and agent.secret() is None


def test_verifier_never_passes_without_report_data_check(lab: Lab) -> None:
    ev = lab.evidence(lab.launch())
    v = verify_evidence(ev.report, ev.vcek, ev.ask, ev.ark, lab.policy)
    assert not v.passed and v.codes == ["REPORT_DATA_MISMATCH"]


# --------------------------------------------------------------------- the real Milan report


def milan() -> tuple[bytes, bytes, x509.Certificate, x509.Certificate]:
    report = bytes.fromhex((DATA / "report_milan.hex").read_text().strip())
    vcek = (DATA / "vcek_milan.der").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AMD's certificates carry a serial number RFC 5280 disallows
        ask, ark = x509.load_pem_x509_certificates((DATA / "cert_chain_milan").read_bytes())
    return report, vcek, ask, ark


def real_policy(ark: x509.Certificate, measurement: bytes) -> ReferencePolicy:
    return ReferencePolicy(
        allowed_measurements=frozenset({measurement}),
        pinned_roots={"Milan": ark},
        minimum_tcb=Tcb(3, 0, 8, 115),
    )


def test_real_milan_report_verifies_under_its_pinned_root() -> None:
    report, vcek, ask, ark = milan()
    rep = AttestationReport.parse(report)
    policy = real_policy(ark, rep.measurement)
    v = verify_evidence(report, vcek, der(ask), der(ark), policy, expected_report_data=rep.report_data)
    assert v.passed, v.failures
    # without the ARK in the evidence the pinned root alone suffices
    assert verify_evidence(report, vcek, der(ask), None, policy, expected_report_data=rep.report_data).passed


def test_real_milan_report_rejections() -> None:
    report, vcek, ask, ark = milan()
    rep = AttestationReport.parse(report)
    policy = real_policy(ark, rep.measurement)
    flipped = bytearray(report)
    flipped[0x90] ^= 0x80
    v = verify_evidence(
        bytes(flipped), vcek, der(ask), der(ark), policy, expected_report_data=rep.report_data
    )
    assert set(v.codes) == {"SIGNATURE_INVALID", "MEASUREMENT_NOT_ALLOWED"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_ask, t_ark = x509.load_pem_x509_certificates((DATA / "cert_chain_turin").read_bytes())
    v = verify_evidence(report, vcek, der(t_ask), der(t_ark), policy, expected_report_data=rep.report_data)
    assert {"CHAIN_GENERATION_MISMATCH", "ROOT_NOT_PINNED"} <= set(v.codes)
    turin_vcek = (DATA / "vcek_turin.der").read_bytes()
    v = verify_evidence(report, turin_vcek, der(ask), der(ark), policy, expected_report_data=rep.report_data)
    assert "ROOT_NOT_PINNED" in v.codes and not v.passed  # no Turin root pinned
    wrong_pin = ReferencePolicy(
        allowed_measurements=frozenset({rep.measurement}), pinned_roots={"Milan": t_ark}
    )
    v = verify_evidence(report, vcek, der(ask), None, wrong_pin, expected_report_data=rep.report_data)
    assert v.codes == ["ASK_NOT_ISSUED_BY_ARK"]


# --------------------------------------------------------------------- the policy file


def test_policy_file_round_trip(tmp_path: Path, lab: Lab) -> None:
    path = tmp_path / "policy.json"
    lab.policy.dump(path)
    loaded = ReferencePolicy.load(path)
    assert loaded.to_dict() == lab.policy.to_dict()
    assert loaded.pinned_key("Milan") == lab.vendor.roots("Milan").ark.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"allowed_measurement": []}, "policy keys"),
        ({"allowed_measurements": ["00"]}, "allowed_measurements"),
        ({"allowed_vmpls": [5]}, "allowed_vmpls"),
        ({"minimum_tcb": {"fmc": 1}}, "minimum_tcb"),
        ({"pinned_roots": {"Milan": "not pem"}}, "pinned_roots"),
        ({"nonce_ttl_ns": 0}, "nonce_ttl_ns"),
    ],
)
def test_policy_file_errors_are_named(
    tmp_path: Path, lab: Lab, change: dict[str, object], match: str
) -> None:
    data = {**lab.policy.to_dict(), **change}
    with pytest.raises(InvalidArgument, match=match):
        ReferencePolicy.from_dict(data)


def test_unreadable_policy_file(tmp_path: Path) -> None:
    bad = tmp_path / "p.json"
    bad.write_text("[1, 2]")
    with pytest.raises(InvalidArgument, match="JSON object"):
        ReferencePolicy.load(bad)
    with pytest.raises(InvalidArgument, match="policy file"):
        ReferencePolicy.load(tmp_path / "missing.json")


def test_reason_codes_are_strings() -> None:
    assert Reason.SIGNATURE_INVALID == "SIGNATURE_INVALID"


def test_guest_refuses_a_result_that_is_not_the_authoritys(lab: Lab) -> None:
    from vmk_confidential.authority import TrustAuthority

    from vmkernel.errors import TrustAuthorityError

    agent = lab.launch()
    challenge = lab.challenge()
    outcome = lab.transport.submit(agent.evidence(challenge))
    impostor = TrustAuthority(lab.policy, clock=lab.clock)
    with pytest.raises(TrustAuthorityError, match="signature"):
        agent.accept(outcome, challenge, impostor.ca_certificate)
    other = lab.challenge()
    with pytest.raises(TrustAuthorityError, match="another nonce"):
        agent.accept(outcome, other, lab.authority.ca_certificate)
    with pytest.raises(TrustAuthorityError, match="another guest key"):
        lab.launch().accept(outcome, challenge, lab.authority.ca_certificate)
    assert agent.secret() is None
    assert agent.accept(outcome, challenge, lab.authority.ca_certificate).secret_length == 32
