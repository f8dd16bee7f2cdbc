"""Sigma rules through pySigma: the ``vmkernel`` backend.

Design: :class:`VmkernelBackend` is a regular pySigma backend (pySigma finds
it as ``sigma.backends.vmkernel``, so ``sigma convert -t vmkernel`` and
``plugins.backends["vmkernel"]`` work).  pySigma parses the rule and applies
processing pipelines (field mappings); the backend turns the parsed condition
into :mod:`vmkernel.rules.ir` trees and lays out one program per rule.  The
log source becomes the rule's event types (``product/category`` or
``product/service``).  Correlation rules map to the VM with the ``group-by``
fields as the context (the group key): ``event_count`` counts events,
``value_count`` distinct values of its field, ``temporal`` distinct
referenced rules (each tagged), all over a window per group; a condition
with a lower limit only fires at the event that reaches it, any other
(``lt``, ``lte``, ``eq``, ``neq``, ranges) when the window closes.
``temporal_ordered`` becomes a sequence of WAITs.  A referenced correlation
is inlined as a part that takes part when it fires (same group-by, lower
limit only).  Range conditions (several operators) are read by
:func:`prepare_documents` before pySigma, which accepts one operator only.
Whatever cannot be translated (field references, aliases, extended boolean
conditions, value_sum and friends, nested-repetition regexes ...) raises
:class:`SigmaFeatureNotSupportedByBackendError` with the reason;
:func:`compile_collection` reports every rule as compiled or rejected,
never silently dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml
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
from sigma.correlations import (
    SigmaCorrelationCondition,
    SigmaCorrelationRule,
    SigmaCorrelationType,
    SigmaExtendedCorrelationCondition,
)
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

__all__ = [
    "SigmaResult",
    "VmkernelBackend",
    "compile_collection",
    "compile_sigma_text",
    "logsource_types",
    "prepare_documents",
]

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
    correlation_methods: ClassVar[dict[str, str] | None] = {
        "default": "counters, distinct-value windows and WAIT sequences"
    }
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
    def _item(self, ref: Any, group: tuple[str, ...], depth: int) -> tuple[list[str], ir.Expr | ir.Agg]:
        """A referenced rule as a part: its log-source types and its condition, or (a chained
        correlation) an aggregate that takes part when it fires."""
        base = ref.rule
        if isinstance(base, SigmaRule):
            results = base.get_conversion_result()
            if len(results) != 1 or not isinstance(results[0], _Query):
                raise _unsupported(f"referenced rule {base.title!r} did not convert to one condition")
            types = logsource_types(base.logsource)
            return types, _typed(results[0].expr, types)
        if not isinstance(base, SigmaCorrelationRule):
            raise _unsupported(f"reference {ref.reference!r} is neither a rule nor a correlation")
        kind = base.type.name.lower()
        if base.type not in _AGGREGATES:
            raise _unsupported(
                f"referenced {kind} correlation {base.title!r}: only event_count, value_count and temporal "
                "correlations can feed another correlation"
            )
        if set(_group(base)) != set(group):
            raise _unsupported(
                f"referenced correlation {base.title!r} groups by {list(_group(base))}, expected the same "
                f"group-by as the correlation using it ({list(group)})"
            )
        types, agg = self._agg(base, depth + 1)
        if not agg.bound.eager:
            raise _unsupported(
                f"referenced correlation {base.title!r} has an upper limit or an excluded count, so it is "
                "decided only when its window closes and cannot feed another correlation"
            )
        return types, agg

    def _parts(
        self, rule: SigmaCorrelationRule, depth: int
    ) -> tuple[list[str], list[tuple[str, Any]], list[list[str]]]:
        if isinstance(rule.condition, SigmaExtendedCorrelationCondition):
            raise _unsupported("extended (boolean) correlation conditions")
        if rule.aliases is not None and len(rule.aliases):
            raise _unsupported(
                "group-by aliases (a field name per referenced rule) are not mapped: the group key "
                "is read from the same fields in every event"
            )
        if depth > ir.MAX_AGG_DEPTH:
            raise _unsupported(f"correlations chained more than {ir.MAX_AGG_DEPTH} deep")
        group = _group(rule)
        parts: list[tuple[str, Any]] = []
        part_types: list[list[str]] = []
        all_types: list[str] = []
        for k, ref in enumerate(rule.rules or []):
            types, item = self._item(ref, group, depth)
            name = _rule_name(ref.rule) if isinstance(ref.rule, (SigmaRule, SigmaCorrelationRule)) else str(k)
            parts.append((name, item))
            part_types.append(types)
            all_types.extend(t for t in types if t not in all_types)
        if not parts:
            raise _unsupported("a correlation without referenced rules")
        return ([] if not all(part_types) else sorted(all_types)), parts, part_types

    def _agg(self, rule: SigmaCorrelationRule, depth: int) -> tuple[list[str], ir.Agg]:
        types, parts, _ = self._parts(rule, depth)
        span = _span(rule)
        if rule.type == SigmaCorrelationType.TEMPORAL:
            tags = [name for name, _ in parts]
            if len(set(tags)) != len(tags):
                parts = [(str(k), item) for k, (_, item) in enumerate(parts)]
            return types, ir.Agg(span, _bound(rule, len(parts)), parts=tuple(parts), distinct_parts=True)
        bound = _bound(rule, None)
        if rule.type == SigmaCorrelationType.VALUE_COUNT:
            ref = getattr(rule.condition, "fieldref", None)
            fields = [ref] if isinstance(ref, str) else list(ref or [])
            if len(fields) != 1:
                raise _unsupported(f"value_count over {len(fields)} fields, expected exactly one field")
            return types, ir.Agg(span, bound, of=fields[0], parts=tuple(parts))
        return types, ir.Agg(span, bound, parts=tuple(parts))

    def _correlation(self, rule: SigmaCorrelationRule) -> list[Any]:
        types, agg = self._agg(rule, 0)
        spec = ir.RuleSpec(
            _rule_name(rule),
            [ir.Step(tuple(types) or None, agg=agg)],
            context=_group(rule) or None,
            tags=_tags(rule),
        )
        return [self._program(rule, spec)]

    def convert_correlation_event_count_rule(
        self, rule: SigmaCorrelationRule, output_format: str | None = None, method: str = "default"
    ) -> list[Any]:
        return self._correlation(rule)

    def convert_correlation_value_count_rule(
        self, rule: SigmaCorrelationRule, output_format: str | None = None, method: str = "default"
    ) -> list[Any]:
        return self._correlation(rule)

    def convert_correlation_temporal_rule(
        self, rule: SigmaCorrelationRule, output_format: str | None = None, method: str = "default"
    ) -> list[Any]:
        return self._correlation(rule)

    def convert_correlation_temporal_ordered_rule(
        self, rule: SigmaCorrelationRule, output_format: str | None = None, method: str = "default"
    ) -> list[Any]:
        _, parts, part_types = self._parts(rule, 0)
        bound = _bound(rule, len(parts))
        if not (bound.eager and bound.lo == len(parts)):
            raise _unsupported(
                f"temporal_ordered condition {_conditions(rule)}: only all {len(parts)} rules in order "
                "can be matched as a sequence"
            )
        span = _span(rule)
        steps = []
        for k, ((_, item), ts) in enumerate(zip(parts, part_types, strict=True)):
            item_types = tuple(ts) or None
            within = span if k else None
            if isinstance(item, ir.Agg):
                steps.append(ir.Step(item_types, agg=item, within=within))
            else:
                if isinstance(item, ir.And) and len(item.items) == 2 and isinstance(item.items[0], ir.IsType):
                    item = item.items[1]  # the step (its WAIT) already tests the types
                steps.append(ir.Step(item_types, item, within=within))
        spec = ir.RuleSpec(_rule_name(rule), steps, context=_group(rule) or None, tags=_tags(rule))
        return [self._program(rule, spec)]

    def _extended(self, rule: SigmaCorrelationRule, output_format: str | None, ordered: bool) -> list[Any]:
        raise _unsupported(
            f"extended (boolean) {'temporal_ordered' if ordered else 'temporal'} condition "
            f"{getattr(rule.condition, 'expression', '?')!r}: a pySigma extension, not part of the Sigma "
            "correlation specification; use a count condition (gte, lt, ...) instead"
        )

    def convert_correlation_extended_temporal_rule(
        self, rule: SigmaCorrelationRule, output_format: str | None = None, method: str = "default"
    ) -> list[Any]:
        return self._extended(rule, output_format, False)

    def convert_correlation_extended_temporal_ordered_rule(
        self, rule: SigmaCorrelationRule, output_format: str | None = None, method: str = "default"
    ) -> list[Any]:
        return self._extended(rule, output_format, True)

    def _metric(self, rule: SigmaCorrelationRule, *args: Any, **kwargs: Any) -> list[Any]:
        raise _unsupported(
            f"correlation type {rule.type.name.lower()}: a pySigma extension, not part of the Sigma "
            "correlation specification (event_count, value_count, temporal, temporal_ordered)"
        )

    convert_correlation_value_sum_rule = _metric
    convert_correlation_value_avg_rule = _metric
    convert_correlation_value_percentile_rule = _metric
    convert_correlation_value_median_rule = _metric


#: Correlation types that are counts, so that one can feed another correlation when it fires.
_AGGREGATES = (
    SigmaCorrelationType.EVENT_COUNT,
    SigmaCorrelationType.VALUE_COUNT,
    SigmaCorrelationType.TEMPORAL,
)
_OPS = ("gt", "gte", "lt", "lte", "eq", "neq")
#: Where :func:`prepare_documents` keeps a range condition (several operators) pySigma cannot parse.
RANGE_KEY = "_vmkernel_condition"


def _group(rule: SigmaCorrelationRule) -> tuple[str, ...]:
    group = tuple(rule.group_by or ())
    if len(group) > P.MAX_GROUP:
        raise _unsupported(f"group-by on {len(group)} fields, expected at most {P.MAX_GROUP}")
    return group


def _span(rule: SigmaCorrelationRule) -> int:
    span = int(rule.timespan.seconds) * 10**9
    if not 1 <= span <= P.MAX_TIMEOUT_NS:
        raise _unsupported(f"timespan {rule.timespan.spec!r}, expected 1 s to {P.MAX_TIMEOUT_NS // 10**9} s")
    return span


def _conditions(rule: SigmaCorrelationRule) -> dict[str, Any]:
    full = (getattr(rule, "custom_attributes", None) or {}).get(RANGE_KEY)
    if isinstance(full, dict):
        return {k: v for k, v in full.items() if k in _OPS}
    cond = rule.condition
    if not isinstance(cond, SigmaCorrelationCondition):
        raise _unsupported("extended (boolean) correlation conditions")
    return {cond.op.name.lower(): cond.count}


def _bound(rule: SigmaCorrelationRule, domain: int | None) -> ir.Bound:
    """The correlation's condition as a bound on counts of at least 1; with ``domain`` (the number of
    referenced rules of a temporal correlation) counts are at most that, and a condition that holds
    for every count from some value up to it becomes a lower limit, decided at once."""
    conds = _conditions(rule)
    lo, hi, ne = 1, None, set()
    for op, v in conds.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise _unsupported(f"condition {op}: {v!r}, expected an integer count")
        if v > P.MAX_COUNT:
            raise _unsupported(f"condition {op}: {v}, expected at most {P.MAX_COUNT}")
        if op in ("gte", "eq", "gt"):
            lo = max(lo, v + (op == "gt"))
        if op in ("lte", "eq", "lt"):
            hi = min(hi if hi is not None else v, v - (op == "lt"))
        if op == "neq":
            ne.add(v)
    raw = ir.Bound(lo, hi, tuple(sorted(ne)))
    if domain is not None:
        ok = [k for k in range(1, domain + 1) if raw.holds(k)]
        if not ok:
            raise _unsupported(f"condition {conds} can never hold with {domain} referenced rules")
        if ok == list(range(ok[0], domain + 1)):
            return ir.Bound(ok[0])
        return ir.Bound(ok[0], ok[-1], tuple(k for k in range(ok[0], ok[-1] + 1) if k not in ok))
    bound = ir.Bound.of(lo, hi, ne)
    if not bound.satisfiable:
        raise _unsupported(f"condition {conds} can never hold: a window holds at least one event")
    return bound


def prepare_documents(docs: list[Any]) -> list[Any]:
    """Sigma documents with range conditions (``gt: 100`` and ``lte: 200`` in one correlation
    condition, which the specification allows and pySigma does not parse) kept aside under
    :data:`RANGE_KEY`; pySigma then sees the first operator only."""
    out = []
    for doc in docs:
        corr = doc.get("correlation") if isinstance(doc, dict) else None
        cond = corr.get("condition") if isinstance(corr, dict) else None
        ops = [k for k in cond if k in _OPS] if isinstance(cond, dict) else []
        if len(ops) > 1 and isinstance(cond, dict) and isinstance(corr, dict) and isinstance(doc, dict):
            first = {k: v for k, v in cond.items() if k not in _OPS or k == ops[0]}
            doc = {**doc, "correlation": {**corr, "condition": first}, RANGE_KEY: dict(cond)}
        out.append(doc)
    return out


def _from_yaml(text: str, *, collect_errors: bool = False) -> SigmaCollection:
    docs = prepare_documents(list(yaml.safe_load_all(text)))
    return SigmaCollection.from_dicts(docs, collect_errors=collect_errors)


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
            coll = _from_yaml(path.read_text(encoding="utf-8"), collect_errors=True)
        except (SigmaError, OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
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
    # base rules first, so correlations find their conversion results; correlations in the resolved
    # order (a referenced correlation before the ones using it)
    pos = {id(r): k for k, r in enumerate(merged.rules)}
    order = sorted(
        range(len(rules)),
        key=lambda i: (
            (1, pos.get(id(rules[i][1]), i)) if isinstance(rules[i][1], SigmaCorrelationRule) else (0, 0)
        ),
    )
    for i in order:
        path, r = rules[i]
        try:
            if isinstance(r, SigmaCorrelationRule):
                out = backend.convert_correlation_rule(r, "program")
                if r._backreferences and not out:
                    out = list(r.get_conversion_result())
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
        coll = _from_yaml(text)
        backend = VmkernelBackend(pipeline)  # type: ignore[abstract]  # filled in below the class
        out = backend.convert(coll, "program")
    except (SigmaError, NotImplementedError) as exc:
        raise RuleCompileError(source, _reason(exc), "a Sigma rule the rule VM can express") from None
    return list(out)
