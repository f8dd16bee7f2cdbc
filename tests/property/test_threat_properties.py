"""Hypothesis properties of the threat-rule engine: loader robustness, Rust = reference, and the
spec's invariants (operand order, double negation, context interleaving, determinism, caps, fuel).
Rules include aggregates (sliding and window counts, distinct values, nested parts) and group-by
contexts of one or two fields; runs end with ``advance`` so that every window is decided."""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from vmkernel import fast, reference
from vmkernel.errors import VerifyError
from vmkernel.rules import ir
from vmkernel.rules import program as P
from vmkernel.testing.profiles import scaled

FIELDS = ["a", "b", "cmd", "*"]
TEXTS = ["", "x", "ab", "AB", "abc", "İ", "i̇", "ß", "SS", "16", "-016", "a\x00b", "10.1.2.3", "::1", "a*b"]
REGEXES = ["^a", "b+$", "a.c", "(?i)ab", "[0-9]+", "x|y", "^$"]
CIDRS = ["10.0.0.0/8", "::1/128", "192.168.1.0/24"]
TYPES = ["t1", "t2", "t2/sub"]

texts = st.sampled_from(TEXTS)
ints = st.integers(-20, 20) | st.sampled_from([2**63 - 1, -(2**63)])
scalars = texts | ints | st.none() | st.booleans() | st.sampled_from([16.0, 1.5, 1e300])
values = scalars | st.lists(scalars, max_size=3)


@st.composite
def leaf_tests(draw: st.DrawFn) -> ir.Test:
    f = draw(st.sampled_from(FIELDS))
    op = draw(st.sampled_from(sorted(ir.TEST_OPS)))
    nocase = draw(st.booleans())
    value: Any
    if op in ("lt", "le", "gt", "ge"):
        value = draw(ints)
    elif op == "eq":
        value = draw(texts | ints)
    elif op == "regex":
        value = draw(st.sampled_from(REGEXES))
    elif op == "cidr":
        value = draw(st.sampled_from(CIDRS))
    elif op in ("in", "anyof"):
        value = tuple(draw(st.lists(texts, max_size=3)))
    elif op in ("exists", "isnull"):
        value = None
    else:
        value = draw(texts)
    return ir.Test(f, op, value, nocase)


exprs = st.recursive(
    leaf_tests(),
    lambda inner: (
        st.builds(ir.And, st.lists(inner, max_size=3).map(tuple))
        | st.builds(ir.Or, st.lists(inner, max_size=3).map(tuple))
        | st.builds(ir.Not, inner)
    ),
    max_leaves=8,
)


@st.composite
def bounds(draw: st.DrawFn, eager: bool = False) -> ir.Bound:
    lo = draw(st.integers(1, 4))
    if eager or draw(st.booleans()):
        return ir.Bound(lo)
    hi = draw(st.none() | st.integers(lo, lo + 3))
    ne = tuple(sorted(draw(st.sets(st.integers(lo, lo + 3), max_size=2))))
    return ir.Bound(lo, hi, ne)


@st.composite
def aggs(draw: st.DrawFn, nested: bool = False) -> ir.Agg:
    parts: list[tuple[str, Any]] = []
    if draw(st.booleans()):
        for k in range(draw(st.integers(1, 3))):
            item = draw(aggs(nested=True)) if not nested and draw(st.integers(0, 3)) == 0 else draw(exprs)
            parts.append((f"p{k}", item))
    distinct_parts = bool(parts) and draw(st.booleans())
    return ir.Agg(
        window=draw(st.integers(1, 50)),
        bound=draw(bounds(eager=nested)),
        of=None if distinct_parts else draw(st.sampled_from([None, None, "a", "b", "type", "*"])),
        parts=tuple(parts),
        distinct_parts=distinct_parts,
    )


@st.composite
def specs(draw: st.DrawFn, name: str = "r") -> ir.RuleSpec:
    n = draw(st.integers(1, 3))
    steps = []
    for k in range(n):
        steps.append(
            ir.Step(
                types=draw(st.none() | st.lists(st.sampled_from(TYPES), min_size=1, max_size=2).map(tuple)),
                cond=draw(st.none() | exprs),
                count=draw(st.none() | st.tuples(st.integers(1, 3), st.integers(1, 50))),
                within=draw(st.integers(1, 60)) if k else None,
                agg=draw(st.none() | aggs()) if draw(st.integers(0, 2)) == 0 else None,
            )
        )
    return ir.RuleSpec(
        name,
        steps,
        context=draw(st.sampled_from([None, "pid", ("pid", "a")])),
        silent=draw(st.booleans()),
        verdict=draw(st.sampled_from(["match", "no-match"])),
    )


@st.composite
def events(draw: st.DrawFn, n: int = 12) -> list[dict[str, Any]]:
    out = []
    t = 0
    for _ in range(draw(st.integers(0, n))):
        t += draw(st.integers(-3, 10))
        ev: dict[str, Any] = {"type": draw(st.sampled_from([*TYPES, "t3"])), "time_ns": t}
        if draw(st.booleans()):
            ev["source"] = draw(st.sampled_from(TYPES))
        for f in ("a", "b", "cmd", "pid"):
            if draw(st.booleans()):
                ev[f] = draw(values) if f != "pid" else draw(st.sampled_from([1, 2, "1", "x", 'q"\x01']))
        out.append(ev)
    return out


def run(mod: Any, progs: list[bytes], evs: list[dict[str, Any]], **kw: Any) -> tuple[Any, ...]:
    eng = mod.RuleEngine(progs, **kw)
    dets = eng.feed(evs)
    half = max((e["time_ns"] for e in evs), default=0) // 2
    dets += eng.advance(half)  # the clock moves on: windows that ended are decided
    dets += eng.feed(evs[len(evs) // 2 :])
    dets += eng.advance(2**62)
    return (
        [(d.rule, d.context, d.verdict, tuple(d.events), d.time_ns) for d in dets],
        eng.steps,
        eng.stats(),
        eng.live_instances,
    )


def load_outcome(mod: Any, data: bytes) -> tuple[str, int] | None:
    try:
        mod.RuleEngine([data])
    except VerifyError as exc:
        return (exc.code, exc.pc)
    return None


# --------------------------------------------------------------------------- loader


@settings(max_examples=scaled(3000))
@given(st.binary(max_size=300))
def test_arbitrary_bytes_load_or_raise_verify_error(data: bytes) -> None:
    assert load_outcome(fast, data) == load_outcome(reference, data)
    assert load_outcome(fast, P.MAGIC + data) == load_outcome(reference, P.MAGIC + data)


@settings(max_examples=scaled(2000))
@given(specs(), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_programs_load_or_raise_the_same_error(
    spec: ir.RuleSpec, flips: list[tuple[int, int]]
) -> None:
    data = bytearray(P.encode(ir.build(spec)))
    for pos, byte in flips:
        data[pos % len(data)] = byte
    assert load_outcome(fast, bytes(data)) == load_outcome(reference, bytes(data))


@settings(max_examples=scaled(300))
@given(
    st.lists(
        st.sampled_from([P.LOADF, P.EQ, P.NOT, P.JMP, P.JT, P.JF, P.WAIT, P.HALT, 0x99]),
        min_size=1,
        max_size=12,
    ),
    st.lists(st.integers(0, 14), min_size=12, max_size=12),
)
def test_random_code_verifies_identically(ops: list[int], args: list[int]) -> None:
    code = [P.Instr(o, 0, 0, a, 5 if o == P.WAIT else 0) for o, a in zip(ops, args, strict=False)]
    data = P.encode(P.Program("x", code, [P.Const(P.K_STR, "s")], ["f"]))
    assert load_outcome(fast, data) == load_outcome(reference, data)


# --------------------------------------------------------------------------- Rust = reference


@settings(max_examples=scaled(2000))
@given(st.lists(specs(), min_size=1, max_size=3), events())
def test_random_rules_agree_rust_and_reference(
    rule_specs: list[ir.RuleSpec], evs: list[dict[str, Any]]
) -> None:
    progs = []
    for i, s in enumerate(rule_specs):
        s.name = f"r{i}"
        progs.append(P.encode(ir.build(s)))
    got = run(fast, progs, evs, max_instances=3)
    assert got == run(reference, progs, evs, max_instances=3)
    # fuel: no run takes more steps than the program has instructions
    for i, s in enumerate(rule_specs):
        stats = got[2][f"r{i}"]
        assert stats["steps"] <= stats["runs"] * len(ir.build(s).code)
        assert stats["live"] <= 3
        assert stats["windows"] == 0  # advance(2**62) decided every window


@settings(max_examples=scaled(500))
@given(specs(), events())
def test_jsonl_agrees_with_dicts(spec: ir.RuleSpec, evs: list[dict[str, Any]]) -> None:
    import json

    progs = [P.encode(ir.build(spec))]
    data = "\n".join(json.dumps(e) for e in evs).encode()
    for mod in (fast, reference):
        a = mod.RuleEngine(progs).feed(evs)
        b = mod.RuleEngine(progs).feed_jsonl(data)
        assert [(d.rule, d.events) for d in a] == [(d.rule, d.events) for d in b]


# --------------------------------------------------------------------------- invariants


def _shuffle(e: ir.Expr, flip: bool) -> ir.Expr:
    if isinstance(e, ir.And):
        return ir.And(tuple(_shuffle(x, flip) for x in reversed(e.items)))
    if isinstance(e, ir.Or):
        return ir.Or(tuple(_shuffle(x, flip) for x in reversed(e.items)))
    if isinstance(e, ir.Not):
        return ir.Not(_shuffle(e.item, flip))
    return ir.Not(ir.Not(e)) if flip else e


def dets_only(mod: Any, progs: list[bytes], evs: list[dict[str, Any]]) -> list[Any]:
    return run(mod, progs, evs)[0]


@settings(max_examples=scaled(1000))
@given(specs(), events(), st.booleans())
def test_operand_order_and_double_negation_change_nothing(
    spec: ir.RuleSpec, evs: list[dict[str, Any]], flip: bool
) -> None:
    base = dets_only(fast, [P.encode(ir.build(spec))], evs)
    for step in spec.steps:
        if step.cond is not None:
            step.cond = _shuffle(step.cond, flip)
    assert dets_only(fast, [P.encode(ir.build(spec))], evs) == base


@settings(max_examples=scaled(1000))
@given(specs(), events(), st.randoms(use_true_random=False))
def test_interleaving_contexts_keeps_each_contexts_determinations(
    spec: ir.RuleSpec, evs: list[dict[str, Any]], rnd: Any
) -> None:
    spec.context = "pid"
    progs = [P.encode(ir.build(spec))]
    for i, e in enumerate(evs):
        e["pid"] = i % 3
    by_ctx: dict[int, list[dict[str, Any]]] = {}
    for e in evs:
        by_ctx.setdefault(e["pid"], []).append(e)
    # a random interleaving that keeps each context's own order
    queues = {k: list(v) for k, v in by_ctx.items()}
    mixed = []
    while queues:
        k = rnd.choice(sorted(queues))
        mixed.append(queues[k].pop(0))
        if not queues[k]:
            del queues[k]

    def per_context(stream: list[dict[str, Any]]) -> dict[str, list[Any]]:
        eng = fast.RuleEngine(progs)
        out: dict[str, list[Any]] = {}
        for d in eng.feed(stream):
            out.setdefault(d.context, []).append((d.verdict, [id(stream[i]) for i in d.events], d.time_ns))
        return out

    assert per_context(evs) == per_context(mixed)


@settings(max_examples=scaled(500))
@given(st.lists(specs(), min_size=1, max_size=3), events())
def test_same_stream_same_determinations_split_or_whole(
    rule_specs: list[ir.RuleSpec], evs: list[dict[str, Any]]
) -> None:
    progs = [
        P.encode(ir.build(s)) for s in (setattr(s, "name", f"r{i}") or s for i, s in enumerate(rule_specs))
    ]
    whole = fast.RuleEngine(progs).feed(evs)
    eng = fast.RuleEngine(progs)
    parts = [d for e in evs for d in eng.feed([e])]
    assert whole == parts
    assert fast.RuleEngine(progs).feed(evs) == whole


def test_packed_instruction_is_sixteen_bytes() -> None:
    assert struct.calcsize("<BBHIQ") == P.INSTR_SIZE == 16
