"""Hypothesis: direction is symmetric, and inbound steering agrees on both implementations.

* Classifying frames as inbound under a rule set gives exactly what
  classifying them as outbound gives under the same rules with ``dir=in``
  and ``dir=out`` swapped (Rust and reference alike, and they agree).
* A kernel whose pre-filter is the Rust one and a kernel whose pre-filter is
  the reference, driven through the same random mix of ``deliver_frames``
  and ``send_frames`` batches (so the flow cache carries verdicts across
  batches and directions), return the same summaries and write the same
  journal.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from vmk_prefilter import build_frame
from vmk_prefilter import plugin as prefilter_plugin

import vmkernel.fast as fast
import vmkernel.reference as ref
from vmkernel import Kernel
from vmkernel.testing.profiles import scaled

ADDRS = ["10.0.0.1", "10.0.0.2", "10.0.9.9", "198.51.100.7"]
PORTS = [22, 23, 53, 80, 443, 8080, 40000]


@st.composite
def rule_line(draw: st.DrawFn) -> str:
    action = draw(st.sampled_from(["bypass", "drop", "redirect"]))
    parts = [action]
    if action == "redirect":
        parts.append(f"spi={draw(st.integers(0, 2**24 - 1))} si={draw(st.integers(1, 255))}")
    direction = draw(st.sampled_from([None, "in", "out", "inout"]))
    if direction:
        parts.append(f"dir={direction}")
    if draw(st.booleans()):
        parts.append(f"{draw(st.sampled_from(['src', 'dst']))}={draw(st.sampled_from(ADDRS))}/"
                     f"{draw(st.sampled_from([8, 16, 24, 32]))}")  # fmt: skip
    if draw(st.booleans()):
        parts.append(f"proto={draw(st.sampled_from(['tcp', 'udp', 'any']))}")
    if draw(st.booleans()):
        lo = draw(st.sampled_from(PORTS))
        parts.append(f"dport={lo}-{draw(st.integers(lo, 65535))}")
    if draw(st.integers(0, 3)) == 0:
        parts.append(f"flags=0x{draw(st.sampled_from([0x02, 0x00, 0x12])):x}/0x12")
    return " ".join(parts)


rules_st = st.lists(rule_line(), max_size=12).map("\n".join)


@st.composite
def frame(draw: st.DrawFn) -> bytes:
    proto = draw(st.sampled_from([6, 6, 17]))
    built = build_frame(
        draw(st.sampled_from(ADDRS)),
        draw(st.sampled_from(ADDRS)),
        proto=proto,
        sport=draw(st.sampled_from(PORTS)),
        dport=draw(st.sampled_from(PORTS)),
        flags=draw(st.sampled_from([0x02, 0x12, 0x18, 0x10, 0x01, 0x04])) if proto == 6 else 0,
    )
    if draw(st.integers(0, 9)) == 0:
        built = built[: draw(st.integers(0, len(built)))]  # truncated: fail closed
    return built


frames_st = st.lists(frame(), min_size=1, max_size=30)


def swap_directions(rules: str) -> str:
    swapped = {"dir=in": "dir=out", "dir=out": "dir=in"}
    return "\n".join(" ".join(swapped.get(tok, tok) for tok in line.split()) for line in rules.splitlines())


def layout(frames: list[bytes]) -> tuple[bytes, np.ndarray, np.ndarray]:
    lengths = np.array([len(f) for f in frames], dtype=np.uint32)
    offsets = np.zeros(len(frames), dtype=np.uint32)
    offsets[1:] = np.cumsum(lengths[:-1])
    return b"".join(frames), offsets, lengths


def as_lists(out: tuple[np.ndarray, ...]) -> list[list[int]]:
    return [a.tolist() for a in out]


@settings(max_examples=scaled(300))
@given(rules=rules_st, frames=frames_st)
def test_inbound_equals_outbound_with_directions_swapped(rules: str, frames: list[bytes]) -> None:
    results = []
    for module in (fast, ref):
        inbound = as_lists(module.Prefilter(rules).classify_batch(*layout(frames), "in"))
        mirrored = as_lists(module.Prefilter(swap_directions(rules)).classify_batch(*layout(frames), "out"))
        assert inbound == mirrored
        results.append(inbound)
    assert results[0] == results[1]


def drive(rules: str, module: Any, batches: list[tuple[str, str, list[bytes]]]) -> tuple[list[Any], str]:
    with Kernel(seed=3, plugins=[prefilter_plugin], autoload=False) as k:
        prefilter_plugin.state(k).prefilter = module.Prefilter(rules)
        vms = {}
        for name, ip in (("a", "10.0.0.1"), ("b", "10.0.0.2")):
            vms[name] = k.launch_vm(k.create_vm(name, ip=ip))
        prefilter_plugin.set_service_path(k, vms["a"], 0, "inout", spi=5)
        prefilter_plugin.set_service_path(k, vms["b"], 0, "in", spi=6, si=60)
        summaries = []
        for call, vm, frames in batches:
            summaries.append(getattr(k, call)(vms[vm], frames))
        k.check_invariants()
        return summaries, k.journal.digest()


@settings(max_examples=scaled(150), deadline=None)
@given(
    rules=rules_st,
    batches=st.lists(
        st.tuples(st.sampled_from(["deliver_frames", "send_frames"]), st.sampled_from(["a", "b"]), frames_st),
        min_size=1,
        max_size=5,
    ),
)
def test_kernels_on_both_implementations_agree(
    rules: str, batches: list[tuple[str, str, list[bytes]]]
) -> None:
    assert drive(rules, fast, batches) == drive(rules, ref, batches)
