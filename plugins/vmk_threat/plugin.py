"""Threat detection as a kernel plugin.

Design: the kernel's journal is an event source.  ``vmk_event`` only buffers
(a journal event becomes ``{"type": kind, "time_ns", "subject", "vm",
**data}`` with source ``vmkernel/journal``); the buffer goes to the Rust
engine in one call when the last event of a commit arrives (its ``seq`` is
the journal's last), so one kernel operation costs one engine call however
many events it wrote; then the engine's clock is advanced to the kernel
clock, which closes count windows that ended meanwhile (``lt``/``eq``-style
correlations are decided when their window closes).  External JSON Lines and
EVTX streams go through :func:`feed_jsonl` / :func:`feed_evtx`.  Every determination becomes a
``threat.determination`` journal event (never fed back to the rules); a rule
tagged ``action:stop-vm`` whose context is a VM id stops that VM.  Rules are
native text or Sigma, loaded with :func:`load_rules` or from
``config["threat"]["rules"]`` (a file or directory).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from vmkernel import Event, Invariant, Kernel, ReportSection, StashKey, VMState, hookimpl
from vmkernel.errors import InvalidArgument, RuleCompileError, VmkError
from vmkernel.fast import RuleEngine
from vmkernel.rules import compile as compile_native
from vmkernel.rules import disassemble
from vmkernel.rules import program as P

__all__ = ["feed_evtx", "feed_jsonl", "load_rules", "rules_from_path", "state"]

JOURNAL_SOURCE = "vmkernel/journal"
STOP_VM = "action:stop-vm"
MAX_INSTANCES = 4096


@dataclass
class ThreatState:
    programs: list[bytes] = field(default_factory=list)
    engine: RuleEngine = field(default_factory=lambda: RuleEngine([]))
    stop_rules: set[str] = field(default_factory=set)
    pending: list[dict[str, Any]] = field(default_factory=list)
    determinations: list[tuple[str, str | None, str, tuple[int, ...]]] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    batches: int = 0


KEY: StashKey[ThreatState] = StashKey()


def state(kernel: Kernel) -> ThreatState:
    """The plugin's state on ``kernel``."""
    return kernel.stash[KEY]


def rules_from_path(path: str | Path) -> list[bytes]:
    """Programs of a rule file (``.yml``: Sigma, else native text) or of every rule file in a directory."""
    from vmkernel.rules.sigma import compile_collection

    p = Path(path)
    if not p.exists():
        raise InvalidArgument("rules", str(p), "an existing rule file or directory")
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    out: list[bytes] = []
    sigma = [f for f in files if f.suffix in (".yml", ".yaml")]
    for f in files:
        if f.suffix in (".vmkr", ".rules") or (not p.is_dir() and f.suffix not in (".yml", ".yaml")):
            out.extend(compile_native(f.read_text(encoding="utf-8"), str(f)))
    if sigma:
        for r in compile_collection(list(sigma)):
            if r.program is None:
                raise RuleCompileError(
                    r.path or "<sigma>", r.reason, f"Sigma rule {r.name} the rule VM can express"
                )
            out.append(r.program)
    return out


def load_rules(kernel: Kernel, programs: Sequence[bytes]) -> None:
    """Replace the kernel's rule set; all-or-nothing (a bad program raises VerifyError, nothing changes)."""
    st = state(kernel)
    _flush(kernel, st)
    engine = RuleEngine(list(programs), max_instances=MAX_INSTANCES)
    st.programs = list(programs)
    st.engine = engine
    st.stop_rules = {d.name for d in (P.decode(p) for p in programs) if STOP_VM in d.tags}


def _journal_event(event: Event) -> dict[str, Any]:
    ev: dict[str, Any] = {}
    for k, v in event.data.items():
        ev[k] = v
    ev.update(
        type=event.kind,
        time_ns=event.time_ns,
        source=JOURNAL_SOURCE,
        subject=event.subject,
        seq=event.seq,
    )
    if event.subject.startswith("vm:"):
        ev["vm"] = event.subject[3:]
    return ev


def _emit(kernel: Kernel, st: ThreatState, dets: Iterable[Any], origin: str) -> None:
    for d in dets:
        st.determinations.append((d.rule, d.context, d.verdict, tuple(d.events)))
        kernel.emit(
            "threat.determination",
            f"rule:{d.rule}",
            rule=d.rule,
            context=d.context,
            verdict=d.verdict,
            events=list(d.events),
            origin=origin,
        )
        if d.verdict == "match" and d.rule in st.stop_rules and d.context:
            _stop(kernel, st, d.context, d.rule)


def _stop(kernel: Kernel, st: ThreatState, vm_id: str, rule: str) -> None:
    try:
        vm = kernel.vm(vm_id)
    except VmkError:
        return
    if vm.state != VMState.RUNNING:
        return
    try:
        kernel.stop_vm(vm)
    except VmkError as exc:
        kernel.emit("threat.action-failed", f"vm:{vm_id}", rule=rule, error=f"{type(exc).__name__}: {exc}")
        return
    st.stopped.append(vm_id)


def _flush(kernel: Kernel, st: ThreatState) -> None:
    if st.pending:
        batch, st.pending = st.pending, []
        st.batches += 1
        _emit(kernel, st, st.engine.feed(batch), "journal")
    if st.programs:
        # windows that ended before the kernel's clock are decided now, not at their group's next event
        _emit(kernel, st, st.engine.advance(kernel.clock.now_ns), "clock")


def feed_jsonl(kernel: Kernel, data: bytes) -> int:
    """Run JSON Lines events through the kernel's rules; returns the number of determinations."""
    st = state(kernel)
    _flush(kernel, st)
    dets = st.engine.feed_jsonl(data)
    _emit(kernel, st, dets, "jsonl")
    return len(dets)


def feed_evtx(kernel: Kernel, path: str | Path) -> int:
    """Run a Windows ``.evtx`` file through the kernel's rules; returns the number of determinations."""
    from vmkernel.rules.windows import evtx_events

    st = state(kernel)
    _flush(kernel, st)
    dets = st.engine.feed(list(evtx_events(str(path))))
    _emit(kernel, st, dets, "evtx")
    return len(dets)


# --------------------------------------------------------------------------- hooks


@hookimpl
def vmk_configure(kernel: Kernel) -> None:
    kernel.stash[KEY] = ThreatState()
    rules = (kernel.config.get("threat") or {}).get("rules")
    if rules:
        load_rules(kernel, rules_from_path(rules))


@hookimpl
def vmk_event(kernel: Kernel, event: Event) -> None:
    st = kernel.stash.get(KEY, None)
    if st is None or event.kind.startswith("threat."):
        return
    if st.programs:
        st.pending.append(_journal_event(event))
    if event.seq == len(kernel.journal) - 1:  # last event of this commit: one engine call per batch
        _flush(kernel, st)


def _caps(kernel: Kernel) -> str | None:
    st = state(kernel)
    for name, s in st.engine.stats().items():
        for what in ("live", "windows"):
            if s[what] > MAX_INSTANCES:
                return f"rule {name} holds {s[what]} {what}, above the cap {MAX_INSTANCES}"
    return None


def _once(kernel: Kernel) -> str | None:
    seen = set()
    for d in state(kernel).determinations:
        if d in seen:
            return f"determination {d} was emitted twice"
        seen.add(d)
    return None


@hookimpl
def vmk_invariants(kernel: Kernel) -> list[Invariant]:
    return [
        Invariant("threat.instances-capped", lambda: _caps(kernel)),
        Invariant("threat.determinations-once", lambda: _once(kernel)),
    ]


@hookimpl
def vmk_report(kernel: Kernel) -> ReportSection:
    st = state(kernel)
    eng = st.engine
    lines = [
        f"{len(eng.rules)} rules, {eng.events_seen} events in {st.batches} journal batches, "
        f"{eng.steps} VM steps, {eng.live_instances} live instances, "
        f"{sum(s['windows'] for s in eng.stats().values())} open count windows",
        f"{len(st.determinations)} determinations, {len(st.stopped)} VMs stopped by rules",
    ]
    return ReportSection("threat", lines)


DEMO_SIGMA_SPRAY = """
title: Failed logon
id: 5638f7c0-ac70-491d-8465-2a65075e0d86
name: failed_logon
logsource: {product: windows, service: security}
detection:
  selection: {EventID: 4625}
  condition: selection
---
title: Password spraying
correlation:
  type: value_count
  rules: [failed_logon]
  group-by: [IpAddress, WorkstationName]
  timespan: 1m
  condition: {field: TargetUserName, gte: 3}
"""

DEMO_RULES = """
rule "rapid relaunch" {
    context vm
    tag "action:stop-vm"
    when vm.launch count 2 within 10s
    verdict match
}
"""


@hookimpl
def vmk_demo(kernel: Kernel, demo: Any) -> None:
    demo.step("threat: load a native rule (a VM launched twice within 10 s is stopped)")
    load_rules(kernel, compile_native(DEMO_RULES))
    vm = kernel.create_vm("flappy", memory_mib=16)
    kernel.launch_vm(vm)
    kernel.stop_vm(vm)
    kernel.launch_vm(vm)
    st = state(kernel)
    demo.step(f"threat: {len(st.determinations)} determination(s); rule stopped {len(st.stopped)} VM(s)")
    demo.record("threat determinations", len(st.determinations))
    demo.record("threat VMs stopped", len(st.stopped))
    # A Sigma correlation over a Windows logon stream: one source trying many accounts.
    from vmkernel.rules import compile_sigma

    engine = RuleEngine(compile_sigma(DEMO_SIGMA_SPRAY))
    second = 10**9

    def failed(t: int, user: str, ip: str) -> dict[str, Any]:
        return {
            "type": "windows/security",
            "time_ns": t * second,
            "EventID": 4625,
            "IpAddress": ip,
            "WorkstationName": "ws1",
            "TargetUserName": user,
        }

    events = [failed(0, "alice", "10.0.0.9"), failed(5, "bob", "10.0.0.9"), failed(7, "alice", "10.0.0.7")]
    events += [failed(20, "carol", "10.0.0.9")]
    found = engine.feed(events) + engine.advance(120 * second)
    sources = sorted({json.loads(d.context)[0] for d in found})
    demo.step(
        f"threat: Sigma value_count correlation (3 accounts from one source within 1 min): "
        f"{len(found)} determination(s), source(s) {', '.join(sources) or 'none'}"
    )
    demo.record("threat sigma correlations", len(found))


# --------------------------------------------------------------------------- CLI


def _read_events(path: Path) -> list[dict[str, Any]]:
    from vmkernel.rules.windows import evtx_events, json_records, record_to_event

    if path.suffix == ".evtx":
        return list(evtx_events(str(path)))
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return [record_to_event(r) if "Event" in r else r for r in json_records(text)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InvalidArgument(
                    f"{path} line {n}", line[:80], f"one JSON object per line ({exc})"
                ) from None
    return out


@hookimpl
def vmk_cli_commands(group: click.Group) -> None:
    from vmkernel.cli import progress

    @group.group("threat")
    def threat() -> None:
        """Behavioral threat detection: rules as verified VMs."""

    @threat.command("scan")
    @click.argument("events", type=click.Path(exists=True, dir_okay=False))
    @click.option(
        "--rules",
        "rules",
        required=True,
        type=click.Path(exists=True),
        help="A rule file (native or Sigma .yml) or a directory of them.",
    )
    @click.option("--batch", type=int, default=4096, show_default=True, help="Events per engine call.")
    @click.option("--limit", type=int, default=50, show_default=True, help="Determinations to print.")
    def scan(events: str, rules: str, batch: int, limit: int) -> None:
        """Run EVENTS (.jsonl, evtx .json, .evtx) through the rules; print determinations and statistics."""
        programs = rules_from_path(rules)
        engine = RuleEngine(programs, max_instances=MAX_INSTANCES)
        evs = _read_events(Path(events))
        chunks = [evs[i : i + batch] for i in range(0, len(evs), max(1, batch))]
        dets = []
        for chunk in progress(chunks, length=len(chunks), label=f"{len(evs)} events"):
            dets.extend(engine.feed(chunk))
        if evs:  # the stream's clock: windows that ended before its last event are decided
            last = max(e["time_ns"] for e in evs if isinstance(e.get("time_ns"), int))
            dets.extend(engine.advance(last))
        for d in dets[:limit]:
            click.echo(f"{d.verdict:8} {d.rule}  context={d.context}  events={list(d.events)}  t={d.time_ns}")
        if len(dets) > limit:
            click.echo(f"... {len(dets) - limit} more")
        open_windows = sum(s["windows"] for s in engine.stats().values())
        click.echo(
            f"{len(programs)} rules, {len(evs)} events, {len(dets)} determinations, {engine.steps} VM steps"
            + (f", {open_windows} count windows still open at the end" if open_windows else "")
        )
        for name, s in engine.stats().items():
            if s["runs"] or s["matches"]:
                click.echo(
                    f"  {name}: runs={s['runs']} skipped={s['skipped']} steps={s['steps']} "
                    f"matches={s['matches']} no_matches={s['no_matches']}"
                )

    @threat.command("compile")
    @click.argument("rule", type=click.Path(exists=True, dir_okay=False))
    def compile_cmd(rule: str) -> None:
        """Show the annotated bytecode of every rule in RULE (native text or Sigma .yml)."""
        for prog in rules_from_path(rule):
            click.echo(disassemble(prog))
            click.echo("")
