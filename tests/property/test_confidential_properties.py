"""Properties of attestation: release iff every check passes, bit flips, reserved bytes, nonces, secrets."""

from __future__ import annotations

import io
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmk_confidential import plugin as confidential
from vmk_confidential.authority import Evidence
from vmk_confidential.lab import Lab
from vmk_confidential.provision import GuestAgent
from vmk_confidential.psp import LaunchImage, default_firmware
from vmk_confidential.report import POLICY_DEBUG, POLICY_MIGRATE_MA, SIGNED_SIZE, _reserved_ranges
from vmk_confidential.verify import verify_evidence

from vmkernel import Kernel
from vmkernel.errors import VmkError
from vmkernel.testing.profiles import scaled


@pytest.fixture(scope="module")
def lab() -> Lab:
    return Lab(seed=3)


@pytest.fixture(scope="module")
def agents(lab: Lab) -> dict[str, GuestAgent]:
    return {
        "good": lab.launch(),
        "debug": lab.launch(debug=True),
        "migrate_ma": lab.launch(migrate_ma=True),
        "host_data": lab.launch(host_data=b"\x07" * 32),
        "measurement": lab.launch(image=LaunchImage(firmware=default_firmware(3))),
    }


LAUNCH_FAULTS = {
    "debug": "DEBUG_ENABLED",
    "migrate_ma": "MIGRATE_MA_ENABLED",
    "host_data": "HOST_DATA_NOT_ALLOWED",
    "measurement": "MEASUREMENT_NOT_ALLOWED",
}
EVIDENCE_FAULTS = {
    "vmpl": "VMPL_NOT_ALLOWED",
    "flip": "SIGNATURE_INVALID",
    "truncate": "REPORT_TRUNCATED",
    "expire": "NONCE_EXPIRED",
    "replay": "NONCE_REPLAYED",
    "cross_nonce": "NONCE_MISMATCH",
    "other_key": "KEY_BINDING_MISMATCH",
    "drop_ask": "CERT_MALFORMED",
}


@settings(max_examples=scaled(1000))
@given(
    launch=st.sampled_from(["good", *LAUNCH_FAULTS]),
    faults=st.sets(st.sampled_from(sorted(EVIDENCE_FAULTS)), max_size=3),
    flip_bit=st.integers(0, SIGNED_SIZE * 8 - 1),
)
def test_release_if_and_only_if_every_check_passes(
    lab: Lab, agents: dict[str, GuestAgent], launch: str, faults: set[str], flip_bit: int
) -> None:
    agent = agents[launch]
    challenge = lab.challenge()
    ev = agent.evidence(challenge, vmpl=3 if "vmpl" in faults else 0)
    report = bytearray(ev.report)
    if "flip" in faults:
        report[flip_bit // 8] ^= 1 << (flip_bit % 8)
    if "truncate" in faults:
        del report[-7:]
    nonce, key, ask = ev.nonce, ev.public_key, ev.ask
    if "cross_nonce" in faults:
        nonce = lab.challenge().nonce
    if "other_key" in faults:
        key = agents["good" if launch != "good" else "debug"].public_key_der
    if "drop_ask" in faults:
        ask = b"not a certificate"
    if "replay" in faults:
        lab.transport.submit(Evidence(nonce, ev.report, ev.vcek, ev.ask, ev.ark, ev.public_key))
    if "expire" in faults:
        lab.clock.advance(lab.policy.nonce_ttl_ns + 1)
    outcome = lab.transport.submit(Evidence(nonce, bytes(report), ev.vcek, ask, ev.ark, key))
    expected = {LAUNCH_FAULTS[launch]} if launch != "good" else set()
    expected |= {EVIDENCE_FAULTS[f] for f in faults}
    # POLICY is the u64 at 0x08: a flip of the very bit a launch fault set clears that fault.
    policy_bit = {"debug": POLICY_DEBUG, "migrate_ma": POLICY_MIGRATE_MA}.get(launch, 0).bit_length() - 1
    if "flip" in faults and policy_bit >= 0 and flip_bit == 0x08 * 8 + policy_bit:
        expected.discard(LAUNCH_FAULTS[launch])
    if "truncate" in faults:  # nothing in the report can be judged any more
        expected -= {"SIGNATURE_INVALID", *LAUNCH_FAULTS.values(), "VMPL_NOT_ALLOWED", "KEY_BINDING_MISMATCH"}
        expected -= {"NONCE_MISMATCH"}
    released = outcome.sealed_secret is not None or outcome.certificate is not None
    assert released == (not expected), (launch, faults, outcome.codes)
    assert (outcome.verdict == "VERIFIED") == released
    assert expected <= set(outcome.codes), (launch, faults, outcome.codes)
    assert outcome.signature_valid(lab.authority.public_key)


@pytest.fixture(scope="module")
def bound(lab: Lab, agents: dict[str, GuestAgent]) -> Evidence:
    return lab.evidence(agents["good"])


@settings(max_examples=scaled(2000))
@given(bit=st.integers(0, SIGNED_SIZE * 8 - 1))
def test_any_single_bit_flip_in_signed_bytes_is_rejected(lab: Lab, bound: Evidence, bit: int) -> None:
    report = bytearray(bound.report)
    report[bit // 8] ^= 1 << (bit % 8)
    v = verify_evidence(
        bytes(report),
        bound.vcek,
        bound.ask,
        bound.ark,
        lab.policy,
        nonce=bound.nonce,
        public_key_der=bound.public_key,
    )
    assert not v.passed
    assert "SIGNATURE_INVALID" in v.codes


@settings(max_examples=scaled(300))
@given(byte=st.integers(SIGNED_SIZE, 0x4A0 - 1), value=st.integers(1, 255))
def test_any_change_to_the_signature_field_is_rejected(
    lab: Lab, bound: Evidence, byte: int, value: int
) -> None:
    report = bytearray(bound.report)
    report[byte] ^= value
    v = verify_evidence(
        bytes(report),
        bound.vcek,
        bound.ask,
        bound.ark,
        lab.policy,
        nonce=bound.nonce,
        public_key_der=bound.public_key,
    )
    assert not v.passed
    assert {"SIGNATURE_INVALID", "RESERVED_NONZERO"} & set(v.codes)


RESERVED = [off for lo, hi in _reserved_ranges(2) for off in range(lo, hi)]


@settings(max_examples=scaled(700))
@given(offset=st.sampled_from(RESERVED), value=st.integers(1, 255))
def test_non_zero_reserved_bytes_are_rejected_even_when_signed(
    lab: Lab, bound: Evidence, offset: int, value: int
) -> None:
    body = bytearray(bound.report[:SIGNED_SIZE])
    if offset < SIGNED_SIZE:
        body[offset] = value
    report = bytearray(_sign_raw(lab, bytes(body)))  # the encoder never writes reserved bytes: sign raw
    if offset >= SIGNED_SIZE:
        report[offset] = value
    v = verify_evidence(
        bytes(report),
        bound.vcek,
        bound.ask,
        bound.ark,
        lab.policy,
        nonce=bound.nonce,
        public_key_der=bound.public_key,
    )
    if offset >= 0x330 or offset < SIGNED_SIZE:
        assert v.codes == ["RESERVED_NONZERO"], v.failures
    else:  # the upper bytes of r or s: also breaks the signature value
        assert "RESERVED_NONZERO" in v.codes and not v.passed


def _sign_raw(lab: Lab, body: bytes) -> bytes:
    """Sign exact body bytes with the lab's VCEK (the report encoder never writes reserved bytes)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, utils

    der = lab.module._vcek_key.sign(body, ec.ECDSA(hashes.SHA384()))
    r, s = utils.decode_dss_signature(der)
    return body + r.to_bytes(72, "little") + s.to_bytes(72, "little") + bytes(0x4A0 - SIGNED_SIZE - 144)


@settings(max_examples=scaled(500))
@given(
    n=st.integers(1, 4),
    plan=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 2)), min_size=1, max_size=6),
)
def test_nonces_answer_once_and_only_for_their_own_evidence(
    lab: Lab, agents: dict[str, GuestAgent], n: int, plan: list[tuple[int, int, int]]
) -> None:
    challenges = [lab.challenge() for _ in range(n)]
    made = [agents["good"].evidence(c) for c in challenges]
    answered: set[int] = set()
    for made_for, presented_for, wait in plan:
        i, j = made_for % n, presented_for % n
        lab.clock.advance(wait * lab.policy.nonce_ttl_ns // 3)
        expired = lab.clock.now_ns > challenges[j].expires_ns
        ev = made[i]
        outcome = lab.transport.submit(
            Evidence(challenges[j].nonce, ev.report, ev.vcek, ev.ask, ev.ark, ev.public_key)
        )
        ok = i == j and j not in answered and not expired
        assert (outcome.verdict == "VERIFIED") == ok, (i, j, answered, expired, outcome.codes)
        if i != j:
            assert "NONCE_MISMATCH" in outcome.codes
        if j in answered:
            assert "NONCE_REPLAYED" in outcome.codes
        answered.add(j)


op_st = st.one_of(
    st.tuples(st.just("create"), st.sampled_from([True, {"debug": True}, {"mode": "sev"}, {"vmpl": 2}])),
    st.tuples(st.just("launch"), st.integers(0, 5)),
    st.tuples(st.just("write"), st.integers(0, 5), st.integers(0, 0x900)),
    st.tuples(st.just("entropy"), st.integers(0, 5), st.integers(0, 9000)),
    st.tuples(st.just("stop"), st.integers(0, 5)),
    st.tuples(st.just("destroy"), st.integers(0, 5)),
    st.tuples(st.just("tick"), st.integers(0, 10**10)),
)


@settings(max_examples=scaled(300))
@given(ops=st.lists(op_st, max_size=10), seed=st.integers(0, 2**16))
def test_secret_never_in_host_visible_state(ops: list[tuple[Any, ...]], seed: int) -> None:
    with Kernel(seed=seed, plugins=[confidential], autoload=False) as k:
        vms: list[str] = []
        for op in ops:
            try:
                if op[0] == "create":
                    vms.append(k.create_vm(f"vm{len(vms)}", confidential=op[1]).id)
                elif op[0] == "tick":
                    k.clock.advance(op[1])
                elif vms:
                    vm = vms[op[1] % len(vms)]
                    if op[0] == "launch":
                        k.launch_vm(vm)
                    elif op[0] == "write":
                        k.hypervisor_write(vm, 0x7F0000 + op[2] * 16, b"\xee" * 64)
                    elif op[0] == "entropy":
                        k.entropy(vm).read(op[2])
                    elif op[0] == "stop":
                        k.stop_vm(vm)
                    else:
                        k.destroy_vm(vm, force=True)
                        vms.remove(vm)
            except VmkError:
                pass
            k.check_invariants()
        st_ = confidential.state_of(k)
        assert st_.authority is not None
        journal = io.StringIO()
        k.journal.write_jsonl(journal)
        for secret in st_.authority.known_secrets():
            assert secret.hex() not in journal.getvalue()
        for rec in st_.vms.values():
            if rec.certificate is not None:
                assert rec.verdict == "VERIFIED" and rec.agent is not None
                assert rec.agent.secret() == st_.authority.secret_for(rec.workload)
