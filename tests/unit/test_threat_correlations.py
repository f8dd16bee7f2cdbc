"""Correlations: Sigma event_count / value_count / temporal / temporal_ordered with every condition
operator, ranges, multi-field group-by and chaining; the native count syntax; the aggregate
instructions (AGG, WINDOW, RESET, LOADK) and when a window is decided.  Both engines run every case."""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

import pytest

from vmkernel import fast, reference
from vmkernel.errors import InvalidArgument, RuleCompileError, VerifyError
from vmkernel.rules import compile, compile_sigma, disassemble, ir
from vmkernel.rules import program as P

pytest.importorskip("sigma.collection")

IMPLS = [pytest.param(fast, id="fast"), pytest.param(reference, id="reference")]
S = 10**9
MIN = 60 * S


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return request.param  # type: ignore[no-any-return]


BASE = """
title: Failed logon
id: 00000000-0000-0000-0000-0000000000f1
name: failed
logsource: {product: windows, service: security}
detection:
  sel: {EventID: 4625}
  condition: sel
---
title: Successful logon
id: 00000000-0000-0000-0000-0000000000f2
name: success
logsource: {product: windows, service: security}
detection:
  sel: {EventID: 4624}
  condition: sel
---
title: Share access
id: 00000000-0000-0000-0000-0000000000f3
name: share
logsource: {product: windows, service: security}
detection:
  sel: {EventID: 5140}
  condition: sel
"""


def correlation(kind: str, rules: str, condition: str | None, group: str = "[User]", span: str = "1m") -> str:
    cond = f"\n  condition: {condition}" if condition is not None else ""
    return (
        BASE
        + f"""---
title: Correlation
id: 00000000-0000-0000-0000-0000000000c0
correlation:
  type: {kind}
  rules: {rules}
  group-by: {group}
  timespan: {span}{cond}
"""
    )


def only(text: str) -> list[bytes]:
    """The programs of the correlation (the last document) alone."""
    progs = compile_sigma(text)
    return [p for p in progs if P.decode(p).name == "00000000-0000-0000-0000-0000000000c0"]


def ev(eid: int, t: int, user: str | None = "alice", **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "windows/security", "time_ns": t, "EventID": eid, **fields}
    if user is not None:
        out["User"] = user
    return out


def dets(got: list[Any]) -> list[tuple[str | None, tuple[int, ...], int]]:
    return [(d.context, tuple(d.events), d.time_ns) for d in got]


# --------------------------------------------------------------------------- event_count


@pytest.mark.parametrize(
    ("condition", "counts_that_fire", "lower_limit_only"),
    [
        ("{gte: 3}", {3, 4, 5}, 3),
        ("{gt: 3}", {4, 5}, 4),
        ("{lt: 3}", {1, 2}, None),
        ("{lte: 3}", {1, 2, 3}, None),
        ("{eq: 3}", {3}, None),
        ("{neq: 3}", {1, 2, 4, 5}, None),
        ("{gt: 1, lte: 3}", {2, 3}, None),
        ("{gte: 2, lt: 5, neq: 3}", {2, 4}, None),
    ],
)
def test_event_count_every_operator(
    impl: ModuleType, condition: str, counts_that_fire: set[int], lower_limit_only: int | None
) -> None:
    progs = only(correlation("event_count", "[failed]", condition))
    for n in range(1, 6):
        eng = impl.RuleEngine(progs)
        events = [ev(4625, k * S) for k in range(n)]
        events.append(ev(4624, 2 * S))  # a logon success in the window: not counted
        got = eng.feed(events) + eng.advance(10 * MIN)
        assert bool(got) == (n in counts_that_fire), (condition, n, got)
        if got and lower_limit_only:
            # a lower limit alone fires at the event that reaches it (once: the count starts again)
            k = lower_limit_only - 1
            assert dets(got) == [("alice", (k,), k * S)]
        elif got:
            # any other condition is decided when the window (opened by the first event) closes
            assert dets(got) == [("alice", (0,), MIN)]


def test_a_window_closes_at_an_event_of_its_group_or_at_advance(impl: ModuleType) -> None:
    eng = impl.RuleEngine(only(correlation("event_count", "[failed]", "{lt: 3}")))
    got = eng.feed([ev(4625, 0), ev(4625, 1 * S), ev(4625, 2 * S, "bob")])
    assert got == []
    # bob's event after both windows ended closes bob's window only
    assert dets(eng.feed([ev(4624, 2 * MIN, "bob")])) == [("bob", (2,), 2 * S + MIN)]
    assert eng.stats()["00000000-0000-0000-0000-0000000000c0"]["windows"] == 1
    # alice's next event (of any type the rule listens to) does, before it is counted itself
    got = eng.feed([ev(4624, 3 * MIN, "alice")])
    assert dets(got) == [("alice", (0,), MIN)]
    # a window ending exactly at the clock is still open; one nanosecond later it closes
    eng.feed([ev(4625, 4 * MIN, "carol")])
    assert eng.advance(5 * MIN) == []
    assert dets(eng.advance(5 * MIN + 1)) == [("carol", (5,), 5 * MIN)]
    assert eng.advance(10**18) == []
    assert eng.stats()["00000000-0000-0000-0000-0000000000c0"]["windows"] == 0


def test_an_event_at_the_window_end_still_counts(impl: ModuleType) -> None:
    eng = impl.RuleEngine(only(correlation("event_count", "[failed]", "{eq: 2}")))
    got = eng.feed([ev(4625, 0), ev(4625, MIN), ev(4625, MIN + 1)])
    # the third event is past the window [0, 1m]: it closes it (count 2) and opens the next
    assert dets(got) == [("alice", (0,), MIN)]
    assert dets(eng.advance(3 * MIN)) == []  # the second window holds one event


def test_advance_orders_by_window_end_and_checks_its_argument(impl: ModuleType) -> None:
    eng = impl.RuleEngine(only(correlation("event_count", "[failed]", "{lte: 5}")))
    eng.feed([ev(4625, 30 * S, "late"), ev(4625, 0, "early"), ev(4625, 10 * S, "middle")])
    assert [d.context for d in eng.advance(10 * MIN)] == ["early", "middle", "late"]
    for bad in ("1", 1.5, True, 2**63, None):
        with pytest.raises(InvalidArgument, match="now_ns"):
            eng.advance(bad)


# --------------------------------------------------------------------------- value_count


def test_value_count_counts_distinct_values_per_group(impl: ModuleType) -> None:
    text = correlation("value_count", "[failed]", "{field: TargetUser, gte: 3}", group="[IpAddress]")
    eng = impl.RuleEngine(only(text))

    def fail(t: int, target: Any, ip: str = "10.0.0.1") -> dict[str, Any]:
        return ev(4625, t, None, TargetUser=target, IpAddress=ip)

    got = eng.feed(
        [
            fail(0, "a"),
            fail(1 * S, "a"),  # the same value again
            fail(2 * S, "b"),
            fail(3 * S, "c", ip="10.0.0.2"),  # another group
            fail(4 * S, None),  # no value: takes no part
            fail(5 * S, ["b", "b"]),
            fail(6 * S, 7),  # an int is its decimal text
        ]
    )
    assert dets(got) == [("10.0.0.1", (6,), 6 * S)]
    # values seen more than the window ago no longer count
    got = eng.feed([fail(10 * MIN, "x"), fail(10 * MIN + 1, "y"), fail(12 * MIN, "z")])
    assert got == []


def test_value_count_decided_at_the_window_close(impl: ModuleType) -> None:
    text = correlation("value_count", "[failed]", "{field: TargetUser, lt: 2}", group="[IpAddress]")
    eng = impl.RuleEngine(only(text))
    got = eng.feed(
        [
            ev(4625, 0, None, TargetUser="a", IpAddress="one"),
            ev(4625, S, None, TargetUser="a", IpAddress="one"),
            ev(4625, 0, None, TargetUser="a", IpAddress="two"),
            ev(4625, S, None, TargetUser="b", IpAddress="two"),
            ev(4625, S, None, IpAddress="three"),  # no value: opens no window
        ]
    )
    assert got == []
    assert dets(eng.advance(2 * MIN)) == [("one", (0,), MIN)]


def test_value_count_needs_exactly_one_field() -> None:
    text = correlation("value_count", "[failed]", "{field: [A, B], gte: 2}")
    with pytest.raises(RuleCompileError, match="over 2 fields"):
        compile_sigma(text)


# --------------------------------------------------------------------------- temporal


def test_temporal_all_rules_in_any_order(impl: ModuleType) -> None:
    progs = only(correlation("temporal", "[failed, success, share]", None, span="5m"))
    eng = impl.RuleEngine(progs)
    got = eng.feed(
        [
            ev(5140, 0),
            ev(4624, 1 * MIN),
            ev(4624, 2 * MIN),
            ev(4625, 3 * MIN),  # all three within 5 minutes, in another order than listed
            ev(4625, 4 * MIN, "bob"),
            ev(4624, 5 * MIN, "bob"),
            ev(5140, 11 * MIN, "bob"),  # bob's first event is more than 5 minutes older
        ]
    )
    assert dets(got) == [("alice", (3,), 3 * MIN)]


@pytest.mark.parametrize(
    ("condition", "fires_for"),
    [
        ("{gte: 2}", {2, 3}),
        ("{eq: 1}", {1}),
        ("{lt: 3}", {1, 2}),
        ("{neq: 2}", {1, 3}),
        ("{lte: 3}", {1, 2, 3}),
    ],
)
def test_temporal_count_of_distinct_rules(impl: ModuleType, condition: str, fires_for: set[int]) -> None:
    progs = only(correlation("temporal", "[failed, success, share]", condition, span="5m"))
    for n in (1, 2, 3):
        eng = impl.RuleEngine(progs)
        events = [ev(eid, k * S) for k, eid in enumerate([4625, 4625, 4624, 5140][: n + 1 if n > 1 else 1])]
        got = eng.feed(events) + eng.advance(10**15)
        assert bool(got) == (n in fires_for), (condition, n)


def test_temporal_ordered_needs_all_rules_in_order() -> None:
    ok = only(correlation("temporal_ordered", "[failed, success]", "{eq: 2}"))
    assert len(ok) == 1
    with pytest.raises(RuleCompileError, match="only all 2 rules in order"):
        compile_sigma(correlation("temporal_ordered", "[failed, success]", "{lt: 2}"))


# --------------------------------------------------------------------------- group-by


def test_multi_field_group_by(impl: ModuleType) -> None:
    progs = only(correlation("event_count", "[failed]", "{gte: 2}", group="[User, Host]"))
    assert P.decode(progs[0]).context_fields == ["User", "Host"]
    eng = impl.RuleEngine(progs)
    got = eng.feed(
        [
            ev(4625, 0, Host="h1"),
            ev(4625, 1, Host="h2"),  # same user, other host: another group
            ev(4625, 2),  # no Host: in no group
            ev(4625, 3, Host=["h1"]),  # a list is no group value
            ev(4625, 4, Host="h1"),
            ev(4625, 5, 'x"y', Host=12),
            ev(4625, 6, 'x"y', Host="12"),  # 12 and "12" are the same group value
        ]
    )
    assert [(d.context, d.events) for d in got] == [('["alice","h1"]', (4,)), ('["x\\"y","12"]', (6,))]
    assert json.loads(got[1].context) == ['x"y', "12"]


def test_group_keys_escape_like_json(impl: ModuleType) -> None:
    rule = compile('rule "k" { context a, b  when t }')
    values = ["plain", 'q"uote', "back\\slash", "ctl\x01\x1f\n\t", "ünï €", "del\x7f"]
    got = impl.RuleEngine(rule).feed([{"type": "t", "time_ns": 0, "a": v, "b": -3} for v in values])
    assert [d.context for d in got] == [
        json.dumps([v, "-3"], ensure_ascii=False, separators=(",", ":")) for v in values
    ]


# --------------------------------------------------------------------------- chaining

SPEC_CHAIN = """
title: Many failed logins then a success
id: 00000000-0000-0000-0000-0000000000c0
correlation:
  type: temporal_ordered
  rules: [many_failed, success]
  group-by: [User]
  timespan: 10m
---
title: Many failed logins
id: 00000000-0000-0000-0000-0000000000c1
name: many_failed
correlation:
  type: event_count
  rules: [failed]
  group-by: [User]
  timespan: 10m
  condition: {gte: 3}
"""


def test_a_correlation_of_a_correlation(impl: ModuleType) -> None:
    progs = only(SPEC_CHAIN + "---" + BASE)  # the outer rule first, as in the specification's example
    eng = impl.RuleEngine(progs)
    got = eng.feed(
        [ev(4625, 0), ev(4625, S), ev(4624, 2 * S), ev(4625, 3 * S), ev(4624, 4 * S), ev(4624, 5 * S, "bob")]
    )
    assert dets(got) == [("alice", (3, 4), 4 * S)]


def test_temporal_of_an_event_count(impl: ModuleType) -> None:
    text = (
        BASE
        + """---
title: Bursts
id: 00000000-0000-0000-0000-0000000000c1
name: burst
correlation: {type: event_count, rules: [failed], group-by: [User], timespan: 1m, condition: {gte: 2}}
---
title: Burst and share
id: 00000000-0000-0000-0000-0000000000c0
correlation: {type: temporal, rules: [burst, share], group-by: [User], timespan: 5m}
"""
    )
    eng = impl.RuleEngine(only(text))
    got = eng.feed([ev(5140, 0), ev(4625, 10 * S), ev(4625, 20 * S), ev(4625, 30 * S)])
    assert dets(got) == [("alice", (2,), 20 * S)]


@pytest.mark.parametrize(
    ("inner", "reason"),
    [
        (
            "{type: event_count, rules: [failed], group-by: [Host], timespan: 1m, condition: {gte: 2}}",
            "group-by",
        ),
        (
            "{type: event_count, rules: [failed], group-by: [User], timespan: 1m, condition: {lt: 2}}",
            "upper limit",
        ),
        (
            "{type: temporal_ordered, rules: [failed, success], group-by: [User], timespan: 1m}",
            "only event_count",
        ),
    ],
)
def test_chains_that_cannot_be_inlined_say_why(inner: str, reason: str) -> None:
    text = (
        BASE
        + f"""---
title: Inner
id: 00000000-0000-0000-0000-0000000000c1
name: inner
correlation: {inner}
---
title: Outer
id: 00000000-0000-0000-0000-0000000000c0
correlation: {{type: temporal_ordered, rules: [inner, share], group-by: [User], timespan: 5m}}
"""
    )
    with pytest.raises(RuleCompileError, match=reason):
        compile_sigma(text)


def test_compile_collection_reports_every_rule_of_a_chain(tmp_path: Any) -> None:
    from vmkernel.rules.sigma import compile_collection

    (tmp_path / "chain.yml").write_text(SPEC_CHAIN + "---" + BASE)
    results = {r.name: r for r in compile_collection([tmp_path])}
    assert {n[-2:] for n in results} == {"c0", "c1", "f1", "f2", "f3"}
    assert all(r.program is not None for r in results.values())


# --------------------------------------------------------------------------- rejected with a reason


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (correlation("event_count", "[failed]", "{lt: 1}"), "can never hold"),
        (correlation("event_count", "[failed]", "{gt: 3, lt: 4}"), "can never hold"),
        (correlation("event_count", "[failed]", "{gte: 5000}"), "at most 4096"),
        (correlation("event_count", "[failed]", "{gte: 2.5}"), "integer count"),
        (correlation("temporal", "[failed, success]", "{gte: 3}"), "never hold with 2"),
        (correlation("temporal", "[failed, success]", "'failed and not success'"), "extended"),
        (correlation("value_sum", "[failed]", "{field: Bytes, gte: 3}"), "value_sum"),
        (
            correlation("temporal", "[failed, success]", None)
            + "  aliases: {ip: {failed: IpAddress, success: SourceIp}}\n",
            "aliases",
        ),
    ],
)
def test_untranslatable_correlations_say_why(text: str, reason: str) -> None:
    with pytest.raises(RuleCompileError, match=reason):
        compile_sigma(text)


def test_a_range_condition_passes_through_the_collection(tmp_path: Any) -> None:
    from vmkernel.rules.sigma import compile_collection

    (tmp_path / "range.yml").write_text(correlation("event_count", "[failed]", "{gt: 1, lte: 3}"))
    prog = {r.name: r.program for r in compile_collection([tmp_path])}["00000000-0000-0000-0000-0000000000c0"]
    assert prog is not None
    listing = disassemble(prog)
    assert "agg.window" in listing and "cmp.ge" in listing and "cmp.le" in listing


# --------------------------------------------------------------------------- native language

NATIVE = """
rule "quiet host" {
    context host
    when heartbeat count < 3 within 1m
}
rule "spray" {
    context src, dst
    when auth.failure distinct user >= 3 within 1m
}
rule "kinds" {
    context host
    when a, b, c distinct type == 2 within 1m
}
rule "range" {
    context host
    when x count > 1 and <= 2 and != 5 within 10s
}
"""


def test_native_counts_and_distinct_values(impl: ModuleType) -> None:
    eng = impl.RuleEngine(compile(NATIVE))
    got = eng.feed(
        [
            {"type": "heartbeat", "time_ns": 0, "host": "h1"},
            {"type": "heartbeat", "time_ns": 1, "host": "h1"},
            {"type": "auth.failure", "time_ns": 2, "src": "s", "dst": "d", "user": "u1"},
            {"type": "auth.failure", "time_ns": 3, "src": "s", "dst": "d", "user": "u2"},
            {"type": "auth.failure", "time_ns": 4, "src": "s", "dst": "d", "user": "u3"},
            {"type": "a", "time_ns": 5, "host": "h2"},
            {"type": "b", "time_ns": 6, "host": "h2"},
            {"type": "b", "time_ns": 7, "host": "h2"},
            {"type": "x", "time_ns": 8, "host": "h3"},
            {"type": "x", "time_ns": 9, "host": "h3"},
        ]
    )
    assert [(d.rule, d.context, d.events) for d in got] == [("spray", '["s","d"]', (4,))]
    got = eng.advance(10 * MIN)
    assert [(d.rule, d.context, d.events, d.time_ns) for d in got] == [
        ("range", "h3", (8,), 8 + 10 * S),
        ("quiet host", "h1", (0,), MIN),
        ("kinds", "h2", (5,), 5 + MIN),
    ]


@pytest.mark.parametrize(
    ("text", "column", "fragment"),
    [
        ('rule "x" {\n  when a count == 0 within 1s\n}', 16, "some count of at least 1"),
        ('rule "x" {\n  when a count > 3 and < 4 within 1s\n}', 16, "some count of at least 1"),
        ('rule "x" {\n  when a count ~ 3 within 1s\n}', 16, "token"),
        ('rule "x" {\n  when a count >= x within 1s\n}', 19, "integer"),
        ('rule "x" {\n  when a count < 5000 within 1s\n}', 18, "from 0 to 4096"),
        ('rule "x" {\n  when a distinct user within 1s\n}', 24, "count condition"),
    ],
)
def test_native_count_errors(text: str, column: int, fragment: str) -> None:
    with pytest.raises(RuleCompileError) as info:
        compile(text)
    assert (info.value.line, info.value.column) == (2, column)
    assert fragment in str(info.value)


def test_native_eager_counts_keep_the_count_instruction() -> None:
    prog = P.decode(compile('rule "x" { when a count >= 3 within 1s }')[0])
    assert [P.OPCODES[i.op] for i in prog.code] == ["count", "jf", "halt", "halt"]
    assert prog.code[0].a == 3
    prog = P.decode(compile('rule "x" { when a count > 3 within 1s }')[0])
    assert prog.code[0].a == 4
    # true for every count from 2 up: a lower limit, decided at the event that reaches it
    prog = P.decode(compile('rule "x" { when a count != 1 within 1s }')[0])
    assert (P.OPCODES[prog.code[0].op], prog.code[0].a) == ("count", 2)


# --------------------------------------------------------------------------- the VM level


def raw(code: list[P.Instr], consts: list[P.Const] | None = None, context: tuple[int, ...] = (0,)) -> bytes:
    return P.encode(
        P.Program(name="raw", code=code, consts=consts or [], fields=["f"], context=list(context))
    )


HALT = P.Instr(P.HALT, x=P.MATCH)
MON = P.Instr(P.HALT, x=P.MONITOR)
D, W = P.AGG_DISTINCT, P.AGG_DEFERRED


@pytest.mark.parametrize(
    ("code", "consts", "err", "pc"),
    [
        ([P.Instr(P.AGG, 1, 0x400, 1, 5), HALT], [], "bad-operand", 0),
        ([P.Instr(P.AGG, 1, 0x30, 1, 5), HALT], [], "bad-operand", 0),  # a value register without distinct
        ([P.Instr(P.AGG, 1, 0, 0, 5), HALT], [], "bad-counter", 0),
        ([P.Instr(P.AGG, 1, 0, P.MAX_AGG_CAP + 1, 5), HALT], [], "bad-counter", 0),
        ([P.Instr(P.AGG, 1, 0, 1, 0), HALT], [], "bad-timeout", 0),
        ([P.Instr(P.AGG, 16, 0, 1, 5), HALT], [], "bad-register", 0),
        ([P.Instr(P.AGG, 1, 0 | 5 << 4 | D, 1, 5), HALT], [], "undefined-register", 0),
        ([P.Instr(P.AGG, 1, 0, 2, 5), P.Instr(P.AGG, 1, 0, 3, 5), HALT], [], "bad-counter", 1),
        ([P.Instr(P.COUNT, 0, 0, 2, 5), P.Instr(P.AGG, 1, 0, 2, 5), HALT], [], "bad-counter", 1),
        ([P.Instr(P.AGG, 1, 0, 2, 5), P.Instr(P.WINDOW, 1, 0), HALT], [], "bad-counter", 1),
        ([P.Instr(P.AGG, 1, W, 2, 5), P.Instr(P.RESET, 0, 0), HALT], [], "bad-counter", 1),
        ([P.Instr(P.RESET, 0, 3), HALT], [], "bad-counter", 0),
        ([P.Instr(P.WINDOW, 0, 16), HALT], [], "bad-counter", 0),
        ([P.Instr(P.AGG, 1, W, 2, 5), P.Instr(P.WINDOW, 1, 0, 1), HALT], [], "bad-operand", 1),
        (
            [P.Instr(P.AGG, 1, W, 2, 5), P.Instr(P.WINDOW, 1, 0), P.Instr(P.NOT), HALT],
            [],
            "undefined-register",
            2,
        ),
        ([P.Instr(P.LOADK, 1, 0, 0), HALT], [P.Const(P.K_LIST, ("a",))], "const-type", 0),
        ([P.Instr(P.LOADK, 1, 0, 1), HALT], [P.Const(P.K_INT, 1)], "const-missing", 0),
        ([P.Instr(P.LOADK, 1, 1, 0), HALT], [P.Const(P.K_INT, 1)], "bad-operand", 0),
    ],
)
def test_bad_aggregate_programs_are_refused(
    impl: ModuleType, code: list[P.Instr], consts: list[P.Const], err: str, pc: int
) -> None:
    with pytest.raises(VerifyError) as info:
        impl.RuleEngine([raw(code, consts)])
    assert (info.value.code, info.value.pc) == (err, pc)


def test_undefined_value_register_is_named() -> None:
    for mod in (fast, reference):
        with pytest.raises(VerifyError, match="register 5 is read"):
            mod.RuleEngine([raw([P.Instr(P.AGG, 1, 5 << 4 | D, 1, 5), HALT])])


def test_a_distinct_count_saturates_at_its_cap(impl: ModuleType) -> None:
    # r1 = distinct values of f over 100 ns, cap 2; matches when r1 >= 2, then counts on
    code = [
        P.Instr(P.LOADF, 2, a=0),
        P.Instr(P.AGG, 1, 0 | 2 << 4 | D, 2, 100),
        P.Instr(P.CMP, 1, 3, 0),
        P.Instr(P.JF, a=5),
        HALT,
        MON,
    ]
    eng = impl.RuleEngine([raw(code, [P.Const(P.K_INT, 2)], context=())])
    got = eng.feed([{"type": "t", "time_ns": t, "f": v} for t, v in enumerate(["a", "b", "c", "d", "d"])])
    assert [d.events for d in got] == [(1,), (2,), (3,), (4,)]
    # 150 ns later only the values of the last 100 ns count: one
    assert eng.feed([{"type": "t", "time_ns": 150, "f": "e"}]) == []


def test_a_close_run_sees_no_event(impl: ModuleType) -> None:
    # after the window: no-match only when field f is absent and the type test fails (no event)
    code = [
        P.Instr(P.AGG, 1, W, 3, 10),
        P.Instr(P.WINDOW, 1, 0),
        P.Instr(P.LOADF, 0, a=0),
        P.Instr(P.EXISTS, 0),
        P.Instr(P.JT, a=10),
        P.Instr(P.ISTYPE, a=0),
        P.Instr(P.JT, a=10),
        P.Instr(P.CMP, 1, 3, 1),
        P.Instr(P.JF, a=10),
        P.Instr(P.HALT, x=P.NO_MATCH),
        MON,
    ]
    eng = impl.RuleEngine([raw(code, [P.Const(P.K_LIST, ("t",)), P.Const(P.K_INT, 2)])])
    assert eng.feed([{"type": "t", "time_ns": 0, "f": 1}, {"type": "t", "time_ns": 5, "f": 1}]) == []
    got = eng.feed([{"type": "t", "time_ns": 11, "f": 1}])
    assert [(d.verdict, d.context, d.events, d.time_ns) for d in got] == [("no-match", "1", (0,), 10)]


def test_windows_are_capped_and_evicted(impl: ModuleType) -> None:
    eng = impl.RuleEngine(compile('rule "w" { context u  when t count < 9 within 1s }'), max_instances=2)
    eng.feed([{"type": "t", "time_ns": i, "u": i} for i in range(5)])
    st = eng.stats()["w"]
    assert (st["windows"], st["evicted"]) == (2, 3)
    assert [d.context for d in eng.advance(10 * S)] == ["3", "4"]


def test_reset_clears_a_sliding_slot(impl: ModuleType) -> None:
    # count events over 100 ns (cap 9); match at 2 and reset: every second event matches
    code = [
        P.Instr(P.AGG, 1, 0, 9, 100),
        P.Instr(P.CMP, 1, 3, 0),
        P.Instr(P.JF, a=5),
        P.Instr(P.RESET, 0, 0),
        HALT,
        MON,
    ]
    eng = impl.RuleEngine([raw(code, [P.Const(P.K_INT, 2)])])
    got = eng.feed([{"type": "t", "time_ns": t, "f": "k"} for t in range(6)])
    assert [d.events for d in got] == [(1,), (3,), (5,)]


def test_listing_of_aggregates() -> None:
    text = disassemble(compile(NATIVE)[1])
    assert "context: src, dst" in text
    assert "agg.sliding r1, slot 0, distinct r2, cap 3" in text and "reset slot 0" in text
    text = disassemble(compile(NATIVE)[0])
    assert (
        "agg.window" in text and "window r1, slot 0" in text and "resumes at 2 when the window closes" in text
    )


def test_ir_rejects_too_deep_nesting() -> None:
    inner: ir.Expr | ir.Agg = ir.Test("f", "eq", "x")
    for _ in range(ir.MAX_AGG_DEPTH + 1):
        inner = ir.Agg(10, ir.Bound(2), parts=(("p", inner),))
    with pytest.raises(ValueError, match="nested more than"):
        ir.build(ir.RuleSpec("deep", [ir.Step(agg=inner)]))  # type: ignore[arg-type]


def test_pysigma_tooling_converts_correlations() -> None:
    from sigma.collection import SigmaCollection
    from sigma.plugins import InstalledSigmaPlugins

    backends = InstalledSigmaPlugins.autodiscover().backends
    if "vmkernel" not in backends:
        pytest.skip(
            "pysigma-backend-vmkernel is not installed (pip install -e plugins/pysigma-backend-vmkernel)"
        )
    text = correlation("value_count", "[failed]", "{field: TargetUser, lt: 3}", group="[IpAddress, Host]")
    listings = backends["vmkernel"]().convert(SigmaCollection.from_yaml(text))
    assert any("agg.window" in x and "context: IpAddress, Host" in x for x in listings)
