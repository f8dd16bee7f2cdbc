"""Sigma rules through pySigma: the ``vmkernel`` backend.

Design: :class:`VmkernelBackend` is a regular pySigma backend (pySigma finds
it as ``sigma.backends.vmkernel``, so ``sigma convert -t vmkernel`` and
``plugins.backends["vmkernel"]`` work).  pySigma parses the rule and applies
processing pipelines (field mappings); the backend turns the parsed condition
into :mod:`vmkernel.rules.ir` trees and lays out one program per rule.  The
log source becomes the rule's event types (``product/category`` or
``product/service``).  Correlation rules map to the VM: ``event_count`` to a
bounded counter, ``temporal_ordered`` to a sequence of WAITs, both keyed by
the single ``group-by`` field as context.  Whatever cannot be translated
(field references, unordered correlations, nested-repetition regexes ...)
raises :class:`SigmaFeatureNotSupportedByBackendError` with the reason;
:func:`compile_collection` reports every rule as compiled or rejected,
never silently dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from sigma.collection import SigmaCollection
from sigma.conditions import (
    ConditionAND,
    ConditionFieldEqualsValueExpression,
    ConditionNOT,
    ConditionOR,
    ConditionValueExpression,
)
from sigma.conversion.base import Backend
from sigma.conversion.state import ConversionState
from sigma.correlations import SigmaCorrelationConditionOperator, SigmaCorrelationRule
from sigma.exceptions import SigmaError, SigmaFeatureNotSupportedByBackendError
from sigma.processing.pipeline import ProcessingPipeline
from sigma.rule import SigmaRule
from sigma.types import (
    CompareOperators,
    SigmaBool,
    SigmaCasedString,
    SigmaCIDRExpression,
    SigmaCompareExpression,
    SigmaExists,
    SigmaExpansion,
    SigmaNull,
    SigmaNumber,
    SigmaRegularExpression,
    SigmaString,
    SpecialChars,
)

from vmkernel.errors import RuleCompileError, VerifyError
from vmkernel.rules import ir
from vmkernel.rules import program as P
from vmkernel.rules.asm import disassemble

__all__ = ["SigmaResult", "VmkernelBackend", "compile_collection", "compile_sigma_text", "logsource_types"]

_EXPAND = {
    "registry_event": [
        "registry_event",
        "registry_add",
        "registry_delete",
        "registry_set",
        "registry_rename",
    ],
    "file_delete": ["file_delete", "file_delete_detected"],
}


def _unsupported(why: str) -> SigmaFeatureNotSupportedByBackendError:
    return SigmaFeatureNotSupportedByBackendError(why)


def logsource_types(logsource: Any) -> list[str]:
    """Event types of a Sigma log source (empty: every event)."""
    product, category, service = logsource.product, logsource.category, logsource.service
    kinds = _EXPAND.get(category, [category]) if category else [service] if service else [None]
    out = []
    for kind in kinds:
        parts = [p for p in (product, kind) if p]
        if parts:
            out.append("/".join(parts))
    return out


def _string_test(field: str, s: SigmaString, nocase: bool) -> ir.Expr:
    parts: list[Any] = list(s.s)
    for p in parts:
        if not isinstance(p, (str, SpecialChars)):
            raise _unsupported(f"placeholder %{getattr(p, 'name', p)}% without a pipeline value")
    specials = [i for i, p in enumerate(parts) if isinstance(p, SpecialChars)]
    text = "".join(p for p in parts if isinstance(p, str))
    multi = SpecialChars.WILDCARD_MULTI
    n = len(parts)
    if not specials:
        return ir.Test(field, "eq", text, nocase)
    only_multi = all(parts[i] == multi for i in specials)
    if only_multi and specials == [0] and n > 1:
        return ir.Test(field, "suffix", text, nocase)
    if only_multi and specials == [n - 1] and n > 1:
        return ir.Test(field, "prefix", text, nocase)
    if only_multi and specials == [0, n - 1] and n > 2:
        return ir.Test(field, "contains", text, nocase)
    if only_multi and n == 1:
        return ir.Test(field, "exists")  # a lone '*' matches any present value
    pattern = "".join(
        ("*" if p == multi else "?")
        if isinstance(p, SpecialChars)
        else p.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?")
        for p in parts
    )
    return ir.Test(field, "glob", pattern, nocase)


def _value_test(field: str, value: Any) -> ir.Expr:
    if isinstance(value, SigmaString):
        return _string_test(field, value, not isinstance(value, SigmaCasedString))
    if isinstance(value, SigmaBool):
        return ir.Test(field, "eq", "true" if value.boolean else "false", True)
    if isinstance(value, SigmaNumber):
        if isinstance(value.number, int):
            return ir.Test(field, "eq", value.number)
        raise _unsupported(f"non-integer number {value.number}")
    if isinstance(value, SigmaNull):
        return ir.Test(field, "isnull")
    if isinstance(value, SigmaExists):
        t = ir.Test(field, "exists")
        return t if value.exists else ir.Not(t)
    if isinstance(value, SigmaRegularExpression):
        flags = "".join(
            sorted(
                SigmaRegularExpression.sigma_to_re_flag[f]
                for f in value.flags
                if f in SigmaRegularExpression.sigma_to_re_flag
            )
        )
        pattern = (f"(?{flags})" if flags else "") + value.regexp.to_plain()
        why = P.check_regex(pattern)
        if why is not None:
            raise _unsupported(why)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise _unsupported(f"regex {pattern!r} does not compile ({exc})") from None
        return ir.Test(field, "regex", pattern)
    if isinstance(value, SigmaCIDRExpression):
        return ir.Test(field, "cidr", str(value.network))
    if isinstance(value, SigmaCompareExpression):
        num = value.number.number
        if not isinstance(num, int):
            raise _unsupported(f"non-integer comparison {num}")
        ops = {
            CompareOperators.LT: "lt",
            CompareOperators.LTE: "le",
            CompareOperators.GT: "gt",
            CompareOperators.GTE: "ge",
        }
        if value.op == CompareOperators.NEQ:
            return ir.Not(ir.Test(field, "eq", num))
        return ir.Test(field, ops[value.op], num)
    if isinstance(value, SigmaExpansion):
        return ir.Or(tuple(_value_test(field, v) for v in value.values))
    raise _unsupported(f"{type(value).__name__} values")


def _convert(cond: Any) -> ir.Expr:
    if isinstance(cond, ConditionAND):
        return ir.And(tuple(_convert(a) for a in cond.args))
    if isinstance(cond, ConditionOR):
        return ir.Or(tuple(_convert(a) for a in cond.args))
    if isinstance(cond, ConditionNOT):
        return ir.Not(_convert(cond.args[0]))
    if isinstance(cond, ConditionFieldEqualsValueExpression):
        return _value_test(cond.field if cond.field is not None else "*", cond.value)
    if isinstance(cond, ConditionValueExpression):
        return _value_test("*", cond.value)
    raise _unsupported(f"condition element {type(cond).__name__}")


def simplify(e: ir.Expr) -> ir.Expr:
    """Flatten nested and/or and fold same-field equality / contains lists into one set test."""
    if isinstance(e, ir.Not):
        inner = simplify(e.item)
        return inner.item if isinstance(inner, ir.Not) else ir.Not(inner)
    if not isinstance(e, (ir.And, ir.Or)):
        return e
    kind = type(e)
    items: list[ir.Expr] = []
    for x in (simplify(i) for i in e.items):
        items.extend(x.items if isinstance(x, kind) else (x,))
    if kind is ir.Or:
        groups: dict[tuple[str, str, bool], list[str]] = {}
        rest: list[ir.Expr] = []
        for x in items:
            if isinstance(x, ir.Test) and x.op in ("eq", "contains") and isinstance(x.value, str):
                groups.setdefault((x.field, x.op, x.nocase), []).append(x.value)
            elif isinstance(x, ir.Test) and x.op in ("in", "anyof"):
                groups.setdefault((x.field, "eq" if x.op == "in" else "contains", x.nocase), []).extend(
                    x.value
                )
            else:
                rest.append(x)
        folded: list[ir.Expr] = []
        for (f, op, nocase), vals in groups.items():
            uniq = tuple(dict.fromkeys(vals))
            if len(uniq) == 1:
                folded.append(ir.Test(f, op, uniq[0], nocase))
            else:
                folded.append(ir.Test(f, "in" if op == "eq" else "anyof", uniq, nocase))
        items = folded + rest
    return items[0] if len(items) == 1 else kind(tuple(items))


@dataclass
class _Query:
    """A converted rule condition, waiting for its rule's metadata."""

    expr: ir.Expr


def _rule_name(rule: Any) -> str:
    return str(rule.id) if rule.id is not None else str(rule.title)


def _tags(rule: Any) -> list[str]:
    tags = [f"title:{rule.title}"]
    if getattr(rule, "level", None) is not None:
        tags.append(f"level:{rule.level.name.lower()}")
    tags.extend(f"sigma:{t}" for t in (rule.tags or []))
    return tags


def _typed(expr: ir.Expr, types: list[str]) -> ir.Expr:
    return expr if not types else ir.And((ir.IsType(tuple(types)), expr))


class VmkernelBackend(Backend):
    """pySigma backend producing vmkernel threat-rule programs.

    Output formats: ``default`` (an annotated listing per rule, text) and
    ``program`` (the program bytes, for ``vmkernel.fast.RuleEngine``).
    """

    name: ClassVar[str] = "vmkernel threat-rule VM"
    identifier: ClassVar[str] = "vmkernel"
    formats: ClassVar[dict[str, str]] = {
        "default": "annotated program listing",
        "program": "program bytes for vmkernel.fast.RuleEngine",
    }
    correlation_methods: ClassVar[dict[str, str] | None] = {"default": "counters and WAIT sequences"}
    requires_pipeline: ClassVar[bool] = False

    def convert_condition(self, cond: Any, state: ConversionState) -> Any:
        return _Query(simplify(_convert(cond)))

    def _program(self, rule: Any, spec: ir.RuleSpec) -> bytes:
        data = P.encode(ir.build(spec))
        try:
            P.verify(data)
        except VerifyError as exc:
            raise _unsupported(f"program rejected by the verifier: {exc}") from None
        return data

    def _finish(self, data: bytes, output_format: str) -> Any:
        return data if output_format == "program" else disassemble(data)

    def finalize_query(
        self, rule: Any, query: Any, index: int, state: ConversionState, output_format: str
    ) -> Any:
        if isinstance(query, bytes):  # a correlation rule, already laid out
            return self._finish(query, output_format)
        if not isinstance(query, _Query):
            raise _unsupported(f"query {query!r}")
        name = _rule_name(rule) + (f"#{index}" if index else "")
        spec = ir.RuleSpec(
            name, [ir.Step(tuple(logsource_types(rule.logsource)) or None, query.expr)], tags=_tags(rule)
        )
        return self._finish(self._program(rule, spec), output_format)

    def finalize_output_default(self, queries: list[Any]) -> Any:
        return queries

    def finalize_output_program(self, queries: list[Any]) -> Any:
        return queries

    # -- correlations -------------------------------------------------------------
    def _refs(self, rule: SigmaCorrelationRule) -> list[tuple[list[str], ir.Expr]]:
        out = []
        for ref in rule.rules or []:
            base = ref.rule
            if not isinstance(base, SigmaRule):
                raise _unsupported("correlation of a correlation")
            results = base.get_conversion_result()
            if len(results) != 1 or not isinstance(results[0], _Query):
                raise _unsupported(f"referenced rule {base.title!r} did not convert to one condition")
            out.append((logsource_types(base.logsource), results[0].expr))
        return out

    def _context(self, rule: SigmaCorrelationRule) -> str | None:
        group = rule.group_by or []
        if len(group) > 1:
            raise _unsupported(f"group-by on {len(group)} fields, expected at most one (the context field)")
        return group[0] if group else None

    def convert_correlation_event_count_rule(
        self, rule: SigmaCorrelationRule, output_format: str | None = None, method: str = "default"
    ) -> list[Any]:
        cond = rule.condition
        if getattr(cond, "op", None) != SigmaCorrelationConditionOperator.GTE:
            raise _unsupported("event_count conditions other than gte")
        refs = self._refs(rule)
        types = sorted({t for ts, _ in refs for t in ts}) if all(ts for ts, _ in refs) else []
        expr = (
            ir.Or(tuple(_typed(e, ts) for ts, e in refs)) if len(refs) > 1 else _typed(refs[0][1], refs[0][0])
        )
        spec = ir.RuleSpec(
            _rule_name(rule),
            [
                ir.Step(
                    tuple(types) or None,
                    expr,
                    count=(int(getattr(cond, "count", 1)), rule.timespan.seconds * 10**9),
                )
            ],
            context=self._context(rule),
            tags=_tags(rule),
        )
        return [self._program(rule, spec)]

    def convert_correlation_temporal_ordered_rule(
        self, rule: SigmaCorrelationRule, output_format: str | None = None, method: str = "default"
    ) -> list[Any]:
        refs = self._refs(rule)
        span = rule.timespan.seconds * 10**9
        steps = [ir.Step(tuple(ts) or None, e, within=span if k else None) for k, (ts, e) in enumerate(refs)]
        spec = ir.RuleSpec(_rule_name(rule), steps, context=self._context(rule), tags=_tags(rule))
        return [self._program(rule, spec)]


def _not_mapped(what: str) -> Any:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise _unsupported(f"{what} is not mapped to the rule VM")

    return method


# The condition-element methods are abstract in pySigma; this backend converts whole condition
# trees in convert_condition, so they are never called.  Correlation types without a VM mapping
# say so when used.
for _name in sorted(getattr(Backend, "__abstractmethods__", ())):
    if _name not in VmkernelBackend.__dict__:
        setattr(VmkernelBackend, _name, _not_mapped(_name.removeprefix("convert_").replace("_", " ")))
VmkernelBackend.__abstractmethods__ = frozenset()


# --------------------------------------------------------------------------- entry points


@dataclass
class SigmaResult:
    """One Sigma rule: its name, title, path, and either a program or the reason it was rejected."""

    name: str
    title: str
    path: str | None
    program: bytes | None
    reason: str | None = None


def _collection(texts: list[tuple[str | None, str]]) -> SigmaCollection:
    return SigmaCollection.merge([SigmaCollection.from_yaml(t, collect_errors=True) for _, t in texts])


def compile_collection(
    sources: list[str | Path], pipeline: ProcessingPipeline | None = None
) -> list[SigmaResult]:
    """Compile Sigma rule files (or directories of them); every rule is reported, compiled or rejected."""
    paths: list[Path] = []
    for s in sources:
        p = Path(s)
        paths.extend(sorted(p.rglob("*.yml")) if p.is_dir() else [p])
    results: list[SigmaResult] = []
    rules: list[tuple[Path, Any]] = []
    for path in paths:
        try:
            coll = SigmaCollection.from_yaml(path.read_text(encoding="utf-8"), collect_errors=True)
        except (SigmaError, OSError, UnicodeDecodeError, ValueError) as exc:
            results.append(SigmaResult(path.stem, path.stem, str(path), None, f"unreadable: {exc}"))
            continue
        for r in coll.rules:
            errs = getattr(r, "errors", [])
            if errs:
                results.append(
                    SigmaResult(_rule_name(r), str(r.title), str(path), None, f"pySigma: {errs[0]}")
                )
                continue
            rules.append((path, r))
    merged = SigmaCollection([r for _, r in rules])
    merged.resolve_rule_references()
    backend = VmkernelBackend(pipeline)  # type: ignore[abstract]  # filled in below the class
    backend.init_processing_pipeline("program")
    # base rules first, so correlations find their conversion results
    order = sorted(range(len(rules)), key=lambda i: isinstance(rules[i][1], SigmaCorrelationRule))
    for i in order:
        path, r = rules[i]
        try:
            if isinstance(r, SigmaCorrelationRule):
                out = backend.convert_correlation_rule(r, "program")
            else:
                out = backend.convert_rule(r, "program")
                if r._backreferences and not out:
                    out = [
                        backend.finalize_query(r, q, k, ConversionState(), "program")
                        for k, q in enumerate(r.get_conversion_result())
                    ]
        except (SigmaError, NotImplementedError, ValueError, TypeError, KeyError, IndexError) as exc:
            results.append(SigmaResult(_rule_name(r), str(r.title), str(path), None, _reason(exc)))
            continue
        for k, prog in enumerate(out):
            results.append(SigmaResult(_rule_name(r) + (f"#{k}" if k else ""), str(r.title), str(path), prog))
    return results


def _reason(exc: BaseException) -> str:
    text = str(exc).split("\n")[0]
    return f"{type(exc).__name__}: {text}"


def compile_sigma_text(
    text: str, pipeline: ProcessingPipeline | None = None, *, source: str = "<string>"
) -> list[bytes]:
    """Compile Sigma YAML text; the first rule that cannot be translated raises RuleCompileError."""
    if not isinstance(text, str):
        raise RuleCompileError(source, text, "Sigma YAML text as a str")
    try:
        coll = SigmaCollection.from_yaml(text)
        backend = VmkernelBackend(pipeline)  # type: ignore[abstract]  # filled in below the class
        out = backend.convert(coll, "program")
    except (SigmaError, NotImplementedError) as exc:
        raise RuleCompileError(source, _reason(exc), "a Sigma rule the rule VM can express") from None
    return list(out)
