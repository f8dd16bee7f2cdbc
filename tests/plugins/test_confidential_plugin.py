"""The confidential-VM plugin inside a kernel: the contract, journal, rollback, invariants, hooks."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from vmk_confidential import plugin as confidential
from vmk_confidential.memory import PAGE_SIZE
from vmk_confidential.psp import FIRMWARE_GPA

from vmkernel import Kernel, VMState
from vmkernel.errors import (
    AttestationError,
    EntropyDenied,
    FeatureUnavailable,
    IllegalTransition,
    InvalidArgument,
    TranslationFault,
)


@pytest.fixture
def kernel(tmp_path: Path) -> Kernel:
    k = Kernel(seed=5, plugins=[confidential], autoload=False, data_dir=tmp_path)
    yield k
    k.close()


def test_contract(kernel: Kernel) -> None:
    vm = kernel.create_vm("cvm", memory_mib=64, confidential=True)
    kernel.launch_vm(vm.id)
    cert = kernel.identity(vm.id)
    assert isinstance(cert, x509.Certificate)
    data = kernel.entropy(vm.id).read(1000)
    assert isinstance(data, bytes) and len(data) == 1000
    st = confidential.state_of(kernel)
    rec = st.vms[vm.id]
    assert rec.agent is not None
    own = rec.agent.public_key_der
    assert (
        cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == own
    )
    assert st.authority is not None
    cert.verify_directly_issued_by(st.authority.ca_certificate)
    assert rec.agent.secret() == st.authority.secret_for("cvm")


def test_journal_records_results_never_secrets_and_is_deterministic(tmp_path: Path) -> None:
    def run(seed: int, sub: str) -> tuple[str, list[str], bytes]:
        with Kernel(seed=seed, plugins=[confidential], autoload=False, data_dir=tmp_path / sub) as k:
            k.add_host("h1")
            vm = k.create_vm("cvm", confidential=True)
            k.launch_vm(vm.id)
            k.entropy(vm.id).read(5000)
            st = confidential.state_of(k)
            assert st.authority is not None
            return k.journal.digest(), [e.kind for e in k.journal.events], st.authority.secret_for("cvm")

    d1, kinds, secret = run(9, "a")
    d2, _, secret2 = run(9, "b")
    assert d1 == d2 and secret != secret2  # same journal although keys and secrets came from OS entropy
    assert {"confidential.measured", "confidential.attested"} <= set(kinds)


def test_no_secret_anywhere_host_visible(kernel: Kernel) -> None:
    vm = kernel.create_vm("cvm", confidential=True)
    kernel.launch_vm(vm.id)
    st = confidential.state_of(kernel)
    assert st.authority is not None
    secret = st.authority.secret_for("cvm")
    buf = io.StringIO()
    kernel.journal.write_jsonl(buf)
    assert secret.hex() not in buf.getvalue()
    engine = confidential.engine_of(kernel, vm)
    host = engine.host_read_pages(sorted(engine.store.pages()))
    assert secret not in host
    assert kernel.check_invariants() is None


def test_invariant_catches_a_leak(kernel: Kernel) -> None:
    vm = kernel.create_vm("cvm", confidential=True)
    kernel.launch_vm(vm.id)
    st = confidential.state_of(kernel)
    assert st.authority is not None
    st.note(f"oops {st.authority.secret_for('cvm').hex()}")
    inv = {i.name: i for i in kernel.invariants()}
    assert "logs" in (inv["confidential.no-secret-in-host-state"].check() or "")


def test_invariant_catches_a_release_without_pass(kernel: Kernel) -> None:
    vm = kernel.create_vm("cvm", confidential=True)
    kernel.launch_vm(vm.id)
    confidential.state_of(kernel).vms[vm.id].verdict = "REJECTED"
    inv = {i.name: i for i in kernel.invariants()}
    assert "REJECTED" in (inv["confidential.release-requires-pass"].check() or "")


def test_failed_attestation_vetoes_the_launch_and_releases_nothing(kernel: Kernel) -> None:
    vm = kernel.create_vm("dbg", confidential={"debug": True})
    with pytest.raises(AttestationError) as info:
        kernel.launch_vm(vm.id)
    assert info.value.codes == ["DEBUG_ENABLED"]
    assert kernel.vm(vm.id).state is VMState.CREATED
    with pytest.raises(IllegalTransition):
        kernel.identity(vm.id)
    rec = confidential.state_of(kernel).vms[vm.id]
    assert rec.agent is None and rec.certificate is None and rec.codes == ["DEBUG_ENABLED"]
    assert not kernel.journal.of_kind("confidential.attested")
    (event,) = kernel.journal.of_kind("confidential.rejected")
    assert event.data["codes"] == ["DEBUG_ENABLED"] and len(event.data["measurement"]) == 96
    assert kernel.check_invariants() is None


def test_relaunch_after_stop_attests_again(kernel: Kernel) -> None:
    vm = kernel.create_vm("cvm", confidential={"mode": "sev"})
    kernel.launch_vm(vm.id)
    first = kernel.identity(vm.id)
    kernel.stop_vm(vm.id)
    with pytest.raises(IllegalTransition):
        kernel.entropy(vm.id)
    kernel.launch_vm(vm.id)
    assert kernel.identity(vm.id).serial_number != first.serial_number
    assert len(kernel.journal.of_kind("confidential.attested")) == 2


def test_destroy_scrubs(kernel: Kernel) -> None:
    vm = kernel.create_vm("cvm", confidential=True)
    kernel.launch_vm(vm.id)
    kernel.stop_vm(vm.id)
    kernel.destroy_vm(vm.id)
    st = confidential.state_of(kernel)
    assert vm.id not in st.vms and not st.graveyard
    assert all(vm.id not in m.guests for m in st.modules.values())


def test_hypervisor_write_sev_lands_raw_snp_faults(kernel: Kernel) -> None:
    sev = kernel.create_vm("sev", confidential={"mode": "sev"})
    snp = kernel.create_vm("snp", confidential={"mode": "snp"})
    kernel.launch_vm(sev.id)
    kernel.launch_vm(snp.id)
    kernel.hypervisor_write(sev.id, FIRMWARE_GPA, b"\x90" * 16)
    engine = confidential.engine_of(kernel, sev)
    assert engine.host_read_pages([FIRMWARE_GPA])[:16] == b"\x90" * 16
    assert engine.guest_read(FIRMWARE_GPA, 16) != b"\x90" * 16
    with pytest.raises(TranslationFault):
        kernel.hypervisor_write(snp.id, FIRMWARE_GPA, b"\x90" * 16)
    kernel.hypervisor_write(snp.id, 0x100_0000, b"shared ok")  # not private: plain memory
    assert confidential.engine_of(kernel, snp).guest_read(0x100_0000, 9) == b"shared ok"


def test_entropy_paths_and_replay_denial(kernel: Kernel) -> None:
    for mode, path in (("sev", "direct-write"), ("snp", "shared-then-private")):
        vm = kernel.create_vm(f"e-{mode}", confidential={"mode": mode})
        kernel.launch_vm(vm.id)
        dev = kernel.entropy(vm.id)
        assert dev.path == path
        a, b = dev.read(PAGE_SIZE), dev.read(PAGE_SIZE)
        assert a != b
        used = dev._next - PAGE_SIZE
        with pytest.raises(EntropyDenied, match="page address"):
            dev.serve([used], bytes(PAGE_SIZE))
        page = b"\x01" * PAGE_SIZE
        dev.serve([dev._next], page)
        dev._next += PAGE_SIZE
        with pytest.raises(EntropyDenied, match="page digest"):
            dev.serve([dev._next], page)
    assert len(kernel.journal.of_kind("confidential.entropy_denied")) == 4
    assert confidential.state_of(kernel).denials == 4


def test_non_confidential_vms_are_left_alone(kernel: Kernel) -> None:
    vm = kernel.create_vm("plain")
    kernel.launch_vm(vm.id)
    with pytest.raises(FeatureUnavailable):
        kernel.identity(vm.id)
    with pytest.raises(FeatureUnavailable):
        kernel.entropy(vm.id)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("yes", "confidential"),
        ({"mode": "tdx"}, "mode"),
        ({"vmpl": 4}, "vmpl"),
        ({"host_data": "zz"}, "host_data"),
        ({"colour": 1}, "options"),
        ({"workload": ""}, "workload"),
    ],
)
def test_bad_options_veto_create(kernel: Kernel, value: object, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        kernel.create_vm("bad", confidential=value)
    assert kernel.vms() == []


def test_hosts_have_distinct_chips_and_generations(tmp_path: Path) -> None:
    cfg = {"confidential": {"host_generations": {"h2": "Genoa"}}}
    with Kernel(seed=1, plugins=[confidential], autoload=False, data_dir=tmp_path, config=cfg) as k:
        k.add_host("h1")
        k.add_host("h2")
        st = confidential.state_of(k)
        m1, m2 = st.modules["h1"], st.modules["h2"]
        assert m1.chip_id != m2.chip_id and m1.vcek != m2.vcek
        assert m1.ark != m2.ark and m2.generation == "Genoa"
        events = k.journal.of_kind("confidential.host")
        assert [e.data["generation"] for e in events] == ["Milan", "Genoa"]


def test_attest_again_and_report(kernel: Kernel) -> None:
    vm = kernel.create_vm("cvm", vcpus=2, confidential=True)
    kernel.launch_vm(vm.id)
    report, result = confidential.attest(kernel, vm.id)
    assert result["verdict"] == "VERIFIED" and report.measurement.hex() == result["report"]["measurement"]
    assert kernel.journal.of_kind("confidential.attestation")[-1].data["verdict"] == "VERIFIED"
    section = next(s for s in kernel.report() if s.title == "confidential VMs")
    assert any("VERIFIED" in line for line in section.lines)


def test_policy_file_config(tmp_path: Path) -> None:
    with Kernel(
        seed=2, plugins=[confidential], autoload=False, config={"confidential": {"deterministic_keys": True}}
    ) as k:
        policy = confidential.state_of(k).policy
    path = tmp_path / "policy.json"
    restricted = policy.to_dict()
    restricted["allowed_measurements"] = restricted["allowed_measurements"][:1]
    path.write_text(__import__("json").dumps(restricted))
    cfg = {"confidential": {"deterministic_keys": True, "policy": str(path)}}
    with Kernel(seed=2, plugins=[confidential], autoload=False, config=cfg) as k:
        vm = k.create_vm("two", vcpus=2, confidential=True)
        with pytest.raises(AttestationError) as info:
            k.launch_vm(vm.id)
        assert info.value.codes == ["MEASUREMENT_NOT_ALLOWED"]


def test_bad_trust_authority_setting() -> None:
    with pytest.raises(InvalidArgument, match="trust_authority"):
        Kernel(
            plugins=[confidential],
            autoload=False,
            config={"confidential": {"trust_authority": "carrier pigeon"}},
        )


def test_demo_hook(kernel: Kernel) -> None:
    class Demo:
        def __init__(self) -> None:
            self.steps: list[str] = []
            self.records: dict[str, object] = {}

        def step(self, text: str) -> None:
            self.steps.append(text)

        def record(self, key: str, value: object) -> None:
            self.records[key] = value

    demo = Demo()
    confidential.vmk_demo(kernel, demo)
    assert demo.records["debug VM"] == "DEBUG_ENABLED"
    assert demo.records["replay"] == "EntropyDenied"
    assert float(demo.records["entropy min-entropy bits/byte"]) >= 7.0  # type: ignore[arg-type]
