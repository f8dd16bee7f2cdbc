"""Differential tests: the Rust processor against the pure-Python reference.

Random worlds (chaotic tables full of faults, and well-formed two-stage guests)
are built identically on both; then random operation sequences (translations,
uncached walks, batches, VM switches, domain entries, entry rewrites, every
kind of invalidation, ownership changes) run on both and every result,
exception attribute and counter must agree.  Batches are also checked against
scalar calls on a third processor.
"""

from __future__ import annotations

import array
import random
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from vmk_processor.testing import ENTRY_POINTS, World, chaos_address, chaos_world, guest_world, outcome

from vmkernel import fast, reference
from vmkernel.testing.profiles import scaled

_ACCESS = st.sampled_from((0, 1, 2))
_SIZE = st.sampled_from((1, 1, 2, 4, 8))


def _address(draw: Any, world: World) -> int:
    if world.addresses and draw(st.booleans()):
        return int(draw(st.sampled_from(world.addresses)))
    return chaos_address(random.Random(draw(st.integers(0, 2**32))))


@st.composite
def _op(draw: Any, world: World) -> tuple[Any, ...]:
    kind = draw(
        st.sampled_from(
            (
                "translate",
                "translate",
                "translate",
                "translate",
                "walk",
                "batch",
                "vmr",
                "enter",
                "poke",
                "inv_page",
                "inv_vm",
                "inv_all",
                "inv_gpa",
                "owner",
                "grant",
                "revoke",
                "isolation",
                "read_reg",
                "perm",
            )
        )
    )
    vm = draw(st.sampled_from((0, 1, 2, 3, 8)))
    if kind in ("translate", "walk"):
        return (kind, _address(draw, world), draw(_ACCESS), draw(_SIZE))
    if kind == "batch":
        n = draw(st.integers(0, 40))
        return (kind, [_address(draw, world) for _ in range(n)], draw(_ACCESS), draw(_SIZE))
    if kind == "vmr":
        return (kind, vm)
    if kind == "enter":
        domain = draw(st.sampled_from((0, 1, 2, 3)))
        point = ENTRY_POINTS[domain % 3] if draw(st.booleans()) else draw(st.integers(0, 2**64 - 1))
        return (kind, domain, point)
    if kind == "poke":
        at = draw(st.sampled_from(world.entries)) if world.entries else 0x1000
        return (kind, at, draw(st.integers(0, 2**64 - 1)) if draw(st.booleans()) else 0)
    if kind == "inv_page":
        return (kind, vm, _address(draw, world))
    if kind == "inv_gpa":
        return (kind, vm, draw(st.integers(0, 1 << 24)), draw(st.integers(0, 1 << 22)))
    if kind in ("owner", "grant", "revoke"):
        return (kind, vm, draw(st.integers(0, 64)) * 4096, draw(st.integers(0, 64)) * 4096)
    if kind == "isolation":
        return (kind, vm)
    if kind == "read_reg":
        return (kind, draw(st.sampled_from(("vmr", "table_root", "stage2_root", "bogus"))))
    if kind == "perm":
        return (
            kind,
            draw(st.sampled_from(("vmr", "table_root", "stage2_root", "domain_table"))),
            draw(st.sampled_from((1, 2))),
            draw(st.booleans()),
            draw(st.booleans()),
        )
    return (kind,)


def _apply(cpu: Any, op: tuple[Any, ...]) -> tuple[Any, ...]:
    kind = op[0]
    if kind == "translate":
        return outcome(cpu.translate, op[1], op[2], op[3])
    if kind == "walk":
        return outcome(cpu.walk, op[1], op[2], op[3])
    if kind == "batch":
        src = array.array("Q", op[1])
        out = array.array("Q", bytes(8 * len(op[1])))
        res = outcome(cpu.translate_batch, src, op[2], out, op[3])
        return (*res, list(out))
    if kind == "vmr":
        return outcome(cpu.write_vm_register, op[1])
    if kind == "enter":
        return outcome(cpu.enter_domain, op[1], op[2])
    if kind == "poke":
        return outcome(cpu.write_phys, op[1], op[2].to_bytes(8, "little"))
    if kind == "inv_page":
        return outcome(cpu.invalidate_page, op[1], op[2])
    if kind == "inv_vm":
        return outcome(cpu.invalidate_vm, 1)
    if kind == "inv_all":
        return outcome(cpu.invalidate_all)
    if kind == "inv_gpa":
        return outcome(cpu.invalidate_gpa, op[1], op[2], op[3])
    if kind == "owner":
        return outcome(cpu.set_frame_owner, op[2], op[3], op[1])
    if kind == "grant":
        return outcome(cpu.grant_frames, op[1], op[2], op[3])
    if kind == "revoke":
        return outcome(cpu.revoke_frames, op[1], op[2], op[3])
    if kind == "isolation":
        return outcome(cpu.isolation_violation, op[1])
    if kind == "read_reg":
        return outcome(cpu.read_register, op[1])
    if kind == "perm":
        return outcome(cpu.set_register_permission, op[1], op[2], op[3], op[4])
    raise AssertionError(op)


def _state(cpu: Any) -> tuple[Any, ...]:
    return (cpu.stats(), cpu.vm_register, int(cpu.domain))


def _run_both(build: Any, data: Any) -> None:
    ours = build(fast.Processor)
    ref = build(reference.Processor)
    if ours.cpu.memory_bytes <= 1 << 20:
        assert ours.cpu.read_phys(0, ours.cpu.memory_bytes) == ref.cpu.read_phys(0, ref.cpu.memory_bytes)
    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        op = data.draw(_op(ref), label="op")
        got, want = _apply(ours.cpu, op), _apply(ref.cpu, op)
        assert got == want, op
        assert _state(ours.cpu) == _state(ref.cpu), op


@settings(max_examples=scaled(3000))
@given(
    seed=st.integers(0, 2**32),
    hypervisor=st.booleans(),
    isolation=st.booleans(),
    tlb=st.sampled_from((16, 64)),
    data=st.data(),
)
def test_chaotic_tables_agree(seed: int, hypervisor: bool, isolation: bool, tlb: int, data: Any) -> None:
    _run_both(
        lambda cls: chaos_world(cls, seed, hypervisor=hypervisor, isolation=isolation, tlb_entries=tlb), data
    )


@settings(max_examples=scaled(1500))
@given(seed=st.integers(0, 2**32), isolation=st.booleans(), hypervisor=st.booleans(), data=st.data())
def test_wellformed_guests_agree(seed: int, isolation: bool, hypervisor: bool, data: Any) -> None:
    _run_both(
        lambda cls: guest_world(cls, seed, isolation=isolation, hypervisor=hypervisor, tlb_entries=16), data
    )


@settings(max_examples=scaled(1500))
@given(
    seed=st.integers(0, 2**32),
    hypervisor=st.booleans(),
    picks=st.lists(st.integers(0, 10_000), max_size=300),
    access=_ACCESS,
    size=_SIZE,
    vm=st.sampled_from((0, 1, 2)),
    kind=st.sampled_from(("array", "numpy", "bytes", "memoryview")),
)
def test_batch_equals_scalar(
    seed: int, hypervisor: bool, picks: list[int], access: int, size: int, vm: int, kind: str
) -> None:
    """One batch call equals scalar calls in order: addresses, fault codes, counters, TLB state."""
    batch_world = guest_world(fast.Processor, seed, hypervisor=hypervisor, tlb_entries=16)
    scalar_world = guest_world(fast.Processor, seed, hypervisor=hypervisor, tlb_entries=16)
    ref_world = guest_world(reference.Processor, seed, hypervisor=hypervisor, tlb_entries=16)
    pool = batch_world.addresses + [chaos_address(random.Random(seed + i)) for i in range(8)]
    addrs = [pool[p % len(pool)] for p in picks]
    for w in (batch_world, scalar_world, ref_world):
        w.cpu.write_vm_register(vm)
    src: Any
    out: Any
    if kind == "numpy":
        src, out = np.array(addrs, dtype=np.uint64), np.zeros(len(addrs), dtype=np.uint64)
    elif kind == "bytes":
        src, out = array.array("Q", addrs).tobytes(), bytearray(8 * len(addrs))
    elif kind == "memoryview":
        src, out = memoryview(array.array("Q", addrs)), memoryview(array.array("Q", [7] * len(addrs)))
    else:
        src, out = array.array("Q", addrs), array.array("Q", [7] * len(addrs))
    codes = batch_world.cpu.translate_batch(src, access, out, size)
    got = np.frombuffer(bytes(out), dtype=np.uint64).tolist() if len(addrs) else []
    ref_out = array.array("Q", bytes(8 * len(addrs)))
    ref_codes = ref_world.cpu.translate_batch(array.array("Q", addrs), access, ref_out, size)
    assert bytes(codes) == bytes(ref_codes)
    assert got == list(ref_out)
    for i, a in enumerate(addrs):
        res = outcome(scalar_world.cpu.translate, a, access, size)
        if res[0] == "ok":
            assert (got[i], codes[i]) == (res[1], 0)
        else:
            assert (got[i], codes[i]) == (0, res[2]["code"])
    assert batch_world.cpu.stats() == scalar_world.cpu.stats() == ref_world.cpu.stats()
    # Same TLB contents afterwards: a second pass gives the same hit/miss counts.
    for w in (batch_world, scalar_world):
        w.cpu.reset_stats()
        for a in addrs:
            outcome(w.cpu.translate, a, access, size)
    assert batch_world.cpu.stats() == scalar_world.cpu.stats()
