"""The native threat-rule language: a small readable text form compiled to programs.

Design: a hand-written tokenizer and recursive-descent parser keep every
token's line and column, so each error points at the offending token
(:class:`RuleCompileError`).  A file holds rules::

    rule "burst then root login" {
        context user                     # instances are per value of this field (or fields: a, b)
        tag "action:stop-vm"
        when auth.failure where src cidr "10.0.0.0/8" count 5 within 1m
        then auth.success where user == "root" nocase within 10m
        launch "watch-session" for 1h    # start a launch-only rule in this context
        verdict match                    # or no-match
    }

``when`` is the first event, each ``then`` a later one (a WAIT, its time
window counted from the first event).  A step may count: ``count N within D``
(at least N events), ``count > 10 and <= 20 within D`` (any of ``>= > <= <
== !=``, joined by ``and``), or ``distinct FIELD >= 5 within D`` (distinct
values of a field; ``distinct type`` counts event types).  A lower limit
alone is decided at the event that reaches it; any other condition when
the window opened by the first event closes.  Conditions combine ``and``, ``or``,
``not`` and parentheses over ``field OP value``: ``==``, ``!=``,
``startswith``, ``endswith``, ``contains``, ``glob``, ``in [..]``,
``containsany [..]`` (append ``nocase`` for case-insensitive), ``matches``
(a regex), ``cidr``, ``<``, ``<=``, ``>``, ``>=`` (integers), ``exists
field`` and ``field is null``.  ``silent`` counts determinations without
emitting them; ``launched`` makes a rule run only when launched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vmkernel.errors import RuleCompileError
from vmkernel.rules import ir
from vmkernel.rules import program as P

__all__ = ["compile_native", "parse"]

_UNITS = {
    "ns": 1,
    "us": 1_000,
    "ms": 1_000_000,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
    "d": 86400 * 10**9,
}
_TOKEN = re.compile(
    r"""(?P<ws>[ \t\r]+)|(?P<comment>\#[^\n]*)|(?P<nl>\n)
    |(?P<str>"(?:[^"\\\n]|\\.)*")
    |(?P<dur>\d+(?:ns|us|ms|s|m|h|d)\b)
    |(?P<int>-?\d+\b)
    |(?P<op>==|!=|<=|>=|<|>|[(){}\[\],])
    |(?P<word>[A-Za-z_*][A-Za-z0-9_.\-/*:]*)""",
    re.VERBOSE,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", '"': '"', "\\": "\\"}
_STRING_OPS = {
    "==": "eq",
    "startswith": "prefix",
    "endswith": "suffix",
    "contains": "contains",
    "glob": "glob",
}
_NUM_OPS = {"<": "lt", "<=": "le", ">": "gt", ">=": "ge"}
_COUNT_OPS = (">=", ">", "<=", "<", "==", "!=")


@dataclass(frozen=True)
class _Tok:
    kind: str
    text: str
    line: int
    col: int


def _tokens(text: str, source: str) -> list[_Tok]:
    out = []
    line, start = 1, 0
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise RuleCompileError(source, text[pos], "a token of the rule language", line, pos - start + 1)
        kind = m.lastgroup or ""
        if kind == "nl":
            line, start = line + 1, m.end()
        elif kind not in ("ws", "comment"):
            out.append(_Tok(kind, m.group(), line, pos - start + 1))
        pos = m.end()
    out.append(_Tok("eof", "end of input", line, pos - start + 1))
    return out


class _Parser:
    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.toks = _tokens(text, source)
        self.i = 0

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def fail(self, expected: str, tok: _Tok | None = None) -> RuleCompileError:
        tok = tok or self.tok
        return RuleCompileError(self.source, tok.text, expected, tok.line, tok.col)

    def next(self) -> _Tok:
        tok = self.tok
        self.i += 1
        return tok

    def accept(self, text: str) -> bool:
        if self.tok.text == text and self.tok.kind in ("word", "op"):
            self.i += 1
            return True
        return False

    def expect(self, text: str) -> _Tok:
        if not (self.tok.text == text and self.tok.kind in ("word", "op")):
            raise self.fail(f"{text!r}")
        return self.next()

    def string(self) -> str:
        tok = self.tok
        if tok.kind != "str":
            raise self.fail('a "quoted string"')
        self.i += 1
        body, out, k = tok.text[1:-1], [], 0
        while k < len(body):
            c = body[k]
            if c == "\\":
                esc = body[k + 1]
                if esc == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", body[k + 2 : k + 4]):
                    out.append(chr(int(body[k + 2 : k + 4], 16)))
                    k += 4
                    continue
                if esc not in _ESCAPES:
                    raise RuleCompileError(
                        self.source,
                        "\\" + esc,
                        'one of \\n \\t \\r \\0 \\" \\\\ \\xHH',
                        tok.line,
                        tok.col + k + 1,
                    )
                out.append(_ESCAPES[esc])
                k += 2
                continue
            out.append(c)
            k += 1
        return "".join(out)

    def word(self, what: str) -> str:
        if self.tok.kind == "str":
            return self.string()
        if self.tok.kind != "word":
            raise self.fail(what)
        return self.next().text

    def integer(self) -> int:
        if self.tok.kind != "int":
            raise self.fail("an integer")
        value = int(self.next().text)
        if not -(2**63) <= value < 2**63:
            raise self.fail("a 64-bit integer", self.toks[self.i - 1])
        return value

    def duration(self) -> int:
        tok = self.tok
        if tok.kind != "dur":
            raise self.fail("a duration such as 30s, 5m, 250ms")
        self.i += 1
        m = re.fullmatch(r"(\d+)(ns|us|ms|s|m|h|d)", tok.text)
        assert m is not None
        ns = int(m.group(1)) * _UNITS[m.group(2)]
        if not 1 <= ns <= P.MAX_TIMEOUT_NS:
            raise self.fail(f"a duration from 1ns to {P.MAX_TIMEOUT_NS}ns", tok)
        return ns

    # -- rules -----------------------------------------------------------------------
    def rules(self) -> list[ir.RuleSpec]:
        out = []
        while self.tok.kind != "eof":
            out.append(self.rule())
        return out

    def rule(self) -> ir.RuleSpec:
        self.expect("rule")
        name_tok = self.tok
        spec = ir.RuleSpec(self.string(), [])
        self.expect("{")
        seen_verdict = False
        while not self.accept("}"):
            tok = self.tok
            if tok.kind == "eof":
                raise self.fail("'}' closing the rule")
            key = self.word("a rule item (context, tag, silent, launched, when, then, launch, verdict)")
            if key == "context":
                group = [self.word("a field name")]
                while self.accept(","):
                    group.append(self.word("a field name"))
                if len(group) > P.MAX_GROUP:
                    raise self.fail(f"at most {P.MAX_GROUP} context fields", tok)
                spec.context = group[0] if len(group) == 1 else tuple(group)
            elif key == "tag":
                spec.tags.append(self.string())
            elif key == "silent":
                spec.silent = True
            elif key == "launched":
                spec.launched = True
            elif key in ("when", "then"):
                if (key == "when") != (not spec.steps):
                    raise self.fail("'when' once, before any 'then'", tok)
                spec.steps.append(self.step(first=key == "when"))
            elif key == "launch":
                target = self.string()
                self.expect("for")
                spec.launches.append((target, self.duration()))
            elif key == "verdict":
                v = self.word("match or no-match")
                if v not in ("match", "no-match") or seen_verdict:
                    raise self.fail("one 'verdict match' or 'verdict no-match'", self.toks[self.i - 1])
                spec.verdict, seen_verdict = v, True
            else:
                raise self.fail(
                    "a rule item (context, tag, silent, launched, when, then, launch, verdict)", tok
                )
        if not spec.steps:
            raise self.fail("a 'when' step in the rule", name_tok)
        return spec

    def step(self, first: bool) -> ir.Step:
        step = ir.Step()
        if not self.accept("any"):
            types = [self.word("an event type")]
            while self.accept(","):
                types.append(self.word("an event type"))
            step.types = tuple(types)
        if self.accept("where"):
            step.cond = self.expr()
        if self.accept("count"):
            tok = self.tok
            if tok.kind == "int":
                n = self.integer()
                if not 1 <= n <= P.MAX_COUNT:
                    raise self.fail(f"a count from 1 to {P.MAX_COUNT}", tok)
                bound = ir.Bound(n)
            else:
                bound = self.bound()
            self.expect("within")
            window = self.duration()
            if bound.eager:
                step.count = (bound.lo, window)
            else:
                step.agg = ir.Agg(window, bound)
        elif self.accept("distinct"):
            of = self.word("a field name (or type)")
            bound = ir.Bound(self.integer()) if self.tok.kind == "int" else self.bound()
            self.expect("within")
            step.agg = ir.Agg(self.duration(), bound, of=of)
        if not first:
            self.expect("within")
            step.within = self.duration()
        return step

    def bound(self) -> ir.Bound:
        """``OP N [and OP N]...`` on a count, folded into one bound."""
        start = self.tok
        lo, hi, ne = 1, None, set()
        while True:
            tok = self.tok
            if tok.kind != "op" or tok.text not in _COUNT_OPS:
                raise self.fail("a count condition (>= > <= < == != followed by an integer)")
            self.i += 1
            num_tok = self.tok
            n = self.integer()
            if not 0 <= n <= P.MAX_COUNT:
                raise self.fail(f"a count from 0 to {P.MAX_COUNT}", num_tok)
            op = tok.text
            if op in (">=", "==", ">"):
                lo = max(lo, n + (op == ">"))
            if op in ("<=", "==", "<"):
                hi = min(hi if hi is not None else n, n - (op == "<"))
            if op == "!=":
                ne.add(n)
            if not self.accept("and"):
                break
        bound = ir.Bound.of(lo, hi, ne)
        if not bound.satisfiable:
            raise self.fail("a condition that some count of at least 1 satisfies", start)
        return bound

    # -- conditions ---------------------------------------------------------------------
    def expr(self) -> ir.Expr:
        items = [self.conj()]
        while self.accept("or"):
            items.append(self.conj())
        return items[0] if len(items) == 1 else ir.Or(tuple(items))

    def conj(self) -> ir.Expr:
        items = [self.unary()]
        while self.accept("and"):
            items.append(self.unary())
        return items[0] if len(items) == 1 else ir.And(tuple(items))

    def unary(self) -> ir.Expr:
        if self.accept("not"):
            return ir.Not(self.unary())
        if self.accept("("):
            e = self.expr()
            self.expect(")")
            return e
        if self.accept("exists"):
            return ir.Test(self.word("a field name"), "exists")
        return self.comparison()

    def strings(self) -> tuple[str, ...]:
        self.expect("[")
        items = [] if self.tok.text == "]" else [self.string()]
        while self.accept(","):
            items.append(self.string())
        self.expect("]")
        return tuple(items)

    def comparison(self) -> ir.Expr:
        fld = self.word("a field name, 'not', 'exists' or '('")
        tok = self.next()
        op = tok.text
        if op == "is":
            self.expect("null")
            return ir.Test(fld, "isnull")
        if op in _NUM_OPS:
            return ir.Test(fld, _NUM_OPS[op], self.integer())
        if op in ("==", "!=") and self.tok.kind == "int":
            t = ir.Test(fld, "eq", self.integer())
            return ir.Not(t) if op == "!=" else t
        if op in _STRING_OPS or op == "!=":
            t = ir.Test(fld, _STRING_OPS.get(op, "eq"), self.string())
        elif op in ("in", "containsany"):
            t = ir.Test(fld, "in" if op == "in" else "anyof", self.strings())
        elif op == "matches":
            pattern = self.string()
            if P.check_regex(pattern) is not None:
                raise self.fail("a regex without nested repetition", self.toks[self.i - 1])
            try:
                re.compile(pattern)
            except re.error:
                raise self.fail("a valid regex", self.toks[self.i - 1]) from None
            return ir.Test(fld, "regex", pattern)
        elif op == "cidr":
            text = self.string()
            if P.parse_cidr(text) is None:
                raise self.fail("an address/prefix-length such as 10.0.0.0/8", self.toks[self.i - 1])
            return ir.Test(fld, "cidr", text)
        else:
            raise self.fail(
                "an operator (==, !=, <, startswith, contains, glob, in, matches, cidr, is null, ...)", tok
            )
        if self.accept("nocase"):
            t = ir.Test(t.field, t.op, t.value, True)
        return ir.Not(t) if op == "!=" else t


def parse(text: str, source: str = "<string>") -> list[ir.RuleSpec]:
    """The rules of a native rule text, as syntax trees."""
    if not isinstance(text, str):
        raise RuleCompileError(source, text, "rule text as a str")
    return _Parser(text, source).rules()


def compile_native(text: str, source: str = "<string>") -> list[bytes]:
    """Compile native rule text into verified programs (one per rule)."""
    out = []
    for spec in parse(text, source):
        data = P.encode(ir.build(spec))
        P.verify(data)  # verify here, so a compiler bug cannot reach an engine
        out.append(data)
    return out
