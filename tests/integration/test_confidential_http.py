"""The trust authority as a real HTTP service on loopback, the kernel using it, and the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import click
import httpx
import pytest
from click.testing import CliRunner
from vmk_confidential import plugin as confidential
from vmk_confidential.authority import Evidence
from vmk_confidential.lab import Lab
from vmk_confidential.policy import ReferencePolicy
from vmk_confidential.service import HttpTransport, ServerThread

from vmkernel import Kernel
from vmkernel.errors import AttestationError, TrustAuthorityError


@pytest.fixture
def lab() -> Lab:
    return Lab(seed=21)


@pytest.fixture
def server(lab: Lab) -> Iterator[ServerThread]:
    with ServerThread(lab.authority, host="127.0.0.1", port=0) as running:
        yield running


@pytest.fixture
def http(server: ServerThread) -> Iterator[HttpTransport]:
    transport = HttpTransport(server.url, timeout_s=10.0)
    yield transport
    transport.close()


def test_full_flow_over_http(lab: Lab, http: HttpTransport) -> None:
    agent = lab.launch()
    provisioned = agent.attest(http, "web")
    assert provisioned.outcome.verdict == "VERIFIED"
    assert agent.secret() == lab.authority.secret_for("web")
    assert http.ca_certificate() == lab.authority.ca_certificate
    assert provisioned.certificate.issuer == lab.authority.ca_certificate.subject


def test_rejections_over_http_name_their_reasons(lab: Lab, http: HttpTransport) -> None:
    with pytest.raises(AttestationError) as info:
        lab.launch(debug=True).attest(http, "web")
    assert info.value.codes == ["DEBUG_ENABLED"]
    agent = lab.launch()
    challenge = http.request("web")
    ev = agent.evidence(challenge)
    assert http.submit(ev).verdict == "VERIFIED"
    replay = http.submit(ev)
    assert replay.codes == ["NONCE_REPLAYED"] and replay.sealed_secret is None
    other = http.request("web")
    cross = http.submit(Evidence(other.nonce, ev.report, ev.vcek, ev.ask, ev.ark, ev.public_key))
    assert cross.codes == ["NONCE_MISMATCH"]
    short = http.submit(
        Evidence(http.request("web").nonce, ev.report[:100], ev.vcek, ev.ask, ev.ark, ev.public_key)
    )
    assert short.codes == ["REPORT_TRUNCATED"]


def test_nonce_ttl_follows_the_authority_clock(lab: Lab, http: HttpTransport) -> None:
    agent = lab.launch()
    challenge = http.request("web")
    lab.clock.advance(lab.policy.nonce_ttl_ns + 1)
    assert http.submit(agent.evidence(challenge)).codes == ["NONCE_EXPIRED"]


def test_malformed_requests_get_400_not_a_crash(server: ServerThread) -> None:
    with httpx.Client(base_url=server.url, timeout=10.0) as client:
        assert client.get("/v1/health").json() == {"status": "ok"}
        assert client.post("/v1/request", content=b"{not json").status_code == 400
        assert client.post("/v1/request", json={"workload": ""}).status_code == 400
        assert client.post("/v1/request", json=[1]).status_code == 400
        assert client.post("/v1/evidence", content=b"x" * 100_000).status_code == 400
        reply = client.post("/v1/evidence", json={"nonce": "00", "report": "!!"})
        assert (
            reply.status_code == 200 and reply.json()["result"]["failures"][0]["code"] == "EVIDENCE_MALFORMED"
        )
        assert client.get("/v1/request").status_code == 405


def test_unreachable_authority_is_a_named_error() -> None:
    transport = HttpTransport("http://127.0.0.1:9", timeout_s=2.0)
    with pytest.raises(TrustAuthorityError, match=r"127\.0\.0\.1:9"):
        transport.request("web")
    transport.close()


def test_kernel_serves_its_authority_over_http(tmp_path: Path) -> None:
    cfg = {"confidential": {"trust_authority": "http"}}
    with Kernel(seed=4, plugins=[confidential], autoload=False, data_dir=tmp_path, config=cfg) as k:
        st = confidential.state_of(k)
        assert st.server is not None and st.server.url.startswith("http://127.0.0.1:")
        vm = k.create_vm("cvm", confidential=True)
        k.launch_vm(vm.id)
        assert k.identity(vm.id).subject.rfc4514_string() == "CN=cvm"
        bad = k.create_vm("dbg", confidential={"debug": True})
        with pytest.raises(AttestationError):
            k.launch_vm(bad.id)
        server = st.server
    assert server._thread.is_alive() is False  # stopped with the kernel


def test_kernel_against_an_external_authority(tmp_path: Path) -> None:
    # A separately started authority with the policy of the same seed (deterministic vendor keys).
    with Kernel(
        seed=8, plugins=[confidential], autoload=False, config={"confidential": {"deterministic_keys": True}}
    ) as k:
        policy = confidential.state_of(k).policy
    from vmk_confidential.authority import TrustAuthority

    external = TrustAuthority(policy, clock=lambda: 0)
    with ServerThread(external) as running:
        cfg = {"confidential": {"deterministic_keys": True, "trust_authority": running.url}}
        with Kernel(seed=8, plugins=[confidential], autoload=False, data_dir=tmp_path, config=cfg) as k:
            vm = k.create_vm("cvm", confidential=True)
            k.launch_vm(vm.id)
            assert k.identity(vm.id).issuer == external.ca_certificate.subject
    assert external.stats.verified == 1


# ------------------------------------------------------------------------------ CLI


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> click.Group:
    monkeypatch.setenv("VMKERNEL_DISABLE_PLUGIN_AUTOLOAD", "1")
    group = click.Group("vmkernel")
    confidential.vmk_cli_commands(group)
    return group


def test_cli_attest_prints_fields_and_verdict(cli: click.Group, tmp_path: Path) -> None:
    obj = {"seed": 3, "data_dir": str(tmp_path / "d")}
    result = CliRunner().invoke(cli, ["attest", "web"], obj=obj)
    assert result.exit_code == 0, result.output
    assert "measurement:" in result.output and "verdict: VERIFIED" in result.output
    assert "identity: CN=web" in result.output
    bad = CliRunner().invoke(cli, ["attest", "web", "--debug"], obj=obj)
    assert bad.exit_code == 1
    assert "REJECTED" in bad.output and "DEBUG_ENABLED" in bad.output


def test_cli_entropy_writes_a_sample(cli: click.Group, tmp_path: Path) -> None:
    out = tmp_path / "sample.bin"
    result = CliRunner().invoke(
        cli,
        ["entropy", "rng", "--bytes", "65536", "-o", str(out)],
        obj={"seed": 1, "data_dir": str(tmp_path / "d")},
    )
    assert result.exit_code == 0, result.output
    assert out.stat().st_size == 65536 and "min-entropy" in result.output


def test_cli_policy_matches_a_kernel_of_the_same_seed(cli: click.Group, tmp_path: Path) -> None:
    out = tmp_path / "policy.json"
    result = CliRunner().invoke(cli, ["trust-authority", "policy", "-o", str(out)], obj={"seed": 6})
    assert result.exit_code == 0, result.output
    loaded = ReferencePolicy.load(out)
    data = json.loads(out.read_text())
    assert len(data["allowed_measurements"]) == 64 and set(loaded.pinned_roots) == {"Milan", "Genoa"}
    cfg = {"confidential": {"deterministic_keys": True, "policy": str(out)}}
    with Kernel(seed=6, plugins=[confidential], autoload=False, config=cfg) as k:
        vm = k.create_vm("x", confidential=True)
        k.launch_vm(vm.id)


def test_cli_serve_is_a_real_service_a_kernel_attests_against(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = (
        "import sys; from vmk_confidential import plugin; from vmkernel.cli import cli; "
        "plugin.vmk_cli_commands(cli); sys.exit(cli.main(args=sys.argv[1:], prog_name='vmkernel'))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, "--seed", "12", "trust-authority", "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/v1/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        cfg = {"confidential": {"deterministic_keys": True, "trust_authority": url}}
        with Kernel(seed=12, plugins=[confidential], autoload=False, data_dir=tmp_path, config=cfg) as k:
            vm = k.create_vm("svc", confidential=True)
            k.launch_vm(vm.id)
            assert k.identity(vm.id).subject.rfc4514_string() == "CN=svc"
            dbg = k.create_vm("dbg", confidential={"debug": True})
            with pytest.raises(AttestationError) as info:
                k.launch_vm(dbg.id)
            assert info.value.codes == ["DEBUG_ENABLED"]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert '"POST /v1/evidence HTTP/1.1" 200' in out
