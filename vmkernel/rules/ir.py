"""Rule syntax trees and their translation into programs.

Design: both front ends (the native language and Sigma) build the same small
tree — tests on fields combined with and/or/not — and a :class:`RuleSpec`
of steps (the first step starts an instance, each later one is a WAIT), then
:func:`build` lays the program out: short-circuit jumps, every failure jumps
forward to one final ``halt monitor``, so the verifier's rules hold by
construction.  :func:`required_literals` derives the pre-filter: a set of
(field, literal) pairs one of which occurs (lowercased) in every event that
can pass the first step, so the engine may skip the rule on other events.

A step may carry an :class:`Agg`: a count of its events, or of distinct
values of a field, or of distinct *parts* (alternative conditions, which may
themselves be aggregates that fire), checked against a :class:`Bound` over a
time window.  A bound with only a lower limit is decided at the event that
reaches it (a sliding window, cleared when it fires); any other bound is
decided when a window opened by the first event closes (``agg`` deferred,
then ``window``).  Registers: r0 holds field loads of tests; an aggregate
nested ``d`` deep uses r(1+3d) for its count, r(2+3d) for values and r(3+3d)
as a "some part matched" mark, so aggregates nest at most four deep.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

from vmkernel.rules import program as P

__all__ = [
    "TEST_OPS",
    "Agg",
    "And",
    "Bound",
    "Expr",
    "IsType",
    "Not",
    "Or",
    "RuleSpec",
    "Step",
    "Test",
    "build",
    "required_literals",
]

#: Test operators: name -> (opcode, x flag for case-sensitive, value kind).
TEST_OPS: dict[str, tuple[int, int]] = {
    "eq": (P.EQ, 0),
    "prefix": (P.PREFIX, 0),
    "suffix": (P.SUFFIX, 0),
    "contains": (P.CONTAINS, 0),
    "glob": (P.GLOB, 0),
    "regex": (P.REGEX, 0),
    "lt": (P.CMP, 0),
    "le": (P.CMP, 1),
    "gt": (P.CMP, 2),
    "ge": (P.CMP, 3),
    "cidr": (P.CIDR, 0),
    "exists": (P.EXISTS, 0),
    "isnull": (P.ISNULL, 0),
    "in": (P.INSET, 0),
    "anyof": (P.ANYOF, 0),
}
_CASED = {"eq", "prefix", "suffix", "contains", "glob", "in", "anyof"}


@dataclass(frozen=True)
class Test:
    """``field op value``; ``nocase`` for the string operators; value is str, int, or a tuple of str."""

    field: str
    op: str
    value: Any = None
    nocase: bool = False


@dataclass(frozen=True)
class IsType:
    """The event's type or source is one of ``types`` (or has one as a ``/``-prefix)."""

    types: tuple[str, ...]


@dataclass(frozen=True)
class And:
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class Or:
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class Not:
    item: Expr


Expr = Union[Test, IsType, And, Or, Not]  # noqa: UP007 - a runtime alias

#: Most aggregates nested inside one another (registers r1..r15, three per level).
MAX_AGG_DEPTH = 4


@dataclass(frozen=True)
class Bound:
    """A condition on a count ``n``: ``lo <= n``, ``n <= hi`` (None: no upper limit), ``n`` not in ``ne``."""

    lo: int = 1
    hi: int | None = None
    ne: tuple[int, ...] = ()

    @property
    def eager(self) -> bool:
        """Only a lower limit: once it holds, more events cannot undo it, so it is decided at once."""
        return self.hi is None and not self.ne

    def holds(self, n: int) -> bool:
        return n >= self.lo and (self.hi is None or n <= self.hi) and n not in self.ne

    @staticmethod
    def of(lo: int, hi: int | None, ne: set[int] | tuple[int, ...] = ()) -> Bound:
        """The normal form: ``lo`` at least 1 and itself allowed (excluded counts below it raise it),
        only excluded counts inside ``lo..hi`` kept; so a condition true for every count from some
        value up is a lower limit alone (``!= 1`` is ``>= 2``), decided at once."""
        lo = max(lo, 1)
        while lo in ne:
            lo += 1
        return Bound(lo, hi, tuple(sorted(x for x in ne if x > lo and (hi is None or x <= hi))))

    @property
    def satisfiable(self) -> bool:
        """Some count of at least 1 satisfies it."""
        return any(self.holds(n) for n in range(self.lo, self.lo + len(self.ne) + 2))

    @property
    def cap(self) -> int:
        """Counting up to this many decides the bound (a count saturated at ``cap`` compares alike)."""
        return max(1, self.lo, *((self.hi + 1,) if self.hi is not None else ()), *(x + 1 for x in self.ne))


@dataclass(frozen=True)
class Agg:
    """An aggregate over ``window`` ns per context, checked against ``bound``.

    It counts the events that take part (every event of the step, or with ``parts`` those that match
    a part), or with ``of`` the distinct text values of that field (``"type"``: the event type), or
    with ``distinct_parts`` the distinct parts matched (their tags).  A part is an expression or an
    eager :class:`Agg` that takes part when it fires.
    """

    window: int
    bound: Bound = Bound()
    of: str | None = None
    parts: tuple[tuple[str, Expr | Agg], ...] = ()
    distinct_parts: bool = False


@dataclass
class Step:
    """One event of a sequence: its types (None: any), condition, optional count and time window."""

    types: tuple[str, ...] | None = None
    cond: Expr | None = None
    count: tuple[int, int] | None = None  # (threshold, window ns)
    within: int | None = None  # later steps: ns since the first event
    agg: Agg | None = None


@dataclass
class RuleSpec:
    name: str
    steps: list[Step]
    context: str | tuple[str, ...] | None = None  # group-by field(s)
    silent: bool = False
    launched: bool = False
    tags: list[str] = field(default_factory=list)
    launches: list[tuple[str, int]] = field(default_factory=list)  # (rule, timeout ns)
    verdict: str = "match"
    prefilter: bool = True


class _Builder:
    def __init__(self) -> None:
        self.consts: list[P.Const] = []
        self.const_ix: dict[tuple[int, Any], int] = {}
        self.fields: list[str] = []
        self.field_ix: dict[str, int] = {}
        self.code: list[list[int]] = []  # [op, r, x, a, imm]; jumps hold label ids until patched
        self.labels: dict[int, int] = {}
        self.fixups: list[int] = []
        self.next_label = 0
        self.slots = 0

    def const(self, kind: int, value: Any) -> int:
        key = (kind, value)
        ix = self.const_ix.get(key)
        if ix is None:
            ix = len(self.consts)
            self.consts.append(P.Const(kind, value))
            self.const_ix[key] = ix
        return ix

    def field(self, name: str) -> int:
        ix = self.field_ix.get(name)
        if ix is None:
            ix = len(self.fields)
            self.fields.append(name)
            self.field_ix[name] = ix
        return ix

    def label(self) -> int:
        self.next_label += 1
        return self.next_label

    def place(self, label: int) -> None:
        self.labels[label] = len(self.code)

    def emit(self, op: int, r: int = 0, x: int = 0, a: int = 0, imm: int = 0) -> None:
        self.code.append([op, r, x, a, imm])

    def jump(self, op: int, label: int) -> None:
        self.fixups.append(len(self.code))
        self.emit(op, a=label)

    def true(self) -> None:
        self.emit(P.LOADTYPE, 0)
        self.emit(P.EXISTS, 0)

    def expr(self, e: Expr) -> None:
        """Code that leaves ``e`` in the flag."""
        if isinstance(e, Test):
            self.test(e)
        elif isinstance(e, IsType):
            self.emit(P.ISTYPE, a=self.const(P.K_LIST, tuple(e.types)))
        elif isinstance(e, Not):
            self.expr(e.item)
            self.emit(P.NOT)
        elif isinstance(e, (And, Or)):
            if not e.items:
                self.true()
                if isinstance(e, Or):
                    self.emit(P.NOT)
                return
            end = self.label()
            for k, item in enumerate(e.items):
                self.expr(item)
                if k < len(e.items) - 1:
                    self.jump(P.JF if isinstance(e, And) else P.JT, end)
            self.place(end)
        else:
            raise TypeError(f"not an expression: {e!r}")

    def test(self, t: Test) -> None:
        opcode, x = TEST_OPS[t.op]
        if t.nocase and t.op in _CASED:
            x = 1
        self.emit(P.LOADF, 0, a=self.field(t.field))
        a = 0
        if opcode in (P.EXISTS, P.ISNULL):
            pass
        elif opcode == P.EQ and isinstance(t.value, int) and not isinstance(t.value, bool):
            a, x = self.const(P.K_INT, t.value), 0
        elif opcode == P.CMP:
            a = self.const(P.K_INT, int(t.value))
        elif opcode == P.REGEX:
            a = self.const(P.K_REGEX, t.value)
        elif opcode == P.CIDR:
            a = self.const(P.K_CIDR, t.value)
        elif opcode in (P.INSET, P.ANYOF):
            a = self.const(P.K_LIST, tuple(t.value))
        else:
            a = self.const(P.K_STR, str(t.value))
        self.emit(opcode, 0, x, a)

    def slot(self) -> int:
        if self.slots >= P.MAX_SLOTS:
            raise ValueError(f"more than {P.MAX_SLOTS} counters in one rule")
        self.slots += 1
        return self.slots - 1

    def bound(self, reg: int, bound: Bound, fail: int, *, deferred: bool) -> None:
        """Checks of ``reg`` against ``bound``; each failing one jumps to ``fail``."""
        if bound.lo > 1 or not deferred:  # a closed window holds at least one event
            self.emit(P.CMP, reg, 3, self.const(P.K_INT, bound.lo))
            self.jump(P.JF, fail)
        if bound.hi is not None:
            self.emit(P.CMP, reg, 1, self.const(P.K_INT, bound.hi))
            self.jump(P.JF, fail)
        for x in bound.ne:
            self.emit(P.EQ, reg, 0, self.const(P.K_INT, x))
            self.emit(P.NOT)
            self.jump(P.JF, fail)

    def any_part(self, parts: tuple[tuple[str, Expr | Agg], ...], depth: int) -> None:
        """Leave in the flag whether some part matches; every aggregate part is fed (no short cut)."""
        if all(not isinstance(item, Agg) for _, item in parts):
            self.expr(Or(tuple(item for _, item in parts)))  # type: ignore[misc]
            return
        mark = 3 + 3 * depth
        self.emit(P.LOADK, mark, a=self.const(P.K_INT, 0))
        for _, item in parts:
            nxt = self.label()
            self.item(item, depth + 1)
            self.jump(P.JF, nxt)
            self.emit(P.LOADK, mark, a=self.const(P.K_INT, 1))
            self.place(nxt)
        self.emit(P.EQ, mark, 0, self.const(P.K_INT, 1))

    def item(self, item: Expr | Agg, depth: int) -> None:
        """Leave in the flag whether ``item`` matches this event (an aggregate: whether it fires)."""
        if not isinstance(item, Agg):
            self.expr(item)
            return
        if not item.bound.eager:
            raise ValueError("a nested aggregate must be decided at an event (a lower limit only)")
        end = self.label()
        self.agg(item, depth, end, deferred=False)
        self.place(end)

    def agg(self, agg: Agg, depth: int, fail: int, *, deferred: bool) -> None:
        """The aggregate's code: falls through when it holds (flag set), else jumps to ``fail``."""
        if depth >= MAX_AGG_DEPTH:
            raise ValueError(f"aggregates nested more than {MAX_AGG_DEPTH} deep")
        count, value = 1 + 3 * depth, 2 + 3 * depth
        cap, lo = agg.bound.cap, agg.bound.lo
        if agg.parts and not agg.distinct_parts:
            self.any_part(agg.parts, depth)
            self.jump(P.JF, fail)
        if agg.of is None and not agg.distinct_parts and not deferred:
            self.emit(P.COUNT, x=self.slot(), a=lo, imm=agg.window)
            self.jump(P.JF, fail)
            return
        slot = self.slot()
        flags = P.AGG_DEFERRED if deferred else 0
        if agg.distinct_parts:
            self.emit(P.LOADK, count, a=self.const(P.K_INT, 0))
            for tag, item in agg.parts:
                nxt = self.label()
                self.item(item, depth + 1)
                self.jump(P.JF, nxt)
                self.emit(P.LOADK, value, a=self.const(P.K_STR, tag))
                self.emit(P.AGG, count, slot | value << 4 | P.AGG_DISTINCT | flags, cap, agg.window)
                self.place(nxt)
        elif agg.of is not None:
            if agg.of == "type":
                self.emit(P.LOADTYPE, value)
            else:
                self.emit(P.LOADF, value, a=self.field(agg.of))
            self.emit(P.AGG, count, slot | value << 4 | P.AGG_DISTINCT | flags, cap, agg.window)
        else:
            self.emit(P.AGG, count, slot | flags, cap, agg.window)
        if deferred:
            self.emit(P.WINDOW, count, slot)
        self.bound(count, agg.bound, fail, deferred=deferred)
        if not deferred:
            self.emit(P.RESET, x=slot)

    def finish(self) -> list[P.Instr]:
        for pc in self.fixups:
            self.code[pc][3] = self.labels[self.code[pc][3]]
        return [P.Instr(*ins) for ins in self.code]


def build(spec: RuleSpec) -> P.Program:
    """Lay out ``spec`` as a program (not yet encoded; :func:`program.encode` it)."""
    b = _Builder()
    fail = b.label()
    all_types: list[str] = []
    any_type = False
    for st in spec.steps:
        if st.types is None:
            any_type = True
        else:
            all_types.extend(t for t in st.types if t not in all_types)
    header_types = [] if any_type else all_types
    for k, st in enumerate(spec.steps):
        if k > 0:
            types_ix = P.ANY_TYPES if st.types is None else b.const(P.K_LIST, tuple(st.types))
            b.emit(P.WAIT, a=types_ix, imm=st.within or P.MAX_TIMEOUT_NS)
        if k == 0 and st.types is not None and list(st.types) != header_types:
            b.emit(P.ISTYPE, a=b.const(P.K_LIST, tuple(st.types)))
            b.jump(P.JF, fail)
        if st.cond is not None:
            b.expr(st.cond)
            b.jump(P.JF, fail)
        if st.count is not None:
            b.emit(P.COUNT, x=b.slot(), a=st.count[0], imm=st.count[1])
            b.jump(P.JF, fail)
        if st.agg is not None:
            b.agg(st.agg, 0, fail, deferred=not st.agg.bound.eager)
    launches: list[str] = []
    for target, timeout in spec.launches:
        if target not in launches:
            launches.append(target)
        b.emit(P.LAUNCH, a=launches.index(target), imm=timeout)
    b.emit(P.HALT, x=P.HALT_VERDICTS.index(spec.verdict))
    b.place(fail)
    b.emit(P.HALT, x=P.MONITOR)
    code = b.finish()
    prefilter: list[tuple[int, str]] = []
    first = spec.steps[0] if spec.steps else None
    gate = None if first is None else first.cond if first.cond is not None else _agg_expr(first.agg)
    if spec.prefilter and gate is not None:
        req = required_literals(gate)
        if req:
            prefilter = [(b.field(f), lit) for f, lit in sorted(req)]
    group = (spec.context,) if isinstance(spec.context, str) else spec.context or ()
    context = [b.field(f) for f in group]
    return P.Program(
        name=spec.name,
        code=code,
        consts=b.consts,
        fields=b.fields,
        types=header_types,
        launches=launches,
        tags=list(spec.tags),
        prefilter=prefilter,
        context=context,
        silent=spec.silent,
        launched=spec.launched,
    )


def _agg_expr(agg: Agg | Expr | None) -> Expr | None:
    """An expression every event that takes part in ``agg`` satisfies (None: any event may)."""
    if not isinstance(agg, Agg):
        return agg
    if not agg.parts:
        return None
    items = [_agg_expr(item) for _, item in agg.parts]
    return None if any(e is None for e in items) else Or(tuple(e for e in items if e is not None))


def _glob_literal(pattern: str) -> str:
    """The longest run of literal characters in a glob."""
    best = cur = ""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            cur += pattern[i + 1]
            i += 2
            continue
        if c in "*?":
            best = max(best, cur, key=len)
            cur = ""
        else:
            cur += c
        i += 1
    return max(best, cur, key=len)


def required_literals(e: Expr) -> frozenset[tuple[str, str]] | None:
    """(field, literal) pairs one of which every event satisfying ``e`` contains; None if unknown."""
    if isinstance(e, Test):
        if e.op in ("eq", "prefix", "suffix", "contains") and isinstance(e.value, str) and e.value:
            return frozenset({(e.field, e.value)})
        if e.op == "glob" and isinstance(e.value, str):
            lit = _glob_literal(e.value)
            return frozenset({(e.field, lit)}) if len(lit) >= 3 else None
        if e.op in ("in", "anyof") and e.value and all(isinstance(v, str) and v for v in e.value):
            return frozenset((e.field, v) for v in e.value)
        return None
    if isinstance(e, And):
        options = [s for s in (required_literals(x) for x in e.items) if s]
        if not options:
            return None
        return min(options, key=lambda s: (len(s) > 64, -min(len(lit) for _, lit in s), len(s)))
    if isinstance(e, Or):
        out: set[tuple[str, str]] = set()
        for x in e.items:
            s = required_literals(x)
            if not s:
                return None
            out |= s
        return frozenset(out)
    return None
