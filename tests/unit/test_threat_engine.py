"""The threat-rule engine, run against both implementations: loading, bad inputs, semantics."""

from __future__ import annotations

import struct
from types import ModuleType

import pytest

from vmkernel import fast, reference
from vmkernel.errors import InvalidArgument, VerifyError, VersionMismatch
from vmkernel.rules import ir
from vmkernel.rules import program as P

IMPLS = [pytest.param(fast, id="fast"), pytest.param(reference, id="reference")]


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return request.param  # type: ignore[no-any-return]


def prog(spec: ir.RuleSpec) -> bytes:
    return P.encode(ir.build(spec))


def simple(name: str = "r", cond: ir.Expr | None = None, **kw: object) -> bytes:
    cond = cond if cond is not None else ir.Test("cmd", "contains", "evil", True)
    return prog(ir.RuleSpec(name, [ir.Step(("proc",), cond)], **kw))  # type: ignore[arg-type]


def raw_program(code: list[P.Instr], consts: list[P.Const] | None = None, **kw: object) -> bytes:
    return P.encode(P.Program(name="raw", code=code, consts=consts or [], fields=["f"], **kw))  # type: ignore[arg-type]


HALT = P.Instr(P.HALT, x=P.MATCH)


def verify_code(impl: ModuleType, data: bytes) -> tuple[str, int]:
    with pytest.raises(VerifyError) as info:
        impl.RuleEngine([data])
    return info.value.code, info.value.pc


# --------------------------------------------------------------------------- loading


def test_a_good_program_loads(impl: ModuleType) -> None:
    eng = impl.RuleEngine([simple()])
    assert eng.rules == ["r"]
    assert eng.feed([]) == []


@pytest.mark.parametrize(
    ("data", "code", "pc"),
    [
        (b"", "truncated", -1),
        (b"VMK", "truncated", -1),
        (b"XXXX\x01\x00", "bad-magic", -1),
        (simple()[:-3], "truncated", -1),
        (simple() + b"\x00", "trailing-bytes", -1),
        (raw_program([]), "empty-code", 0),
        (raw_program([P.Instr(P.EQ, a=5), HALT]), "const-missing", 0),
        (raw_program([P.Instr(P.LOADF), P.Instr(P.JF, a=1), HALT]), "undefined-register", 1),
        (raw_program([P.Instr(P.LOADF), P.Instr(P.EXISTS), P.Instr(P.JF, a=1), HALT]), "backward-jump", 2),
        (
            raw_program([P.Instr(P.LOADF), P.Instr(P.EXISTS), P.Instr(P.JF, a=4), HALT]),
            "jump-out-of-range",
            2,
        ),
        (raw_program([P.Instr(0x77), HALT]), "bad-opcode", 0),
        (raw_program([P.Instr(P.LOADF)]), "no-final-halt", 0),
        (raw_program([P.Instr(P.EQ, r=3), HALT], [P.Const(P.K_STR, "x")]), "undefined-register", 0),
        (raw_program([P.Instr(P.LOADF, r=16), HALT]), "bad-register", 0),
        (raw_program([P.Instr(P.WAIT, a=P.ANY_TYPES, imm=0), HALT]), "bad-timeout", 0),
        (raw_program([P.Instr(P.WAIT, a=P.ANY_TYPES, imm=2**64 - 1), HALT]), "bad-timeout", 0),
        (raw_program([P.Instr(P.HALT, x=7)]), "bad-verdict", 0),
        (raw_program([P.Instr(P.LAUNCH, imm=5), HALT]), "bad-launch", 0),
        (raw_program([HALT] * 13_000), "too-large", -1),
        (raw_program([HALT], [P.Const(P.K_REGEX, "(a+)+$")]), "regex-catastrophic", -1),
        (raw_program([HALT], [P.Const(P.K_REGEX, "(x*y?)*")]), "regex-catastrophic", -1),
        (raw_program([HALT], [P.Const(P.K_REGEX, "(unclosed")]), "regex-invalid", -1),
        (raw_program([HALT], [P.Const(P.K_CIDR, "10.0.0.0/33")]), "bad-cidr", -1),
        (
            raw_program([P.Instr(P.LOADF), P.Instr(P.CMP, a=0), HALT], [P.Const(P.K_STR, "x")]),
            "const-type",
            1,
        ),
    ],
)
def test_bad_programs_are_refused(impl: ModuleType, data: bytes, code: str, pc: int) -> None:
    assert verify_code(impl, data) == (code, pc)


def test_constants_must_be_utf8(impl: ModuleType) -> None:
    good = raw_program([HALT], [P.Const(P.K_STR, "abc")])
    bad = good.replace(b"abc", b"a\xffc")
    assert verify_code(impl, bad)[0] == "bad-utf8"


@pytest.mark.parametrize("version", [1, 3, 0xFFFF])
def test_version_mismatch_has_its_own_error(impl: ModuleType, version: int) -> None:
    # version 1 programs (before aggregates and group-by tuples) are refused, not misread
    data = bytearray(simple())
    assert data[4:6] == struct.pack("<H", P.VERSION) == struct.pack("<H", 2)
    data[4:6] = struct.pack("<H", version)
    with pytest.raises(VersionMismatch) as info:
        impl.RuleEngine([bytes(data)])
    assert info.value.code == "version"
    assert f"program version {version}, expected 2" in str(info.value)


def test_loading_is_all_or_nothing(impl: ModuleType) -> None:
    with pytest.raises(VerifyError):
        impl.RuleEngine([simple("a"), b"junk"])
    with pytest.raises(VerifyError) as info:
        impl.RuleEngine([simple("a"), simple("a")])
    assert info.value.code == "duplicate-rule"


def test_launch_cycles_and_bad_targets_are_refused(impl: ModuleType) -> None:
    def launcher(name: str, target: str) -> bytes:
        return prog(ir.RuleSpec(name, [ir.Step(("x",))], launched=True, launches=[(target, 10)]))

    assert verify_code(impl, launcher("a", "a"))[0] == "launch-cycle"
    with pytest.raises(VerifyError) as info:
        impl.RuleEngine([launcher("a", "b"), launcher("b", "c"), launcher("c", "a")])
    assert info.value.code == "launch-cycle"
    with pytest.raises(VerifyError) as info:
        impl.RuleEngine([launcher("a", "missing")])
    assert info.value.code == "unknown-launch-target"
    plain = prog(ir.RuleSpec("p", [ir.Step(("x",))]))
    with pytest.raises(VerifyError) as info:
        impl.RuleEngine([launcher("a", "p"), plain])
    assert info.value.code == "launch-target"


def test_bad_arguments(impl: ModuleType) -> None:
    with pytest.raises(InvalidArgument):
        impl.RuleEngine(b"VMKR")
    with pytest.raises(InvalidArgument):
        impl.RuleEngine([simple()], max_instances=0)
    eng = impl.RuleEngine([simple()])
    with pytest.raises(InvalidArgument):
        eng.feed({"type": "proc", "time_ns": 1})
    with pytest.raises(InvalidArgument, match="time_ns"):
        eng.feed([{"type": "proc", "time_ns": "1"}])
    with pytest.raises(InvalidArgument, match="type"):
        eng.feed([{"time_ns": 1}])
    with pytest.raises(InvalidArgument, match="line 2"):
        eng.feed_jsonl(b'{"type": "proc", "time_ns": 1}\n{oops\n')
    with pytest.raises(InvalidArgument):
        eng.feed_jsonl(b'{"type": "proc", "time_ns": 1, "x": "\\ud800"}\n')
    assert eng.events_seen == 0  # nothing of a refused batch was run


# --------------------------------------------------------------------------- semantics


def test_every_matching_rule_fires(impl: ModuleType) -> None:
    eng = impl.RuleEngine([simple("a"), simple("b"), simple("c", ir.Test("cmd", "contains", "nothing"))])
    dets = eng.feed([{"type": "proc", "time_ns": 5, "cmd": "EVIL.exe"}])
    assert [(d.rule, d.verdict, d.events, d.time_ns) for d in dets] == [
        ("a", "match", (0,), 5),
        ("b", "match", (0,), 5),
    ]


def test_numbers_and_strings(impl: ModuleType) -> None:
    eng = impl.RuleEngine(
        [
            simple("int", ir.Test("n", "eq", 16)),
            simple("str", ir.Test("n", "eq", "16")),
            simple("gt", ir.Test("n", "gt", 15)),
        ]
    )
    got = eng.feed(
        [
            {"type": "proc", "time_ns": 1, "n": 16},
            {"type": "proc", "time_ns": 2, "n": "16"},
            {"type": "proc", "time_ns": 3, "n": 16.0},
            {"type": "proc", "time_ns": 4, "n": True},
        ]
    )
    assert sorted((d.rule, d.events[0]) for d in got) == [
        ("gt", 0),
        ("gt", 1),
        ("gt", 2),
        ("int", 0),
        ("int", 1),
        ("int", 2),
        ("str", 0),
        ("str", 1),
    ]


def test_unicode_case_folding_nul_and_huge_values(impl: ModuleType) -> None:
    eng = impl.RuleEngine(
        [
            simple("dotted", ir.Test("cmd", "eq", "i̇stanbul", True)),
            simple("sharp", ir.Test("cmd", "eq", "STRASSE", True)),
            simple("nul", ir.Test("cmd", "contains", "a\x00b")),
            simple("tail", ir.Test("cmd", "suffix", "END", True)),
        ]
    )
    got = eng.feed(
        [
            {"type": "proc", "time_ns": 1, "cmd": "İSTANBUL"},
            {"type": "proc", "time_ns": 2, "cmd": "straße"},  # ß does not fold to ss
            {"type": "proc", "time_ns": 3, "cmd": "xa\x00by"},
            {"type": "proc", "time_ns": 4, "cmd": "A" * (1 << 20) + "end"},
        ]
    )
    assert [(d.rule, d.events) for d in got] == [("dotted", (0,)), ("nul", (2,)), ("tail", (3,))]


def _seq(within: int = 100, verdict: str = "match") -> bytes:
    return prog(
        ir.RuleSpec(
            "seq",
            [ir.Step(("a",)), ir.Step(("b",), within=within)],
            context="pid",
            verdict=verdict,
        )
    )


def test_sequences_expire_and_ignore_older_events(impl: ModuleType) -> None:
    eng = impl.RuleEngine([_seq(100)])
    got = eng.feed(
        [
            {"type": "a", "time_ns": 10, "pid": 1},
            {"type": "b", "time_ns": 5, "pid": 1},  # older than the instance: ignored
            {"type": "a", "time_ns": 10, "pid": 2},
            {"type": "b", "time_ns": 10, "pid": 2},  # equal timestamps do extend
            {"type": "b", "time_ns": 200, "pid": 1},  # expired
        ]
    )
    assert [(d.context, d.events) for d in got] == [("2", (2, 3))]
    assert eng.stats()["seq"]["expired"] == 1
    assert eng.live_instances == 0


def test_one_event_never_passes_two_waits(impl: ModuleType) -> None:
    three = prog(
        ir.RuleSpec("three", [ir.Step(("x",)), ir.Step(("x",), within=99), ir.Step(("x",), within=99)])
    )
    eng = impl.RuleEngine([three])
    got = eng.feed([{"type": "x", "time_ns": t} for t in range(4)])
    assert [d.events for d in got] == [(0, 1, 2), (1, 2, 3)]


def test_counters_fire_once_per_threshold(impl: ModuleType) -> None:
    rule = prog(ir.RuleSpec("burst", [ir.Step(("f",), count=(3, 10))], context="u"))
    eng = impl.RuleEngine([rule])
    got = eng.feed([{"type": "f", "time_ns": t, "u": "bob"} for t in (0, 1, 20, 21, 22, 23)])
    assert [d.time_ns for d in got] == [22]


def test_launch_and_silent(impl: ModuleType) -> None:
    parent = prog(
        ir.RuleSpec("parent", [ir.Step(("spawn",))], context="pid", launches=[("child", 50)], silent=True)
    )
    child = prog(ir.RuleSpec("child", [ir.Step(("net",))], context="pid", launched=True, verdict="no-match"))
    eng = impl.RuleEngine([parent, child])
    got = eng.feed(
        [
            {"type": "net", "time_ns": 0, "pid": 7},  # nothing launched yet
            {"type": "spawn", "time_ns": 1, "pid": 7},
            {"type": "net", "time_ns": 2, "pid": 8},  # other context
            {"type": "net", "time_ns": 3, "pid": 7},
            {"type": "net", "time_ns": 4, "pid": 7},  # the instance halted: final
        ]
    )
    assert [(d.rule, d.verdict, d.context, d.events) for d in got] == [("child", "no-match", "7", (1, 3))]
    assert eng.stats()["parent"]["silent"] == 1


def test_instance_cap_evicts_oldest(impl: ModuleType) -> None:
    eng = impl.RuleEngine([_seq(1000)], max_instances=2)
    eng.feed([{"type": "a", "time_ns": t, "pid": t} for t in range(5)])
    assert eng.live_instances == 2
    assert eng.stats()["seq"]["evicted"] == 3
    got = eng.feed([{"type": "b", "time_ns": 9, "pid": p} for p in range(5)])
    assert [d.context for d in got] == ["3", "4"]


def test_jsonl_and_dicts_agree(impl: ModuleType) -> None:
    import json

    events = [{"type": "proc", "time_ns": i, "cmd": c} for i, c in enumerate(["x", "evil", "EVIL", "no"])]
    a = impl.RuleEngine([simple()]).feed(events)
    b = impl.RuleEngine([simple()]).feed_jsonl("\n".join(json.dumps(e) for e in events).encode())
    assert [(d.rule, d.events) for d in a] == [(d.rule, d.events) for d in b] == [("r", (1,)), ("r", (2,))]


def test_prefilter_skips_without_running(impl: ModuleType) -> None:
    eng = impl.RuleEngine([simple()])
    eng.feed([{"type": "proc", "time_ns": 1, "cmd": "benign"}, {"type": "proc", "time_ns": 2}])
    st = eng.stats()["r"]
    assert (st["skipped"], st["runs"], eng.steps) == (2, 0, 0)
