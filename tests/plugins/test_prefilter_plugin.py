"""The vmk_prefilter plugin: service table, steering, security component, journal, CLI."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from vmk_prefilter import build_frame
from vmk_prefilter import plugin as prefilter_plugin

from vmkernel import VM, Kernel, hookimpl
from vmkernel.errors import InvalidArgument, RuleError

RULES = """\
redirect spi=100 proto=tcp dport=80-443
bypass proto=udp dport=53
drop proto=tcp dport=23
"""


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    with Kernel(plugins=[prefilter_plugin], autoload=False, data_dir=tmp_path) as k:
        yield k


def two_vms(k: Kernel) -> tuple[VM, VM]:
    client = k.create_vm("client", memory_mib=64, ip="10.0.0.1")
    server = k.create_vm("server", memory_mib=64, ip="10.0.0.2")
    k.launch_vm(client)
    k.launch_vm(server)
    return client, server


def invariants(k: Kernel) -> dict[str, str | None]:
    out = {}
    for contributed in k.hook.vmk_invariants(kernel=k):
        for inv in contributed:
            out[inv.name] = inv.check()
    return out


def test_unsteered_nic_delivers_directly(kernel: Kernel) -> None:
    client, server = two_vms(kernel)
    [summary] = kernel.send_frames(client, [build_frame(dport=23)])
    assert summary["steered"] is False and summary["delivered"] == 1
    assert prefilter_plugin.state(kernel).inbox[server.id] == [build_frame(dport=23)]
    assert not [e for e in kernel.journal.events if e.kind == "prefilter.batch"]


def test_steering_handshake_then_bypass(kernel: Kernel) -> None:
    client, server = two_vms(kernel)
    prefilter_plugin.set_service_path(kernel, client, 0, "out", spi=7, si=250)
    assert prefilter_plugin.load_rules(kernel, RULES) == 1
    assert prefilter_plugin.service_path(kernel, client, 0, "out") == (7, 250)
    syn = build_frame(dport=443, flags=0x02)
    data = build_frame(dport=443, flags=0x18)
    telnet = build_frame(dport=23)
    arp = b"\xff" * 6 + b"\x02" * 6 + b"\x08\x06" + bytes(28)
    [first] = kernel.send_frames(client, [data, syn, telnet, arp])
    assert (first["redirect"], first["drop"], first["bypass"]) == (3, 1, 0)
    assert first["spis"] == [100, 100, 0, 7] and first["sis"] == [255, 255, 0, 250]
    assert first["delivered"] == 3  # the default security component delivers what it parses
    [second] = kernel.send_frames(client, [data] * 5)
    assert second["bypass"] == 5 and second["redirect"] == 0  # the SYN approved the flow
    batches = [e for e in kernel.journal.events if e.kind == "prefilter.batch"]
    assert len(batches) == 2  # one event per batch, never per frame
    assert batches[1].data["bypass"] == 5
    assert len(prefilter_plugin.state(kernel).inbox[server.id]) == 7
    assert all(v is None for v in invariants(kernel).values())


def test_rule_update_flushes_approved_flows(kernel: Kernel) -> None:
    client, _ = two_vms(kernel)
    prefilter_plugin.set_service_path(kernel, client, 0, "out", spi=7)
    prefilter_plugin.load_rules(kernel, RULES)
    kernel.send_frames(client, [build_frame(dport=443, flags=0x02)])
    with pytest.raises(RuleError):
        prefilter_plugin.load_rules(kernel, "bypass dport=70000")
    assert prefilter_plugin.state(kernel).prefilter.flow_count == 1
    prefilter_plugin.load_rules(kernel, RULES)
    assert prefilter_plugin.state(kernel).prefilter.flow_count == 0
    [summary] = kernel.send_frames(client, [build_frame(dport=443, flags=0x18)])
    assert summary["redirect"] == 1


class BlockingSecurity:
    """A user's security component: drops everything it sees and approves nothing."""

    def __init__(self) -> None:
        self.seen = 0

    @hookimpl
    def vmk_security_inspect(self, kernel: Kernel, vm: VM, frames: Sequence[bytes]) -> list[int]:
        self.seen += len(frames)
        return [2] * len(frames)


class BrokenSecurity:
    @hookimpl
    def vmk_security_inspect(self, kernel: Kernel, vm: VM, frames: Sequence[bytes]) -> Any:
        raise RuntimeError("inspection engine crashed")


def test_user_security_component_replaces_the_default(tmp_path: Path) -> None:
    blocker = BlockingSecurity()
    with Kernel(plugins=[prefilter_plugin, blocker], autoload=False, data_dir=tmp_path) as k:
        client, _ = two_vms(k)
        prefilter_plugin.set_service_path(k, client, 0, "out", spi=7)
        [summary] = k.send_frames(client, [build_frame(dport=443, flags=0x02), build_frame(dport=443)])
        assert blocker.seen == 2 and summary["delivered"] == 0 and summary["security_drop"] == 2
        assert prefilter_plugin.state(k).prefilter.flow_count == 0


@pytest.mark.parametrize(("policy", "delivered"), [("block", 0), ("allow", 2)])
def test_failure_policy(tmp_path: Path, policy: str, delivered: int) -> None:
    config = {"prefilter": {"failure_policy": policy}}
    with Kernel(
        plugins=[prefilter_plugin, BrokenSecurity()], autoload=False, data_dir=tmp_path, config=config
    ) as k:
        client, _ = two_vms(k)
        prefilter_plugin.set_service_path(k, client, 0, "out", spi=7)
        [summary] = k.send_frames(client, [build_frame(dport=443), build_frame(dport=80)])
        assert summary["delivered"] == delivered
        [event] = [e for e in k.journal.events if e.kind == "prefilter.batch"]
        assert "inspection engine crashed" in event.data["failure"]
        assert all(v is None for v in invariants(k).values())


def test_configured_rules_and_bad_config(tmp_path: Path) -> None:
    config = {"prefilter": {"rules": "bypass dport=53 proto=udp", "default_si": 9}}
    with Kernel(plugins=[prefilter_plugin], autoload=False, data_dir=tmp_path / "a", config=config) as k:
        assert len(prefilter_plugin.state(k).prefilter) == 1
        assert prefilter_plugin.state(k).prefilter.default_path == (1, 9)
    with pytest.raises(Exception, match="failure_policy"):
        Kernel(
            plugins=[prefilter_plugin],
            autoload=False,
            data_dir=tmp_path / "b",
            config={"prefilter": {"failure_policy": "maybe"}},
        )


def test_service_table_validation_and_cleanup(kernel: Kernel) -> None:
    client, _ = two_vms(kernel)
    for args in [(0, "sideways", 1, 1), (0, "out", 2**24, 1), (0, "out", 1, 0), (256, "out", 1, 1)]:
        with pytest.raises(InvalidArgument):
            prefilter_plugin.set_service_path(kernel, client, *args)
    prefilter_plugin.set_service_path(kernel, client, 1, "in", 5)
    kernel.stop_vm(client)
    kernel.destroy_vm(client)
    assert prefilter_plugin.state(kernel).services == {}
    assert invariants(kernel)["prefilter.service-table-valid"] is None


def test_invariant_catches_broken_counters(kernel: Kernel) -> None:
    prefilter_plugin.state(kernel).counters["bypass"] += 1
    assert invariants(kernel)["prefilter.counters-add-up"] is not None


def test_report_and_demo(kernel: Kernel) -> None:
    class Demo:
        def __init__(self) -> None:
            self.steps: list[str] = []
            self.records: dict[str, Any] = {}

        def step(self, text: str) -> None:
            self.steps.append(text)

        def record(self, key: str, value: Any) -> None:
            self.records[key] = value

    demo = Demo()
    prefilter_plugin.vmk_demo(kernel, demo)
    assert demo.records["data packets bypassing inspection"] == 8
    assert demo.records["delivered to pf-server"] > 0
    assert demo.records["inbound frames dropped by dir=in rules"] == 1
    assert any(step.startswith("inbound batch: 1 dropped") for step in demo.steps)
    section = prefilter_plugin.vmk_report(kernel)
    assert section.title == "prefilter" and any("revision 1" in line for line in section.lines)


DATA = Path(__file__).resolve().parents[1] / "data" / "prefilter"


def cli() -> Any:
    import click

    @click.group()
    def root() -> None:
        pass

    prefilter_plugin.vmk_cli_commands(root)
    return root


def test_cli_classify_prints_counts(tmp_path: Path) -> None:
    rules = tmp_path / "rules.txt"
    rules.write_text("redirect spi=5 proto=udp dport=53\nbypass proto=tcp\n")
    result = CliRunner().invoke(
        cli(), ["prefilter", "classify", str(DATA / "test_dns.pcap"), "--rules", str(rules)]
    )
    assert result.exit_code == 0, result.output
    assert "10 frames, 2 rules" in result.output
    assert "rule 0: redirect spi=5" in result.output
    assert "verdicts: bypass" in result.output
    ref = CliRunner().invoke(
        cli(), ["prefilter", "classify", str(DATA / "test_dns.pcap"), "--rules", str(rules), "--reference"]
    )
    assert ref.output == result.output


def test_cli_classify_large_capture_shows_progress(tmp_path: Path) -> None:
    import struct

    frame = build_frame(proto=17, dport=53)
    records = b"".join(struct.pack("<IIII", 0, 0, len(frame), len(frame)) + frame for _ in range(70000))
    capture = tmp_path / "big.pcap"
    capture.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1) + records)
    rules = tmp_path / "acl.classbench"
    rules.write_text("@0.0.0.0/0\t0.0.0.0/0\t0 : 65535\t53 : 53\t0x11/0xFF\n")
    result = CliRunner().invoke(cli(), ["prefilter", "classify", str(capture), "--rules", str(rules)])
    assert result.exit_code == 0, result.output
    assert "classifying 70000 frames" in result.output
    assert "70000  rule 0:" in result.output and "bypass 70000" in result.output


def test_cli_generate_and_check(tmp_path: Path) -> None:
    generated = CliRunner().invoke(cli(), ["prefilter", "generate", "50", "--seed", "3"])
    assert generated.exit_code == 0 and len(generated.output.splitlines()) == 50
    path = tmp_path / "acl"
    path.write_text(generated.output)
    checked = CliRunner().invoke(cli(), ["prefilter", "check", str(path), "--format", "classbench"])
    assert checked.exit_code == 0 and "50 rules ok" in checked.output
    bad = tmp_path / "bad"
    bad.write_text("bypass dport=99999\n")
    failed = CliRunner().invoke(cli(), ["prefilter", "check", str(bad)])
    assert failed.exit_code != 0 and isinstance(failed.exception, RuleError)
