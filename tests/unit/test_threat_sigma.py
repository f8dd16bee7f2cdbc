"""Sigma through pySigma: the backend, discovery, modifiers, correlations, and the shipped samples."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from vmkernel import fast, reference
from vmkernel.errors import RuleCompileError
from vmkernel.rules import compile_sigma
from vmkernel.rules import program as P
from vmkernel.rules.windows import json_records, record_to_event

pytest.importorskip("sigma.collection")

DATA = Path(__file__).resolve().parent.parent / "data" / "threat"
IMPLS = [pytest.param(fast, id="fast"), pytest.param(reference, id="reference")]

RULE = """
title: Suspicious shell
id: 00000000-0000-0000-0000-000000000001
logsource: {product: windows, category: process_creation}
detection:
  sel:
    Image|endswith: ['\\\\cmd.exe', '\\\\powershell.exe']
    CommandLine|contains|all: ['-nop', 'http']
  odd:
    CommandLine|re: 'IEX\\s*\\('
  filter:
    User|startswith: 'NT AUTHORITY'
  cnt:
    ProcessId|gte: 100
  condition: (sel or odd) and not filter and cnt
level: high
"""


def ev(**fields: object) -> dict[str, object]:
    return {"type": "windows/process_creation", "time_ns": 1, **fields}


@pytest.mark.parametrize("mod", IMPLS)
def test_conditions_and_modifiers(mod: ModuleType) -> None:
    eng = mod.RuleEngine(compile_sigma(RULE))
    got = eng.feed(
        [
            ev(Image="C:\\x\\CMD.EXE", CommandLine="a -NOP b HTTP://", User="bob", ProcessId=200),
            ev(Image="C:\\x\\cmd.exe", CommandLine="-nop only", User="bob", ProcessId=200),
            ev(Image="C:\\x\\other.exe", CommandLine="IEX (x)", User="bob", ProcessId="150"),
            ev(Image="C:\\x\\cmd.exe", CommandLine="-nop http", User="NT AUTHORITY\\SYSTEM", ProcessId=200),
            ev(Image="C:\\x\\cmd.exe", CommandLine="-nop http", User="bob", ProcessId=5),
            {
                "type": "linux/process_creation",
                "time_ns": 1,
                "Image": "/cmd.exe",
                "CommandLine": "-nop http",
                "ProcessId": 200,
            },
        ]
    )
    assert [d.events for d in got] == [(0,), (2,)]
    assert got[0].rule == "00000000-0000-0000-0000-000000000001"


def test_untranslatable_rules_say_why() -> None:
    ref = RULE.replace("User|startswith: 'NT AUTHORITY'", "User|fieldref: Account")
    with pytest.raises(RuleCompileError, match="SigmaFieldReference"):
        compile_sigma(ref)
    nested = RULE.replace("IEX\\s*\\(", "(a+)+$")
    with pytest.raises(RuleCompileError, match="repeats a group"):
        compile_sigma(nested)


CORRELATION = """
title: Failed logon
id: 00000000-0000-0000-0000-00000000000a
name: failed_logon
logsource: {product: windows, service: security}
detection:
  sel: {EventID: 4625}
  condition: sel
---
title: Successful logon
id: 00000000-0000-0000-0000-00000000000b
name: ok_logon
logsource: {product: windows, service: security}
detection:
  sel: {EventID: 4624}
  condition: sel
---
title: Brute force
id: 00000000-0000-0000-0000-00000000000c
correlation:
  type: event_count
  rules: [failed_logon]
  group-by: [TargetUserName]
  timespan: 1m
  condition: {gte: 3}
---
title: Brute force then success
id: 00000000-0000-0000-0000-00000000000d
correlation:
  type: temporal_ordered
  rules: [failed_logon, ok_logon]
  group-by: [TargetUserName]
  timespan: 5m
"""


@pytest.mark.parametrize("mod", IMPLS)
def test_correlations_map_to_counters_and_sequences(mod: ModuleType) -> None:
    progs = compile_sigma(CORRELATION)
    names = [P.decode(p).name for p in progs]
    assert names[-2:] == ["00000000-0000-0000-0000-00000000000c", "00000000-0000-0000-0000-00000000000d"]
    s = 10**9

    def logon(eid: int, t: int, user: str = "alice") -> dict[str, object]:
        return {
            "type": "windows/security",
            "source": "windows/security",
            "time_ns": t,
            "EventID": eid,
            "TargetUserName": user,
        }

    eng = mod.RuleEngine(progs[-2:])
    got = eng.feed(
        [
            logon(4625, 0),
            logon(4625, 1 * s, "bob"),
            logon(4625, 2 * s),
            logon(4625, 3 * s),
            logon(4624, 4 * s),
            logon(4624, 400 * s, "bob"),
        ]
    )
    assert [(d.rule[-1], d.context, d.events) for d in got] == [("c", "alice", (3,)), ("d", "alice", (3, 4))]


def test_pysigma_discovers_the_backend() -> None:
    from sigma.plugins import InstalledSigmaPlugins

    backends = InstalledSigmaPlugins.autodiscover().backends
    if "vmkernel" not in backends:
        pytest.skip(
            "pysigma-backend-vmkernel is not installed (pip install -e plugins/pysigma-backend-vmkernel)"
        )
    from sigma.collection import SigmaCollection

    listing = backends["vmkernel"]().convert(SigmaCollection.from_yaml(RULE))
    assert "suffix.i" in listing[0]


def test_field_mapping_through_a_pipeline() -> None:
    from sigma.processing.pipeline import ProcessingItem, ProcessingPipeline
    from sigma.processing.transformations import FieldMappingTransformation

    pipeline = ProcessingPipeline(
        items=[ProcessingItem(FieldMappingTransformation({"CommandLine": "cmdline", "Image": "exe"}))]
    )
    eng = fast.RuleEngine(compile_sigma(RULE, pipeline))
    got = eng.feed([ev(exe="C:\\bin\\cmd.exe", cmdline="-nop http", User="x", ProcessId=500)])
    assert len(got) == 1


@pytest.mark.parametrize(
    ("rule", "sample", "expected"),
    [
        ("proc_creation_rule.yml", "proc_creation_sample.json", 2),
        ("defender_rule.yml", "defender_sample.json", 1),
    ],
)
def test_shipped_sigmahq_samples(rule: str, sample: str, expected: int) -> None:
    progs = compile_sigma((DATA / rule).read_text())
    events = [record_to_event(r) for r in json_records((DATA / sample).read_text())]
    for mod in (fast, reference):
        assert len(mod.RuleEngine(progs).feed(events)) == expected
