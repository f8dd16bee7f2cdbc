"""Two-step sequences keyed by context with maxspan agree with the ``eql`` package.

eql's default time unit is Windows FileTime (10,000,000 ticks per second); the engine here is
given ``time_unit=10**9`` so that its timestamps are nanoseconds like ours."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmkernel import fast, reference
from vmkernel.rules import compile as compile_native
from vmkernel.testing.profiles import scaled

eql = pytest.importorskip("eql")

SECOND = 10**9


def eql_sequences(events: list[dict[str, Any]], maxspan_s: int) -> list[tuple[int, ...]]:
    query = eql.parse_query(f"sequence by pid with maxspan={maxspan_s}s [a where true] [b where true]")
    engine = eql.PythonEngine({"time_unit": SECOND})
    out: list[tuple[int, ...]] = []
    engine.add_query(query)
    engine.add_output_hook(lambda result: out.append(tuple(e.data["seq"] for e in result.events)))
    engine.stream_events([{"event_type": e["type"], "timestamp": e["time_ns"], **e} for e in events])
    return out


@settings(max_examples=scaled(500))
@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 3), st.integers(0, 4 * SECOND)),
        max_size=30,
    ),
    st.integers(1, 5),
)
def test_two_step_sequences_agree_with_eql(raw: list[tuple[str, int, int]], maxspan_s: int) -> None:
    t = 0
    events = []
    for i, (ty, pid, dt) in enumerate(raw):
        t += dt
        events.append({"type": ty, "time_ns": t, "pid": pid, "seq": i})
    rule = compile_native(f'rule "s" {{ context pid  when a  then b within {maxspan_s}s }}')
    expected = eql_sequences(events, maxspan_s)
    for mod in (fast, reference):
        got = [tuple(d.events) for d in mod.RuleEngine(rule).feed(events)]
        assert got == expected


def test_a_known_stream() -> None:
    events = [
        {"type": "a", "time_ns": 0, "pid": 1, "seq": 0},
        {"type": "a", "time_ns": 1 * SECOND, "pid": 1, "seq": 1},  # replaces the pending sequence
        {"type": "b", "time_ns": 2 * SECOND, "pid": 2, "seq": 2},  # other context
        {"type": "b", "time_ns": 3 * SECOND, "pid": 1, "seq": 3},
        {"type": "a", "time_ns": 4 * SECOND, "pid": 1, "seq": 4},
        {"type": "b", "time_ns": 9 * SECOND, "pid": 1, "seq": 5},  # beyond maxspan
    ]
    rule = compile_native('rule "s" { context pid  when a  then b within 2s }')
    assert eql_sequences(events, 2) == [(1, 3)]
    assert [tuple(d.events) for d in fast.RuleEngine(rule).feed(events)] == [(1, 3)]
