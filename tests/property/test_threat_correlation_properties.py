"""Correlation semantics against a brute-force oracle over the event list, and random aggregate code
loading and running alike in both engines.

The oracle restates the documented semantics without the engine's machinery, for streams whose
timestamps never go backwards: per group (the tuple of group-by values; an event missing one is in
no group), a condition that stays true once it holds (its counts from 1 up are ``m, m+1, ...``)
fires at an event when the events (or distinct values) since the last firing and at most
``window`` ns older reach ``m``; any other condition splits
the group's events into windows, each opened by the first event not in an earlier window and
holding the events at most ``window`` ns after it, and fires for a window whose count satisfies it,
at the window's end, naming the opening event."""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmkernel import fast, reference
from vmkernel.errors import RuleCompileError, VerifyError
from vmkernel.rules import compile as compile_native
from vmkernel.rules import program as P
from vmkernel.testing.profiles import scaled

OPS: dict[str, Callable[[int, int], bool]] = {
    ">=": operator.ge,
    ">": operator.gt,
    "<=": operator.le,
    "<": operator.lt,
    "==": operator.eq,
    "!=": operator.ne,
}
SIGMA_OPS = {">=": "gte", ">": "gt", "<=": "lte", "<": "lt", "==": "eq", "!=": "neq"}
BIG = 2**63 - 1  # the latest clock: every window has ended

conditions = st.lists(st.tuples(st.sampled_from(sorted(OPS)), st.integers(0, 5)), min_size=1, max_size=3)


def text_of(v: Any) -> list[str]:
    if isinstance(v, bool):
        return ["true" if v else "false"]
    if isinstance(v, str):
        return [v]
    if isinstance(v, int):
        return [str(v)]
    if isinstance(v, list):
        return [t for x in v if not isinstance(x, list) for t in text_of(x)]
    return []


def key_of(e: dict[str, Any], group: list[str]) -> str | None:
    parts = []
    for f in group:
        v = e.get(f)
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            return None
        parts.append(str(v))
    return parts[0] if len(parts) == 1 else json.dumps(parts, ensure_ascii=False, separators=(",", ":"))


def oracle(
    events: list[dict[str, Any]],
    *,
    group: list[str],
    candidate: Callable[[dict[str, Any]], bool],
    matches: Callable[[dict[str, Any]], bool],
    values: Callable[[dict[str, Any]], list[str]] | None,
    holds: Callable[[int], bool],
    eager_lo: int | None,
    window: int,
) -> list[tuple[str, tuple[int, ...], int]]:
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(events):
        key = key_of(e, group)
        if candidate(e) and key is not None:
            groups.setdefault(key, []).append(i)
    out = []

    def count(members: list[int]) -> int:
        if values is None:
            return len(members)
        return len({v for j in members for v in values(events[j])})

    for key, idx in groups.items():
        elig = [i for i in idx if matches(events[i]) and (values is None or values(events[i]))]
        if eager_lo is not None:
            last = -1
            for i in elig:
                t = events[i]["time_ns"]
                members = [j for j in elig if last < j <= i and t - events[j]["time_ns"] <= window]
                if count(members) >= eager_lo:
                    out.append((key, (i,), t))
                    last = i
        else:
            k = 0
            while k < len(elig):
                end = events[elig[k]]["time_ns"] + window
                members = [j for j in elig[k:] if events[j]["time_ns"] <= end]
                if holds(count(members)):
                    out.append((key, (elig[k],), end))
                k += len(members)
    return sorted(out)


def upward(holds: Callable[[int], bool], top: int) -> int | None:
    """``m`` when the counts from 1 to ``top`` that satisfy the condition are exactly m..top."""
    ok = [n for n in range(1, top + 1) if holds(n)]
    return ok[0] if ok and ok == list(range(ok[0], top + 1)) else None


def engine_run(mod: Any, progs: list[bytes], events: list[dict[str, Any]]) -> list[Any]:
    eng = mod.RuleEngine(progs)
    got = eng.feed(events) + eng.advance(BIG)
    assert eng.stats() and all(s["windows"] == 0 for s in eng.stats().values())
    return sorted((d.context, tuple(d.events), d.time_ns) for d in got)


def monotone(dts: list[int]) -> list[int]:
    t, out = 0, []
    for dt in dts:
        t += dt
        out.append(t)
    return out


# --------------------------------------------------------------------------- native rules

native_events = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["a", "b", "c"]),
            "dt": st.integers(0, 4),
        },
        optional={
            "u": st.sampled_from(["u1", "u2", 3, True]),
            "h": st.sampled_from(["h1", "h2"]),
            "k": st.sampled_from(["y", "y", "n"]),
            "v": st.sampled_from(["p", "q", "r", "p", ["p", "s"], 5, None, 1.5]),
        },
    ),
    max_size=30,
)


@settings(max_examples=scaled(400))
@given(
    native_events,
    conditions,
    st.sampled_from(["count", "distinct v", "distinct type"]),
    st.integers(1, 8),
    st.sampled_from([["u"], ["u", "h"]]),
)
def test_native_aggregates_match_the_oracle(
    raw: list[dict[str, Any]], cond: list[tuple[str, int]], what: str, window: int, group: list[str]
) -> None:
    times = monotone([e.pop("dt") for e in raw])
    events = [{**e, "time_ns": t} for e, t in zip(raw, times, strict=True)]
    text = " and ".join(f"{op} {n}" for op, n in cond)
    rule = (
        f'rule "o" {{ context {", ".join(group)}  when a, b where k == "y" {what} {text} within {window}ns }}'
    )

    def holds(n: int) -> bool:
        return all(OPS[op](n, v) for op, v in cond)

    try:
        progs = compile_native(rule)
    except RuleCompileError:
        assert not any(holds(n) for n in range(1, 12)), rule
        return
    values = (
        None
        if what == "count"
        else (lambda e: text_of(e.get("v")))
        if what == "distinct v"
        else (lambda e: [e["type"]])
    )
    expected = oracle(
        events,
        group=group,
        candidate=lambda e: e["type"] in ("a", "b"),
        matches=lambda e: e.get("k") == "y",
        values=values,
        holds=holds,
        eager_lo=upward(holds, 12),  # thresholds are at most 5
        window=window,
    )
    assert engine_run(fast, progs, events) == expected
    assert engine_run(reference, progs, events) == expected


# --------------------------------------------------------------------------- Sigma correlations

pytest.importorskip("sigma.collection")

SIGMA_BASE = "".join(
    f"""
title: Rule {k}
id: 00000000-0000-0000-0000-00000000000{k}
name: r{k}
logsource: {{product: windows, service: security}}
detection:
  sel: {{EventID: {k}}}
  condition: sel
---"""
    for k in (1, 2, 3)
)

sigma_events = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["windows/security", "windows/security", "linux/auth"]),
            "dt": st.integers(0, 3),
        },
        optional={
            "EventID": st.sampled_from([1, 2, 3, 4]),
            "User": st.sampled_from(["u1", "u2"]),
            "Host": st.sampled_from(["h1", "h2"]),
            "Target": st.sampled_from(["a", "b", "c", 7, None]),
        },
    ),
    max_size=30,
)


@settings(max_examples=scaled(150), deadline=None)
@given(
    sigma_events,
    conditions,
    st.sampled_from(["event_count", "value_count", "temporal"]),
    st.integers(1, 6),
    st.sampled_from([["User"], ["User", "Host"]]),
)
def test_sigma_correlations_match_the_oracle(
    raw: list[dict[str, Any]], cond: list[tuple[str, int]], kind: str, span_s: int, group: list[str]
) -> None:
    times = monotone([e.pop("dt") * 10**9 for e in raw])
    events = [{**e, "time_ns": t} for e, t in zip(raw, times, strict=True)]
    ops = {SIGMA_OPS[op]: n for op, n in cond}  # one value per operator, as a YAML map holds it
    refs = {"event_count": "[r1, r2]", "value_count": "[r1]", "temporal": "[r1, r2, r3]"}[kind]
    condition = dict(ops, field="Target") if kind == "value_count" else ops
    text = SIGMA_BASE + (
        "\ntitle: Correlation\nid: 00000000-0000-0000-0000-0000000000c0\ncorrelation:\n"
        f"  type: {kind}\n  rules: {refs}\n  group-by: {json.dumps(group)}\n  timespan: {span_s}s\n"
        f"  condition: {json.dumps(condition)}\n"
    )
    checks = [(op, n) for op, n in cond if SIGMA_OPS[op] in ops and ops[SIGMA_OPS[op]] == n]

    def holds(n: int) -> bool:
        return all(OPS[op](n, v) for op, v in checks)

    domain = range(1, 4) if kind == "temporal" else range(1, 12)
    ok = [n for n in domain if holds(n)]
    from vmkernel.rules import compile_sigma

    try:
        progs = [p for p in compile_sigma(text) if P.decode(p).name.endswith("c0")]
    except RuleCompileError:
        assert not ok, text
        return
    assert ok, text
    # a temporal count is at most the number of referenced rules (3)
    eager_lo = upward(holds, 3 if kind == "temporal" else 12)
    ids = {"event_count": (1, 2), "value_count": (1,), "temporal": (1, 2, 3)}[kind]

    def values(e: dict[str, Any]) -> list[str]:
        if kind == "temporal":
            return [str(e["EventID"])]
        return text_of(e.get("Target"))

    expected = oracle(
        events,
        group=group,
        candidate=lambda e: e["type"] == "windows/security",
        matches=lambda e: e.get("EventID") in ids,
        values=None if kind == "event_count" else values,
        holds=holds,
        eager_lo=eager_lo,
        window=span_s * 10**9,
    )
    assert engine_run(fast, progs, events) == expected
    assert engine_run(reference, progs, events) == expected


# --------------------------------------------------------------------------- random aggregate code

AGG_OPS = [
    P.LOADF,
    P.LOADK,
    P.LOADTYPE,
    P.AGG,
    P.WINDOW,
    P.RESET,
    P.COUNT,
    P.CMP,
    P.JF,
    P.NOT,
    P.WAIT,
    P.HALT,
]
instrs = st.builds(
    P.Instr,
    st.sampled_from(AGG_OPS),
    st.sampled_from([0, 1, 2, 16]),
    st.sampled_from([0, 1, 2, 3, 0x10, 0x21, 0x100, 0x121, 0x200, 0x201, 0x301, 0x321, 0x400]),
    st.sampled_from([0, 1, 2, 3, 4, 5, 4097, 4098]),
    st.sampled_from([0, 5, 100, 2**62, 2**62 + 1]),
)
CONSTS = [P.Const(P.K_INT, 2), P.Const(P.K_STR, "x"), P.Const(P.K_LIST, ("t1",)), P.Const(P.K_INT, 1)]


def outcome(mod: Any, data: bytes, events: list[dict[str, Any]]) -> Any:
    try:
        eng = mod.RuleEngine([data], max_instances=2)
    except VerifyError as exc:
        return (exc.code, exc.pc, str(exc))
    got = eng.feed(events) + eng.advance(BIG)
    return [(d.context, d.verdict, tuple(d.events), d.time_ns) for d in got], eng.steps, eng.stats()


@settings(max_examples=scaled(2000))
@given(
    st.lists(instrs, min_size=1, max_size=10),
    st.lists(
        st.fixed_dictionaries(
            {"type": st.sampled_from(["t1", "t2"]), "time_ns": st.integers(-5, 200)},
            optional={
                "f": st.sampled_from(["a", "b", 3, ["a", "c"], None]),
                "g": st.sampled_from(["k1", "k2"]),
            },
        ),
        max_size=12,
    ),
    st.sampled_from([[], [1], [0, 1]]),
)
def test_random_aggregate_code_loads_and_runs_identically(
    code: list[P.Instr], events: list[dict[str, Any]], context: list[int]
) -> None:
    code = [*code, P.Instr(P.HALT, x=P.MATCH)]
    data = P.encode(P.Program("x", code, CONSTS, ["f", "g"], context=context))
    got = outcome(fast, data, events)
    assert got == outcome(reference, data, events)
    if not isinstance(got, tuple) or len(got) != 3 or isinstance(got[0], str):
        return
    stats = got[2]["x"]
    assert stats["steps"] <= stats["runs"] * len(code)
    assert stats["windows"] == 0 and stats["live"] <= 2
