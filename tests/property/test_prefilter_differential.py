"""Hypothesis: the Rust pre-filter against the reference, and the spec's invariants.

Rule sets and packets are drawn from small pools of addresses and ports so
that rules and packets actually meet; packets are then mutated and
truncated.  Each example classifies a list of packets, so the ``ci`` profile
covers well over 10,000 packets against as many rule sets as examples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from vmk_prefilter import build_frame

import vmkernel.fast as fast
import vmkernel.reference as ref
from vmkernel.errors import VmkError
from vmkernel.testing.profiles import scaled

NO_RULE = 2**32 - 1
BYPASS, REDIRECT, DROP = 0, 1, 2

V4 = ["10.0.0.1", "10.0.0.2", "10.1.2.3", "10.1.200.9", "192.168.1.1", "8.8.8.8"]
V6 = ["2001:db8::1", "2001:db8::2", "2001:db8:1::5", "fe80::1", "::ffff:10.0.0.1"]
PORTS = [0, 22, 53, 80, 443, 1024, 4789, 6081, 8080, 65535]
PROTOS = [6, 17, 1, 58, 132, 47]
PROTO_SPECS = ["tcp", "udp", "icmp", "icmpv6", "sctp", "47", "6/254", "0x10/0xf0", "any"]


# ---------------------------------------------------------------------------
# Strategies.


@st.composite
def cidr(draw: st.DrawFn, family: int) -> str:
    if family == 4:
        addr = draw(st.sampled_from(V4))
        return f"{addr}/{draw(st.sampled_from([0, 8, 16, 24, 32]) | st.integers(0, 32))}"
    addr = draw(st.sampled_from(V6[:4]))
    return f"{addr}/{draw(st.sampled_from([0, 32, 64, 128]) | st.integers(0, 128))}"


@st.composite
def port_spec(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["any", "one", "range", "wide"]))
    if kind == "any":
        return "any"
    if kind == "one":
        return str(draw(st.sampled_from(PORTS)))
    lo = draw(st.sampled_from(PORTS) if kind == "range" else st.integers(0, 65535))
    hi = draw(st.integers(lo, 65535))
    return f"{lo}-{hi}"


@st.composite
def rule_line(draw: st.DrawFn) -> str:
    action = draw(st.sampled_from(["bypass", "bypass", "drop", "redirect"]))
    parts = [action]
    if action == "redirect":
        parts.append(f"spi={draw(st.integers(0, 2**24 - 1))}")
        if draw(st.booleans()):
            parts.append(f"si={draw(st.integers(1, 255))}")
    if draw(st.integers(0, 3)) == 0:
        parts.append(f"prio={draw(st.integers(0, 12))}")

    def sometimes(k: int) -> bool:
        return draw(st.integers(0, k - 1)) == 0

    if sometimes(3):
        parts.append("dir=" + draw(st.sampled_from(["in", "out", "inout"])))
    family = draw(st.sampled_from([0, 0, 4, 4, 6]))
    if family:
        for side in ("src", "dst"):
            if draw(st.booleans()):
                parts.append(f"{side}={draw(cidr(family))}")
        if not any(p.startswith(("src=", "dst=")) for p in parts):
            parts.append(f"src={draw(cidr(family))}")
    if sometimes(3):
        proto = draw(st.sampled_from(PROTO_SPECS))
        parts.append(f"proto={proto}")
    for side in ("sport", "dport"):
        if sometimes(3):
            parts.append(f"{side}={draw(port_spec())}")
    if sometimes(6):
        mask = draw(st.sampled_from([0x02, 0x12, 0x04, 0x01, 0x17, 0x100, 0xFFFF]))
        parts.append(f"flags=0x{draw(st.integers(0, 0x1FF)) & mask:x}/0x{mask:x}")
    if sometimes(8):
        parts.append(f"vlan={draw(st.sampled_from([0, 7, 100]))}")
    if sometimes(8):
        parts.append(f"vni={draw(st.sampled_from([0, 5000]))}")
    return " ".join(parts)


rules_st = st.lists(rule_line(), min_size=0, max_size=25).map(lambda lines: "\n".join(lines) + "\n")


@st.composite
def packet(draw: st.DrawFn) -> bytes:
    family = draw(st.sampled_from([4, 4, 6]))
    pool = V4 if family == 4 else V6
    proto = draw(st.sampled_from(PROTOS))
    if family == 6 and proto == 1:
        proto = 58
    frame = build_frame(
        draw(st.sampled_from(pool)),
        draw(st.sampled_from(pool)),
        proto=proto,
        sport=draw(st.sampled_from(PORTS)),
        dport=draw(st.sampled_from(PORTS) | st.integers(0, 65535)),
        flags=draw(st.integers(0, 0x1FF)),
        vlans=draw(st.sampled_from([(), (), (), (100,), (0,), (7, 100), (100, 7), (7, 7, 100)])),
        vni=draw(st.none() | st.sampled_from([0, 5000])) if proto == 17 else None,
        payload=draw(st.binary(max_size=8)),
    )
    if draw(st.integers(0, 9)) == 0:
        si = draw(st.integers(1, 255) | st.just(0))
        frame = ref.Prefilter.nsh_encap(frame, draw(st.integers(0, 2**24 - 1)), si)
    return frame


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(packet()))
    for _ in range(draw(st.integers(0, 3))):
        if frame:
            frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        frame = frame[: draw(st.integers(0, len(frame)))]
    return bytes(frame)


packets_st = st.lists(packet() | mutated(), min_size=20, max_size=80)
# The differential test draws at least 50 frames per rule set: 200 examples in
# the ci profile are at least 10,000 frames, each against its own rule set.
many_packets_st = st.lists(packet() | mutated(), min_size=50, max_size=100)


def layout(frames: list[bytes]) -> tuple[bytes, np.ndarray, np.ndarray]:
    lengths = np.array([len(f) for f in frames], dtype=np.uint32)
    offsets = np.zeros(len(frames), dtype=np.uint32)
    if frames:
        offsets[1:] = np.cumsum(lengths[:-1])
    return b"".join(frames), offsets, lengths


def triples(out: tuple[np.ndarray, ...]) -> list[tuple[int, ...]]:
    return [tuple(int(a[i]) for a in out) for i in range(len(out[0]))]


def one(pf: Any, frame: bytes, direction: str = "out") -> tuple[int, int, int, int]:
    d = pf.classify(frame, direction)
    return (d.verdict, d.rule_id, d.spi, d.si)


def outcome(call: Any) -> tuple[Any, ...]:
    try:
        return ("ok", call())
    except VmkError as exc:
        return (type(exc).__name__, exc.thing, str(exc))


# ---------------------------------------------------------------------------
# Rust = reference.


@settings(max_examples=scaled(200))
@given(rules=rules_st, frames=many_packets_st, direction=st.sampled_from(["in", "out"]))
def test_rust_equals_reference(rules: str, frames: list[bytes], direction: str) -> None:
    f, r = fast.Prefilter.from_text(rules), ref.Prefilter.from_text(rules)
    assert f.to_text() == r.to_text() and f.to_json() == r.to_json()
    assert outcome(f.to_classbench) == outcome(r.to_classbench)
    batch_f = triples(f.classify_batch(*layout(frames), direction))
    batch_r = triples(r.classify_batch(*layout(frames), direction))
    assert batch_f == batch_r
    for frame, expected in zip(frames, batch_r, strict=True):
        assert one(f, frame, direction) == expected
        assert fast.Prefilter.parse(frame) == ref.Prefilter.parse(frame)


TOKENS = [
    "bypass", "drop", "redirect", "spi=1", "si=0", "si=9", "prio=3", "dir=out", "dir=up", "src=10.0.0.0/8",
    "dst=2001:db8::/33", "src=1.2.3.4/40", "dport=80-79", "sport=0x50", "proto=tcp", "proto=6/0x1ff",
    "flags=0x2/0x12", "flags=2", "vlan=4095", "vni=99999999", "=", "x=1", "#", "@", "\t", " ", "\n", ":", "é",
]  # fmt: skip


@settings(max_examples=scaled(200))
@given(st.lists(st.sampled_from(TOKENS), max_size=30).map(" ".join), st.sampled_from(["text", "classbench"]))
def test_rule_errors_agree(text: str, fmt: str) -> None:
    def load(module: Any) -> Any:
        def call() -> Any:
            return module.Prefilter(text, fmt).to_text()

        return call

    assert outcome(load(fast)) == outcome(load(ref))
    for module in (fast, ref):
        try:
            module.Prefilter(text, fmt)
        except VmkError as exc:
            assert exc.thing.startswith("rules line ") or exc.thing == "rules rule count"


# ---------------------------------------------------------------------------
# The spec's invariants, on the Rust implementation (the reference is held to
# the same results by the test above).


def precedence(rule_line_text: str, index: int) -> tuple[int, int]:
    for token in rule_line_text.split():
        if token.startswith("prio="):
            return (int(token[5:]), index)
    return (index, index)


@settings(max_examples=scaled(100))
@given(lines=st.lists(rule_line(), min_size=1, max_size=15), frames=packets_st)
def test_returned_rule_matches_and_no_better_rule_does(lines: list[str], frames: list[bytes]) -> None:
    pf = fast.Prefilter.from_text("\n".join(lines))
    alone = [fast.Prefilter.from_text(line) for line in lines]
    order = sorted(range(len(lines)), key=lambda i: precedence(lines[i], i))
    for frame in frames:
        rule_id = pf.classify(frame).rule_id
        hits = [i for i in order if alone[i].classify(frame).rule_id == 0]
        assert rule_id == (hits[0] if hits else NO_RULE)


@settings(max_examples=scaled(100))
@given(lines=st.lists(rule_line(), min_size=1, max_size=15), extra=rule_line(), frames=packets_st)
def test_appending_below_or_deleting_a_non_match_changes_nothing(
    lines: list[str], extra: str, frames: list[bytes]
) -> None:
    pf = fast.Prefilter.from_text("\n".join(lines))
    worst = max(precedence(line, i)[0] for i, line in enumerate(lines))
    appended_line = " ".join(t for t in extra.split() if not t.startswith("prio=")) + f" prio={worst + 1}"
    appended = fast.Prefilter.from_text("\n".join([*lines, appended_line]))
    # Pin priorities so deleting a line does not renumber the others.
    pinned = [line if "prio=" in line else f"{line} prio={i}" for i, line in enumerate(lines)]
    for frame in frames:
        d = one(pf, frame)
        if d[1] != NO_RULE:
            assert one(appended, frame) == d
        victims = [
            i for i in range(len(lines)) if fast.Prefilter.from_text(lines[i]).classify(frame).rule_id != 0
        ]
        if victims:
            v = victims[len(victims) // 2]
            smaller = fast.Prefilter.from_text("\n".join(pinned[:v] + pinned[v + 1 :]))
            e = one(smaller, frame)
            shifted = d[1] - 1 if d[1] != NO_RULE and d[1] > v else d[1]
            assert e == (d[0], shifted, d[2], d[3])


def security_verdict(frame: bytes) -> int:
    """A deterministic stand-in security component: drops some flows, delivers the rest."""
    parsed = ref.Prefilter.parse(frame)
    if parsed["reason"] is not None:
        return DROP
    return DROP if (parsed["sport"] + parsed["dport"]) % 3 == 0 else BYPASS


@settings(max_examples=scaled(100))
@given(rules=rules_st, frames=packets_st, data=st.data())
def test_cache_on_equals_cache_off_end_to_end(rules: str, frames: list[bytes], data: st.DataObject) -> None:
    on, off = fast.Prefilter.from_text(rules), fast.Prefilter.from_text(rules)
    off.flow_cache = False
    # An empty cache changes nothing at all.
    assert triples(on.classify_batch(*layout(frames))) == triples(off.classify_batch(*layout(frames)))
    for frame in data.draw(st.lists(st.sampled_from(frames), max_size=10), label="inspected"):
        on.program_flow(frame, security_verdict(frame))

    def delivered(pf: Any, frame: bytes) -> bool:
        verdict = pf.classify(frame).verdict
        if verdict == REDIRECT:
            verdict = security_verdict(frame)
        return bool(verdict == BYPASS)

    for frame in frames:
        assert delivered(on, frame) == delivered(off, frame)


@settings(max_examples=scaled(100))
@given(rules=rules_st, frames=packets_st, data=st.data())
def test_splitting_a_batch_changes_nothing(rules: str, frames: list[bytes], data: st.DataObject) -> None:
    pf = fast.Prefilter.from_text(rules)
    whole = triples(pf.classify_batch(*layout(frames)))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(frames)), max_size=5), label="cuts"))
    parts: list[tuple[int, ...]] = []
    for a, b in zip([0, *cuts], [*cuts, len(frames)], strict=True):
        parts += triples(pf.classify_batch(*layout(frames[a:b])))
    assert parts == whole


@settings(max_examples=scaled(200))
@given(rules=rules_st, frame=packet(), data=st.data())
def test_mutation_never_opens_a_bypass(rules: str, frame: bytes, data: st.DataObject) -> None:
    pf = fast.Prefilter.from_text(rules)
    bypass_rules = {i for i, r in enumerate(pf.to_text().splitlines()) if r.startswith("bypass")}
    if pf.classify(frame).verdict == BYPASS:
        return
    for _ in range(10):
        m = bytearray(frame)
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            m[data.draw(st.integers(0, len(m) - 1), label="at")] = data.draw(
                st.integers(0, 255), label="byte"
            )
        m = m[: data.draw(st.integers(0, len(m)), label="cut")]
        d = pf.classify(bytes(m))
        if d.verdict == BYPASS:
            assert fast.Prefilter.parse(bytes(m))["reason"] is None
            assert d.rule_id in bypass_rules


@settings(max_examples=scaled(100))
@given(rules=rules_st, frame=packet(), spi=st.integers(0, 2**24 - 1), si=st.integers(0, 255))
def test_si_goes_down_by_exactly_one_per_hop(rules: str, frame: bytes, spi: int, si: int) -> None:
    pf = fast.Prefilter.from_text(rules)
    hops = 0
    while True:
        d = pf.classify(fast.Prefilter.nsh_encap(frame, spi, si))
        if si == 0:
            assert (d.verdict, d.rule_id) == (DROP, NO_RULE)
            break
        if d.verdict != REDIRECT:
            break
        assert (d.spi, d.si) == (spi, si - 1)
        si = d.si
        hops += 1
    assert hops <= 255


def test_ipv4_mapped_ipv6_packets_do_not_match_ipv4_rules() -> None:
    frame = build_frame("::ffff:10.0.0.1", "::ffff:10.0.0.2")
    for module in (fast, ref):
        pf = module.Prefilter.from_text("bypass src=10.0.0.0/8")
        assert pf.classify(frame).verdict == REDIRECT
