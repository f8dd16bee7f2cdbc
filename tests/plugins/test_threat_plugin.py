"""The vmk_threat plugin: the journal as an event source, VM stop actions, streams, report, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from vmkernel import Kernel, VMState
from vmkernel.errors import RuleCompileError, VerifyError
from vmkernel.rules import compile as compile_native

vmk_threat = pytest.importorskip("vmk_threat.plugin")

DATA = Path(__file__).resolve().parent.parent / "data" / "threat"


def kernel() -> Kernel:
    return Kernel(seed=1, autoload=False, plugins=[vmk_threat])


def test_journal_events_drive_rules_and_a_rule_stops_a_vm() -> None:
    with kernel() as k:
        vmk_threat.load_rules(k, compile_native(vmk_threat.DEMO_RULES))
        vm = k.create_vm("flappy", memory_mib=64)
        k.launch_vm(vm)
        k.stop_vm(vm)
        assert k.journal.of_kind("threat") == []
        k.launch_vm(vm)
        dets = k.journal.of_kind("threat.determination")
        assert [(e.data["rule"], e.data["context"]) for e in dets] == [("rapid relaunch", vm.id)]
        assert k.vm(vm.id).state == VMState.STOPPED
        st = vmk_threat.state(k)
        assert st.stopped == [vm.id]
        assert st.batches < len(k.journal)  # batched per commit, not per event
        for inv in k.hook.vmk_invariants(kernel=k)[0]:
            assert inv.check() is None
        section = vmk_threat.vmk_report(k)
        assert "1 determinations" in section.lines[1]


def test_bad_rules_leave_the_rule_set_unchanged() -> None:
    with kernel() as k:
        good = compile_native('rule "a" { when vm.launch }')
        vmk_threat.load_rules(k, good)
        with pytest.raises(VerifyError):
            vmk_threat.load_rules(k, [*good, b"junk"])
        assert vmk_threat.state(k).engine.rules == ["a"]


def test_jsonl_stream_determinations_become_journal_events() -> None:
    with kernel() as k:
        vmk_threat.load_rules(k, compile_native('rule "evil" { when proc where cmd contains "evil" nocase }'))
        lines = b"\n".join(
            json.dumps({"type": "proc", "time_ns": i, "cmd": c}).encode()
            for i, c in enumerate(["ok", "EVIL"])
        )
        assert vmk_threat.feed_jsonl(k, lines) == 1
        assert k.journal.of_kind("threat.determination")[0].data["origin"] == "jsonl"


def threat_cli() -> click.Group:
    group = click.Group("vmkernel")
    vmk_threat.vmk_cli_commands(group)
    return group


def test_cli_scan_and_compile(tmp_path: Path) -> None:
    cli = threat_cli()

    rules = tmp_path / "r.vmkr"
    rules.write_text('rule "evil" {\n  when proc where cmd contains "evil" nocase\n}\n')
    events = tmp_path / "e.jsonl"
    events.write_text(
        "\n".join(json.dumps({"type": "proc", "time_ns": i, "cmd": "evil" * (i % 2)}) for i in range(10))
    )
    runner = CliRunner()
    out = runner.invoke(cli, ["threat", "scan", str(events), "--rules", str(rules)])
    assert out.exit_code == 0, out.output
    assert "5 determinations" in out.output
    out = runner.invoke(cli, ["threat", "compile", str(rules)])
    assert out.exit_code == 0, out.output
    assert "contains.i" in out.output
    bad = tmp_path / "bad.vmkr"
    bad.write_text('rule "x" {\n  when proc where cmd ~ "a"\n}\n')
    out = runner.invoke(cli, ["threat", "compile", str(bad)])
    assert isinstance(out.exception, RuleCompileError)
    assert (out.exception.line, out.exception.column) == (2, 23)


def test_cli_scan_sigma_on_a_windows_sample() -> None:
    cli = threat_cli()

    sample = DATA / "proc_creation_sample.json"
    rule = DATA / "proc_creation_rule.yml"
    if not sample.exists():
        pytest.skip("small Sigma samples not copied into tests/data/threat")
    out = CliRunner().invoke(cli, ["threat", "scan", str(sample), "--rules", str(rule)])
    assert out.exit_code == 0, out.output
    assert "2 determinations" in out.output  # both sample events satisfy the rule


def test_demo_part_stops_the_flapping_vm() -> None:
    class Demo:
        def __init__(self) -> None:
            self.steps: list[str] = []
            self.records: dict[str, object] = {}

        def step(self, text: str) -> None:
            self.steps.append(text)

        def record(self, key: str, value: object) -> None:
            self.records[key] = value

    demo = Demo()
    with kernel() as k:
        vmk_threat.vmk_demo(k, demo)
    assert demo.records == {
        "threat determinations": 1,
        "threat VMs stopped": 1,
        "threat sigma correlations": 1,  # 10.0.0.9 tried three accounts; 10.0.0.7 one
    }


def test_the_kernel_clock_closes_count_windows() -> None:
    rule = 'rule "lonely launch" { context vm  when vm.launch count < 2 within 10s }'
    with kernel() as k:
        vmk_threat.load_rules(k, compile_native(rule))
        vm = k.create_vm("once", memory_mib=64)
        k.launch_vm(vm)
        assert k.journal.of_kind("threat.determination") == []
        assert vmk_threat.state(k).engine.stats()["lonely launch"]["windows"] == 1
        k.clock.advance(5 * 10**9)  # the window is still open
        assert k.journal.of_kind("threat.determination") == []
        k.clock.advance(6 * 10**9)  # past its end: decided without another event of the VM
        dets = k.journal.of_kind("threat.determination")
        assert [(e.data["rule"], e.data["context"], e.data["origin"]) for e in dets] == [
            ("lonely launch", vm.id, "clock")
        ]
        for inv in k.hook.vmk_invariants(kernel=k)[0]:
            assert inv.check() is None
