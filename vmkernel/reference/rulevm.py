"""Pure-Python reference model of the threat-rule engine (``vmkernel.fast.RuleEngine``).

Design: this file defines the behaviour; the Rust engine matches it
determination for determination and step for step (the differential tests
check both).  Programs are decoded and verified by
:mod:`vmkernel.rules.program`; everything after loading is here:

* Instances.  One instance per (rule, context, wait point).  Every event runs
  each candidate rule: first its waiting instances for the event's context,
  deepest wait point first, then a fresh evaluation from pc 0 (the root).
  An instance that reaches WAIT moves to that wait point (replacing the one
  there); an instance touched by an event is not resumed again by that
  event, so one event never carries an instance past two WAITs.  HALT
  ``monitor`` leaves a resumed instance waiting (the event is not part of
  the sequence); ``match`` and ``no-match`` emit one determination and end
  it.  A LAUNCH creates an instance of a launch-only rule at its entry in
  the same context, resumed by later events.
* Time.  An instance whose first event is more than its timeout before the
  current event expires; an event older than an instance's last event never
  extends it.  Fuel is instructions: each run stops within ``len(code)``
  steps because jumps only go forward.
* Caps.  Each rule keeps at most ``max_instances`` instances, as many
  counters and as many windows; a new instance beyond that drops expired
  instances first, then the oldest (by first event time, then creation); a
  new counter or window drops the oldest created; all counted in ``evicted``.
* Candidates.  A rule runs on an event whose ``type`` or ``source`` equals
  one of its types or has it as a ``/``-separated prefix (no types: every
  event), in the context given by its context fields (each a str, or an int
  shown in decimal; events missing one are not in the rule's view).  With
  one field the context key is its value, with several the JSON array of
  their values (``["alice","h1"]``, compact, non-ASCII kept).  A root run is
  skipped when the rule has pre-filter literals and none occurs in the
  lowercased text of its field.
* Aggregates.  ``COUNT`` and a sliding ``AGG`` keep per (context, slot) the
  entries of the last ``window`` ns (an entry older than the current event by
  more than the window is dropped when the slot is next fed); ``AGG`` keeps at
  most ``cap`` entries (dropping the one seen longest ago), so its count is
  the true count saturated at ``cap``.  A distinct ``AGG`` adds each text
  value of its register (none: nothing changes and the count reads 0).  A
  deferred ``AGG`` opens a window at its first event and adds to it while it
  is open.  A window closes when the rule sees an event of its context more
  than ``window`` ns after the window opened (before that event runs), or on
  :meth:`RuleEngine.advance`; if a ``WINDOW`` instruction was reached the run
  resumes after it with the final count, without an event (no fields, no
  type; ``COUNT`` is false and ``AGG`` reads 0), at the window's end time,
  and its determination lists the events up to the one that opened the
  window.  Closes run in order of end time, then creation.
* Values.  A test on a list is true when it holds for an element.  String
  tests see strings, ints in decimal and booleans as ``true``/``false``;
  number tests see ints, integral floats and strings of decimal digits.
  Case-insensitive tests lowercase each character with its full Unicode
  mapping (``İ`` becomes ``i̇``, ``ß`` stays ``ß``).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vmkernel.errors import InvalidArgument, VerifyError
from vmkernel.rules import program as P

__all__ = ["Determination", "RuleEngine"]

_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_NO_SEQ = -1  # the "event" of a run without one (a window close)
_ABSENT = object()
_DIGITS = re.compile(r"-?[0-9]+")


@dataclass(frozen=True, slots=True)
class Determination:
    """A halted rule instance's verdict: ``events`` are engine-wide event numbers, oldest first."""

    rule: str
    context: str | None
    verdict: str
    events: tuple[int, ...]
    time_ns: int


def lower(s: str) -> str:
    """Per-character full lowercase mapping (no context-dependent final sigma)."""
    return s.lower() if s.isascii() else "".join(c.lower() for c in s)


def _scalar(v: Any) -> Any:
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return v if _I64_MIN <= v <= _I64_MAX else _Big(str(v))
    if isinstance(v, float):
        return v
    return _ABSENT_ELEMENT


class _Big(str):
    """An integer outside i64: seen by string tests only."""


_ABSENT_ELEMENT = object()  # a dict or other object: no test sees it


def _convert(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_scalar(x) if not isinstance(x, (list, tuple)) else _ABSENT_ELEMENT for x in v]
    return _scalar(v)


def _text(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    return None


def _number(v: Any) -> int | None:
    if isinstance(v, (bool, _Big)):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if v.is_integer() and -9223372036854775808.0 <= v < 9223372036854775808.0:
            return int(v)
        return None
    if isinstance(v, str) and _DIGITS.fullmatch(v):
        neg = v.startswith("-")
        digits = v[1:] if neg else v
        digits = digits.lstrip("0") or "0"
        if len(digits) > 19:
            return None
        n = -int(digits) if neg else int(digits)
        return n if _I64_MIN <= n <= _I64_MAX else None
    return None


def _elements(v: Any) -> list[Any]:
    if v is _ABSENT or v is None:
        return []
    return v if isinstance(v, list) else [v]


def glob_match(pattern: str, s: str) -> bool:
    """``*`` any run, ``?`` one character, ``\\`` escapes the next character."""
    toks: list[str | None] = []  # None = '*', '' = '?', else one literal character
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            toks.append(pattern[i + 1])
            i += 2
            continue
        toks.append(None if c == "*" else "" if c == "?" else c)
        i += 1
    return _glob_tokens(toks, s)


def _glob_tokens(toks: list[str | None], s: str) -> bool:
    p = i = 0
    star = -1
    mark = 0
    while i < len(s):
        if p < len(toks) and toks[p] is not None and (toks[p] == "" or toks[p] == s[i]):
            p += 1
            i += 1
        elif p < len(toks) and toks[p] is None:
            star = p
            mark = i
            p += 1
        elif star >= 0:
            p = star + 1
            mark += 1
            i = mark
        else:
            return False
    while p < len(toks) and toks[p] is None:
        p += 1
    return p == len(toks)


def _glob_lower(pattern: str) -> list[str | None]:
    toks: list[str | None] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            toks.extend(lower(pattern[i + 1]))
            i += 2
            continue
        if c == "*":
            toks.append(None)
        elif c == "?":
            toks.append("")
        else:
            toks.extend(lower(c))
        i += 1
    return toks


def _glob_plain(pattern: str) -> list[str | None]:
    toks: list[str | None] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            toks.append(pattern[i + 1])
            i += 2
            continue
        toks.append(None if c == "*" else "" if c == "?" else c)
        i += 1
    return toks


def _parse_ip(s: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if "%" in s:
        return None
    try:
        return ipaddress.ip_address(s)
    except ValueError:
        return None


def types_match(types: Iterable[str], ty: str, source: str | None) -> bool:
    for t in types:
        for have in (ty, source):
            if have is not None and (have == t or have.startswith(t + "/")):
                return True
    return False


class _Rule:
    """A loaded program with its constants prepared for matching."""

    def __init__(self, index: int, prog: P.Program) -> None:
        self.index = index
        self.prog = prog
        self.name = prog.name
        self.code = prog.code
        self.fields = prog.fields
        self.contexts = prog.context_fields
        self.prepared: list[Any] = []
        for c in prog.consts:
            if c.kind == P.K_STR:
                self.prepared.append((c.value, lower(c.value), _glob_plain(c.value), _glob_lower(c.value)))
            elif c.kind == P.K_REGEX:
                self.prepared.append(re.compile(c.value))
            elif c.kind == P.K_CIDR:
                self.prepared.append(P.parse_cidr(c.value))
            elif c.kind == P.K_LIST:
                self.prepared.append(
                    (
                        frozenset(c.value),
                        frozenset(lower(x) for x in c.value),
                        c.value,
                        tuple(lower(x) for x in c.value),
                    )
                )
            else:
                self.prepared.append(c.value)
        self.prefilter = [(prog.fields[f], lower(lit)) for f, lit in prog.prefilter]
        self.launch_targets: list[int] = []


class _Instance:
    __slots__ = ("created", "events", "first_time", "last_seq", "last_time", "timeout", "types")

    def __init__(
        self,
        first_time: int,
        last_time: int,
        last_seq: int,
        events: tuple[int, ...],
        timeout: int,
        types: tuple[str, ...] | None,
        created: int,
    ) -> None:
        self.first_time = first_time
        self.last_time = last_time
        self.last_seq = last_seq
        self.events = events
        self.timeout = timeout
        self.types = types
        self.created = created


class _Window:
    """A deferred aggregate's open window in one context."""

    __slots__ = ("cap", "chain", "count", "created", "distinct", "first_time", "open_time", "resume", "span")

    def __init__(
        self, open_time: int, span: int, cap: int, distinct: bool, first_time: int, chain: tuple[int, ...]
    ) -> None:
        self.open_time = open_time
        self.span = span
        self.cap = cap
        self.distinct = distinct
        self.first_time = first_time
        self.chain = chain
        self.count: int | list[str] = [] if distinct else 0
        self.created = 0
        self.resume: int | None = None

    def size(self) -> int:
        return len(self.count) if isinstance(self.count, list) else self.count

    def due(self, now: int) -> bool:
        return now - self.open_time > self.span


def _key(contexts: list[str], fields: dict[str, Any]) -> str | None:
    parts = []
    for name in contexts:
        cv = fields.get(name)
        if isinstance(cv, str) and not isinstance(cv, _Big):
            parts.append(cv)
        elif isinstance(cv, int) and not isinstance(cv, bool):
            parts.append(str(cv))
        else:
            return None
    if len(parts) == 1:
        return parts[0]
    return json.dumps(parts, ensure_ascii=False, separators=(",", ":"))


class _Event:
    __slots__ = ("fields", "lowered", "seq", "source", "time", "type")

    def __init__(self, seq: int, ty: str, source: str | None, time: int, fields: dict[str, Any]) -> None:
        self.seq = seq
        self.type = ty
        self.source = source
        self.time = time
        self.fields = fields
        self.lowered: dict[str, list[str]] = {}

    def get(self, name: str) -> Any:
        if name == "*":
            out: list[Any] = []
            for v in self.fields.values():
                out.extend(_elements(v))
            return out
        return self.fields.get(name, _ABSENT)

    def lowered_texts(self, name: str) -> list[str]:
        got = self.lowered.get(name)
        if got is None:
            got = [lower(t) for t in (_text(x) for x in _elements(self.get(name))) if t is not None]
            self.lowered[name] = got
        return got


_RESERVED = ("type", "time_ns", "source")


def _utf8(thing: str, s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(thing, s, "text without lone surrogates (valid UTF-8)") from None


def _utf8_value(thing: str, v: Any) -> None:
    if isinstance(v, str):
        if not v.isascii():
            _utf8(thing, v)
    elif isinstance(v, (list, tuple)):
        for x in v:
            if isinstance(x, str) and not x.isascii():
                _utf8(thing, x)


def _check_event(i: int, ev: Any) -> tuple[str, str | None, int, dict[str, Any]]:
    if not isinstance(ev, Mapping):
        raise InvalidArgument(f"events[{i}]", ev, "a mapping with 'type' (str) and 'time_ns' (int)")
    ty = ev.get("type", _ABSENT)
    if not isinstance(ty, str):
        raise InvalidArgument(f"events[{i}].type", None if ty is _ABSENT else ty, "a str event type")
    t = ev.get("time_ns", _ABSENT)
    if isinstance(t, bool) or not isinstance(t, int) or not _I64_MIN <= t <= _I64_MAX:
        raise InvalidArgument(
            f"events[{i}].time_ns", None if t is _ABSENT else t, "an int number of ns (64-bit)"
        )
    src = ev.get("source")
    if src is not None and not isinstance(src, str):
        raise InvalidArgument(f"events[{i}].source", src, "a str log source or None")
    if not ty.isascii():
        _utf8(f"events[{i}].type", ty)
    if src is not None and not src.isascii():
        _utf8(f"events[{i}].source", src)
    fields: dict[str, Any] = {}
    for k, v in ev.items():
        if not isinstance(k, str):
            raise InvalidArgument(f"events[{i}] key", k, "str field names")
        if k not in _RESERVED:
            fields[k] = _convert(v)
            if not k.isascii():
                _utf8(f"events[{i}] key", k)
            _utf8_value(f"events[{i}].{k}", v)
    return ty, src, t, fields


class RuleEngine:
    """Runs verified threat-rule programs over event streams.

    ``RuleEngine(programs)`` decodes and verifies every program (bytes-like);
    any bad one raises :class:`VerifyError` and nothing is loaded.  ``feed``
    takes event mappings, ``feed_jsonl`` JSON Lines bytes; both return the
    determinations they caused, in order.
    """

    def __init__(self, programs: Iterable[Any], *, max_instances: int | None = None) -> None:
        if max_instances is None:
            max_instances = 4096
        if (
            isinstance(max_instances, bool)
            or not isinstance(max_instances, int)
            or not 1 <= max_instances <= 1 << 24
        ):
            raise InvalidArgument("max_instances", max_instances, "an int in 1..=16777216")
        if isinstance(programs, (bytes, bytearray, memoryview, str)):
            raise InvalidArgument("programs", programs, "an iterable of program byte strings")
        rules: list[_Rule] = []
        by_name: dict[str, int] = {}
        for i, raw in enumerate(programs):
            try:
                data = bytes(memoryview(raw))
            except TypeError:
                raise InvalidArgument(f"programs[{i}]", raw, "a bytes-like program") from None
            prog = P.decode(data)
            if prog.name in by_name:
                raise VerifyError(
                    "duplicate-rule", -1, f"rule name {prog.name!r} of program {i} is already used"
                )
            by_name[prog.name] = i
            rules.append(_Rule(i, prog))
        for r in rules:
            for target in r.prog.launches:
                j = by_name.get(target)
                if j is None:
                    raise VerifyError(
                        "unknown-launch-target",
                        -1,
                        f"rule {r.name!r} launches {target!r}, expected a loaded rule",
                    )
                if not rules[j].prog.launched:
                    raise VerifyError(
                        "launch-target",
                        -1,
                        f"rule {r.name!r} launches {target!r}, expected a launch-only rule",
                    )
                r.launch_targets.append(j)
        color = [0] * len(rules)

        def visit(k: int) -> None:
            color[k] = 1
            for j in rules[k].launch_targets:
                if color[j] == 1:
                    raise VerifyError(
                        "launch-cycle",
                        -1,
                        f"rule {rules[k].name!r} launches {rules[j].name!r}, which leads back to it",
                    )
                if color[j] == 0:
                    visit(j)
            color[k] = 2

        for k in range(len(rules)):
            if color[k] == 0:
                visit(k)
        self._rules = rules
        self._max = max_instances
        self._index: dict[str, list[int]] = {}
        self._wild: list[int] = []
        for r in rules:
            if not r.prog.types:
                self._wild.append(r.index)
            for t in dict.fromkeys(r.prog.types):
                self._index.setdefault(t, []).append(r.index)
        # per rule: context key -> wait key -> instance; counters: (key, slot) -> [created, times]
        self._live: list[dict[str, dict[int, _Instance]]] = [{} for _ in rules]
        self._counters: list[dict[tuple[str, int], list[Any]]] = [{} for _ in rules]
        # deferred aggregates: context key -> slot -> open window
        self._windows: list[dict[str, dict[int, _Window]]] = [{} for _ in rules]
        self._nwin = [0] * len(rules)
        self._created = 0
        self._seq = 0
        self._steps = 0
        self._stats = [dict.fromkeys(_STAT_KEYS, 0) for _ in rules]

    # -- public ------------------------------------------------------------------
    @property
    def rules(self) -> list[str]:
        return [r.name for r in self._rules]

    @property
    def steps(self) -> int:
        """Instructions executed so far, over all rules."""
        return self._steps

    @property
    def events_seen(self) -> int:
        return self._seq

    @property
    def live_instances(self) -> int:
        return sum(len(w) for live in self._live for w in live.values())

    def stats(self) -> dict[str, dict[str, int]]:
        """Per rule: runs, steps, skipped, matches, no_matches, silent, expired, evicted, live, windows."""
        out = {}
        for r, s in zip(self._rules, self._stats, strict=True):
            d = dict(s)
            d["live"] = sum(len(w) for w in self._live[r.index].values())
            d["windows"] = self._nwin[r.index]
            out[r.name] = d
        return out

    def advance(self, now_ns: int) -> list[Determination]:
        """Close every window that ended before ``now_ns`` (the stream's clock moved on without an event
        of its context); returns the determinations, in order of window end, then creation."""
        if isinstance(now_ns, bool) or not isinstance(now_ns, int) or not _I64_MIN <= now_ns <= _I64_MAX:
            raise InvalidArgument("now_ns", now_ns, "an int number of ns (64-bit)")
        due = [
            (w.open_time + w.span, w.created, ri, key, slot)
            for ri, per in enumerate(self._windows)
            for key, wins in per.items()
            for slot, w in wins.items()
            if w.due(now_ns)
        ]
        due.sort(key=lambda d: (d[0], d[1]))
        out: list[Determination] = []
        for _, _, ri, key, slot in due:
            self._close(ri, key, slot, out)
        return out

    def feed(self, events: Iterable[Mapping[str, Any]]) -> list[Determination]:
        if isinstance(events, Mapping):
            raise InvalidArgument(
                "events", events, "an iterable of event mappings (wrap one event in a list)"
            )
        checked = [_check_event(i, ev) for i, ev in enumerate(events)]
        return self._run(checked)

    def feed_jsonl(self, data: Any) -> list[Determination]:
        try:
            raw = bytes(memoryview(data))
        except TypeError:
            raise InvalidArgument("data", data, "a bytes-like object of JSON Lines") from None
        checked: list[tuple[str, str | None, int, dict[str, Any]]] = []
        for lineno, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip(b" \t\r"):
                continue
            try:
                obj = json.loads(line, parse_constant=_reject_constant, parse_int=_parse_int)
                _json_ok(obj)
            except (ValueError, RecursionError) as exc:
                raise InvalidArgument(
                    f"data line {lineno}", _short(line), f"one JSON object per line ({exc})"
                ) from None
            if not isinstance(obj, dict):
                raise InvalidArgument(f"data line {lineno}", _short(line), "one JSON object per line")
            checked.append(_check_event(len(checked), obj))
        return self._run(checked)

    # -- engine ------------------------------------------------------------------
    def _run(self, checked: list[tuple[str, str | None, int, dict[str, Any]]]) -> list[Determination]:
        out: list[Determination] = []
        for ty, src, t, fields in checked:
            ev = _Event(self._seq, ty, src, t, fields)
            self._seq += 1
            self._event(ev, out)
        return out

    def _candidates(self, ev: _Event) -> list[int]:
        found = set(self._wild)
        for have in (ev.type, ev.source):
            if have is None:
                continue
            parts = have.split("/")
            for k in range(1, len(parts) + 1):
                found.update(self._index.get("/".join(parts[:k]), ()))
        return sorted(found)

    def _event(self, ev: _Event, out: list[Determination]) -> None:
        for ri in self._candidates(ev):
            rule = self._rules[ri]
            key = _key(rule.contexts, ev.fields) if rule.contexts else ""
            if key is None:
                continue
            wins = self._windows[ri].get(key)
            if wins:
                due = sorted(
                    (w.open_time + w.span, w.created, slot) for slot, w in wins.items() if w.due(ev.time)
                )
                for _, _, slot in due:
                    self._close(ri, key, slot, out)
            waits = self._live[ri].get(key)
            if waits:
                for wkey in sorted(waits, reverse=True):
                    inst = waits.get(wkey)
                    if inst is None or inst.last_seq == ev.seq:
                        continue
                    if ev.time - inst.first_time > inst.timeout:
                        del waits[wkey]
                        self._stats[ri]["expired"] += 1
                        continue
                    if ev.time < inst.last_time:
                        continue
                    if inst.types is not None and not types_match(inst.types, ev.type, ev.source):
                        continue
                    self._exec(rule, key, wkey + 1, (wkey, inst), ev, out)
                if not waits:
                    self._live[ri].pop(key, None)
            if rule.prog.launched:
                continue
            if rule.prefilter and not any(
                lit in text for f, lit in rule.prefilter for text in ev.lowered_texts(f)
            ):
                self._stats[ri]["skipped"] += 1
                continue
            self._exec(rule, key, 0, None, ev, out)

    def _place(self, ri: int, key: str, wkey: int, inst: _Instance, now: int) -> None:
        live = self._live[ri]
        waits = live.setdefault(key, {})
        if wkey not in waits:
            total = sum(len(w) for w in live.values())
            if total >= self._max:
                for k2 in list(live):
                    w2 = live[k2]
                    for wk in list(w2):
                        old = w2[wk]
                        if now - old.first_time > old.timeout:
                            del w2[wk]
                            self._stats[ri]["expired"] += 1
                            total -= 1
                    if not w2 and k2 != key:
                        del live[k2]
                if total >= self._max:
                    victim = min(
                        (
                            (old.first_time, old.created, k2, wk)
                            for k2, w2 in live.items()
                            for wk, old in w2.items()
                        ),
                    )
                    del live[victim[2]][victim[3]]
                    if not live[victim[2]] and victim[2] != key:
                        del live[victim[2]]
                    self._stats[ri]["evicted"] += 1
        waits[wkey] = inst

    def _close(self, ri: int, key: str, slot: int, out: list[Determination]) -> None:
        """Close a window: drop it, and resume the run waiting at its WINDOW with the final count."""
        wins = self._windows[ri].get(key)
        w = None if wins is None else wins.pop(slot, None)
        if w is None:
            return
        self._nwin[ri] -= 1
        if not wins:
            del self._windows[ri][key]
        if w.resume is not None:
            end = min(w.open_time + w.span, _I64_MAX)
            self._exec(self._rules[ri], key, w.resume + 1, None, None, out, close=(w, end))

    def _exec(
        self,
        rule: _Rule,
        key: str,
        pc: int,
        resumed: tuple[int, _Instance] | None,
        ev: _Event | None,
        out: list[Determination],
        close: tuple[_Window, int] | None = None,
    ) -> None:
        """One run from ``pc``: for an event, or (``ev`` None) for a window that closed at ``close[1]``."""
        ri = rule.index
        stats = self._stats[ri]
        stats["runs"] += 1
        code = rule.code
        consts = rule.prepared
        regs: list[Any] = [_ABSENT] * P.NREGS
        flag = False
        if ev is None:
            assert close is not None
            win, now = close
            seq, chain, first_time = _NO_SEQ, win.chain, win.first_time
            regs[code[pc - 1].r] = win.size()
        else:
            now, seq = ev.time, ev.seq
            chain = (resumed[1].events if resumed else ()) + (ev.seq,)
            first_time = resumed[1].first_time if resumed else ev.time
        steps = 0
        while True:
            ins = code[pc]
            steps += 1
            op = ins.op
            if op == P.LOADF:
                regs[ins.r] = ev.get(rule.fields[ins.a]) if ev is not None else _ABSENT
            elif op == P.JF:
                if not flag:
                    pc = ins.a
                    continue
            elif op == P.JT:
                if flag:
                    pc = ins.a
                    continue
            elif op == P.JMP:
                pc = ins.a
                continue
            elif op == P.NOT:
                flag = not flag
            elif P.EQ <= op <= P.ISNULL or op in (P.INSET, P.ANYOF):
                flag = _test(
                    op,
                    ins.x,
                    consts[ins.a] if op not in (P.EXISTS, P.ISNULL) else None,
                    rule.prog.consts[ins.a].kind if op == P.EQ else 0,
                    regs[ins.r],
                )
            elif op == P.ISTYPE:
                flag = ev is not None and types_match(rule.prog.consts[ins.a].value, ev.type, ev.source)
            elif op == P.LOADCTX:
                regs[ins.r] = key if rule.contexts else _ABSENT
            elif op == P.LOADTYPE:
                regs[ins.r] = ev.type if ev is not None else _ABSENT
            elif op == P.LOADK:
                regs[ins.r] = rule.prog.consts[ins.a].value
            elif op == P.COUNT:
                flag = ev is not None and self._count(ri, key, ins.x, ins.a, ins.imm, now)
            elif op == P.AGG:
                regs[ins.r] = 0 if ev is None else self._agg(ri, key, ins, regs, now, first_time, chain)
            elif op == P.RESET:
                self._counters[ri].pop((key, ins.x), None)
            elif op == P.WINDOW:
                w = self._windows[ri].get(key, {}).get(ins.x)
                if w is not None and w.resume is None:
                    w.resume = pc
                break  # the run ends; a resumed instance stays waiting
            elif op == P.LAUNCH:
                tj = rule.launch_targets[ins.a]
                self._created += 1
                self._place(
                    tj,
                    key,
                    -1,
                    _Instance(now, now, seq, chain, ins.imm, None, self._created),
                    now,
                )
            elif op == P.WAIT:
                if resumed is not None:
                    self._live[ri][key].pop(resumed[0], None)
                types = None if ins.a == P.ANY_TYPES else tuple(rule.prog.consts[ins.a].value)
                if resumed is not None:
                    created = resumed[1].created
                else:
                    self._created += 1
                    created = self._created
                self._place(
                    ri,
                    key,
                    pc,
                    _Instance(first_time, now, seq, chain, ins.imm, types, created),
                    now,
                )
                break
            elif op == P.HALT:
                verdict = ins.x
                if verdict != P.MONITOR:
                    if resumed is not None:
                        self._live[ri][key].pop(resumed[0], None)
                    if verdict == P.MATCH:
                        stats["matches"] += 1
                    else:
                        stats["no_matches"] += 1
                    if rule.prog.silent:
                        stats["silent"] += 1
                    else:
                        out.append(
                            Determination(
                                rule.name,
                                key if rule.contexts else None,
                                P.HALT_VERDICTS[verdict],
                                chain,
                                now,
                            )
                        )
                break
            pc += 1
        stats["steps"] += steps
        self._steps += steps

    def _counter(self, ri: int, key: str, slot: int) -> list[Any]:
        """The (context, slot) counter entry ``[created, entries]``, made (evicting the oldest) if new."""
        counters = self._counters[ri]
        entry = counters.get((key, slot))
        if entry is None:
            if len(counters) >= self._max:
                victim = min(counters, key=lambda k: counters[k][0])
                del counters[victim]
                self._stats[ri]["evicted"] += 1
            self._created += 1
            entry = [self._created, []]
            counters[(key, slot)] = entry
        return entry

    def _count(self, ri: int, key: str, slot: int, need: int, window: int, now: int) -> bool:
        times: list[int] = self._counter(ri, key, slot)[1]
        times[:] = [x for x in times if now - x <= window]
        times.append(now)
        if len(times) >= need:
            times.clear()
            return True
        return False

    def _agg(
        self,
        ri: int,
        key: str,
        ins: P.Instr,
        regs: list[Any],
        now: int,
        first_time: int,
        chain: tuple[int, ...],
    ) -> int:
        slot, cap, span = ins.x & 0xF, ins.a, ins.imm
        distinct = bool(ins.x & P.AGG_DISTINCT)
        values: list[str] = []
        if distinct:
            values = [t for t in (_text(e) for e in _elements(regs[(ins.x >> 4) & 0xF])) if t is not None]
            if not values:
                return 0
        if ins.x & P.AGG_DEFERRED:
            wins = self._windows[ri].get(key)
            w = None if wins is None else wins.get(slot)
            if w is None:
                if self._nwin[ri] >= self._max:
                    victim = min(
                        (
                            (old.created, k2, s2)
                            for k2, w2 in self._windows[ri].items()
                            for s2, old in w2.items()
                        ),
                    )
                    w2 = self._windows[ri][victim[1]]
                    del w2[victim[2]]
                    if not w2:
                        del self._windows[ri][victim[1]]
                    self._nwin[ri] -= 1
                    self._stats[ri]["evicted"] += 1
                w = _Window(now, span, cap, distinct, first_time, chain)
                self._created += 1
                w.created = self._created
                self._windows[ri].setdefault(key, {})[slot] = w
                self._nwin[ri] += 1
            if isinstance(w.count, list):
                for v in values:
                    if v not in w.count and len(w.count) < cap:
                        w.count.append(v)
            else:
                w.count = min(w.count + 1, cap)
            return w.size()
        entries: list[Any] = self._counter(ri, key, slot)[1]
        if distinct:
            entries[:] = [e for e in entries if now - e[1] <= span]
            for v in values:
                for e in entries:
                    if e[0] == v:
                        e[1] = max(e[1], now)
                        break
                else:
                    entries.append([v, now])
                while len(entries) > cap:  # drop the value seen longest ago (the first of equals)
                    del entries[min(range(len(entries)), key=lambda i: entries[i][1])]
        else:
            entries[:] = [x for x in entries if now - x <= span]
            entries.append(now)
            while len(entries) > cap:
                del entries[entries.index(min(entries))]
        return len(entries)


_STAT_KEYS = ("runs", "steps", "skipped", "matches", "no_matches", "silent", "expired", "evicted")


def _test(op: int, x: int, c: Any, eq_kind: int, value: Any) -> bool:
    if op == P.EXISTS:
        return value is not _ABSENT
    if op == P.ISNULL:
        return value is _ABSENT or value is None
    elems = _elements(value)
    if not elems:
        return False
    if op == P.CMP or (op == P.EQ and eq_kind == P.K_INT):
        nums = [n for n in (_number(e) for e in elems) if n is not None]
        if op == P.EQ:
            return any(n == c for n in nums)
        return any((n < c, n <= c, n > c, n >= c)[x] for n in nums)
    texts = [t for t in (_text(e) for e in elems) if t is not None]
    if not texts:
        return False
    if op == P.REGEX:
        return any(c.search(t) is not None for t in texts)
    if op == P.CIDR:
        for t in texts:
            ip = _parse_ip(t)
            if ip is not None and ip.version == c.version and ip in c:
                return True
        return False
    if op == P.INSET:
        return any(t in c[0] for t in texts) if not x else any(lower(t) in c[1] for t in texts)
    if op == P.ANYOF:
        lits = c[3] if x else c[2]
        return any(lit in (lower(t) if x else t) for t in texts for lit in lits)
    plain, low, gplain, glow = c
    if x:
        texts = [lower(t) for t in texts]
        lit = low
    else:
        lit = plain
    if op == P.EQ:
        return any(t == lit for t in texts)
    if op == P.PREFIX:
        return any(t.startswith(lit) for t in texts)
    if op == P.SUFFIX:
        return any(t.endswith(lit) for t in texts)
    if op == P.CONTAINS:
        return any(lit in t for t in texts)
    toks = glow if x else gplain
    return any(_glob_tokens(toks, t) for t in texts)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_int(text: str) -> int | float:
    """Integers beyond 64 bits become floats, as a JSON parser without big numbers sees them."""
    n = int(text)
    return n if _I64_MIN <= n < 1 << 64 else float(text)


def _json_ok(obj: Any) -> None:
    """Reject what the Rust parser rejects: lone surrogates and non-finite numbers."""
    if isinstance(obj, str):
        if not obj.isascii():
            obj.encode("utf-8")
    elif isinstance(obj, float):
        if obj != obj or obj in (float("inf"), float("-inf")):
            raise ValueError("number out of range")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _json_ok(k)
            _json_ok(v)
    elif isinstance(obj, list):
        for v in obj:
            _json_ok(v)


def _short(line: bytes) -> str:
    return line[:80].decode("utf-8", "replace")
