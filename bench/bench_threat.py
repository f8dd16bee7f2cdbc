"""Threat-rule engine benchmark: Rust vs the pure-Python reference, measured side by side.

Prints VM instructions/s on straight-line programs, events/s against the whole compiled SigmaHQ
rule set (needs $VMKERNEL_SHARED_DATA/sigma), and the speed-ups.  Run:
    .venv/bin/python bench/bench_threat.py
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from vmkernel import fast, reference
from vmkernel.rules import program as P


def straight_line(n: int) -> bytes:
    code = [P.Instr(P.LOADF, 0, a=0)]
    while len(code) < n - 1:
        code += [P.Instr(P.EXISTS, 0), P.Instr(P.NOT)]
    code.append(P.Instr(P.HALT, x=P.MONITOR))
    return P.encode(P.Program("line", code, [], ["cmd"]))


def timed(fn: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def bench_instructions() -> None:
    prog = straight_line(4000)
    events = [{"type": "x", "time_ns": i, "cmd": "a"} for i in range(5000)]
    eng = fast.RuleEngine([prog])
    dt, _ = timed(lambda: eng.feed(events))
    rust = eng.steps / dt
    ref = reference.RuleEngine([prog])
    dt_ref, _ = timed(lambda: ref.feed(events[:100]))
    py = ref.steps / dt_ref
    print(
        f"straight-line VM: Rust {rust / 1e6:,.1f} M instructions/s, reference {py / 1e6:,.2f} M/s, "
        f"speed-up {rust / py:,.0f}x (goal >= 100 M/s)"
    )


def sigma_events(root: Path) -> list[dict[str, Any]]:
    import yaml

    from vmkernel.rules.windows import json_records, record_to_event

    out = []
    for info in sorted((root / "regression_data").rglob("info.yml")):
        meta = yaml.safe_load(info.read_text())
        for t in meta.get("regression_tests_info") or []:
            jp = root / Path(t["path"]).with_suffix(".json")
            if jp.exists():
                out.extend(record_to_event(r) for r in json_records(jp.read_text()))
    return out


def bench_sigma() -> None:
    root = Path(
        os.environ.get("VMKERNEL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    root = root / "sigma"
    if not (root / "rules").is_dir():
        print(f"SigmaHQ benchmark skipped: no corpus at {root}")
        return
    from vmkernel.rules.sigma import compile_collection

    dirs = [
        root / d
        for d in (
            "rules",
            "rules-emerging-threats",
            "rules-threat-hunting",
            "rules-compliance",
            "rules-dfir",
            "rules-placeholder",
        )
        if (root / d).is_dir()
    ]
    dt, results = timed(lambda: compile_collection(dirs))
    progs = [r.program for r in results if r.program is not None]
    print(
        f"SigmaHQ: {len(results)} rules, {len(progs)} compiled, {len(results) - len(progs)} rejected "
        f"in {dt:.1f} s ({len(results) / dt:,.0f} rules/s)"
    )
    lens = sorted(len(P.decode(p).code) for p in progs)
    print(
        f"  program length: median {lens[len(lens) // 2]}, p99 {lens[int(len(lens) * 0.99)]}, max {lens[-1]}"
    )
    base = sigma_events(root)
    events = []
    for k in range(max(1, 20000 // len(base))):
        events.extend({**e, "time_ns": e["time_ns"] + k} for e in base)
    eng = fast.RuleEngine(progs)
    dt, dets = timed(lambda: eng.feed(events))
    rust = len(events) / dt
    st = eng.stats()
    runs = sum(s["runs"] for s in st.values())
    skipped = sum(s["skipped"] for s in st.values())
    print(
        f"  Rust feed(dicts): {rust:,.0f} events/s over {len(events)} events, {len(dets)} determinations; "
        f"{runs / len(events):.1f} rule runs/event, {skipped / len(events):.0f} pre-filter skips/event"
    )
    data = "\n".join(json.dumps(e) for e in events).encode()
    eng2 = fast.RuleEngine(progs)
    dt, _ = timed(lambda: eng2.feed_jsonl(data))
    print(f"  Rust feed_jsonl:  {len(events) / dt:,.0f} events/s ({len(data) / dt / 1e6:,.0f} MB/s)")
    ref = reference.RuleEngine(progs)
    sample = events[: len(base)]
    dt, _ = timed(lambda: ref.feed(sample))
    py = len(sample) / dt
    print(f"  reference:        {py:,.0f} events/s; speed-up {rust / py:,.0f}x (goal >= 50x)")


if __name__ == "__main__":
    bench_instructions()
    bench_sigma()
