"""The processor's six invariants as hypothesis properties, on both implementations.

1. isolation: every frame a guest reaches is its own or granted;
2. after the correctly scoped invalidation a cached translation equals an
   uncached walk, and before it the result is the old or the new one;
3. after a VM switch results equal a processor that only ever ran that VM;
4. changing one domain's permission bit changes only that domain's results;
5. batch = scalar and Rust = reference (test_processor_differential.py);
6. with HSR clear VMR has no effect; a VMR write from a non-hypervisor domain
   faults and changes nothing; entering a domain off its entry points faults.
"""

from __future__ import annotations

import random
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmk_processor.tables import PAGE_SIZE
from vmk_processor.testing import ENTRY_POINTS, World, guest_world, outcome

from vmkernel import fast, reference
from vmkernel.errors import DomainEntryFault, RegisterAccessFault
from vmkernel.testing.profiles import scaled

IMPLS = pytest.mark.parametrize("impl", [fast, reference], ids=["fast", "reference"])
_SEED = st.integers(0, 2**32)


def _enter(cpu: Any, domain: int) -> None:
    cpu.enter_domain(domain, ENTRY_POINTS[domain])


def _results(world: World, vm: int, domain: int, access: int, *, walk: bool = False) -> list[Any]:
    cpu = world.cpu
    _enter(cpu, 0)
    cpu.write_vm_register(vm)
    _enter(cpu, domain)
    call = cpu.walk if walk else cpu.translate
    return [outcome(call, a, access) for a in world.addresses]


def _poke(cpu: Any, at: int, value: int) -> None:
    cpu.write_phys(at, value.to_bytes(8, "little"))


def _peek(cpu: Any, at: int) -> int:
    return int.from_bytes(cpu.read_phys(at, 8), "little")


@IMPLS
@settings(max_examples=scaled(500))
@given(seed=_SEED, corrupt=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 2**64 - 1)), max_size=6))
def test_isolation(impl: ModuleType, seed: int, corrupt: list[tuple[int, int]]) -> None:
    """With isolation on, every successful guest translation lands on a frame
    the guest owns, whatever its (even corrupted) tables say; with it off, the
    checker reports every frame a guest could reach but does not own."""
    enforced = guest_world(impl.Processor, seed, isolation=True)
    loose = guest_world(impl.Processor, seed, isolation=False)
    for w in (enforced, loose):
        assert w.cpu.isolation_violation(1) is None
        assert w.cpu.isolation_violation(2) is None
    rng = random.Random(seed)
    for pick, value in corrupt:
        if rng.random() < 0.5 and enforced.s2_leaves:
            at = enforced.s2_leaves[pick % len(enforced.s2_leaves)][3]
        else:
            at = enforced.entries[pick % len(enforced.entries)]
        value = (
            value
            if rng.random() < 0.3
            else (value & ~0x000F_FFFF_FFFF_F000)
            | (rng.randrange(enforced.cpu.memory_bytes // PAGE_SIZE) * PAGE_SIZE)
        )
        for w in (enforced, loose):
            _poke(w.cpu, at, value)
    for w in (enforced, loose):
        w.cpu.invalidate_all()
    for vm in (1, 2):
        for domain in (0, 1, 2):
            for access in (0, 1, 2):
                strict = _results(enforced, vm, domain, access)
                relaxed = _results(loose, vm, domain, access)
                for res in strict:
                    if res[0] == "ok":
                        assert enforced.cpu.frame_owner(res[1]) == vm
                for res in relaxed:
                    if res[0] == "ok" and loose.cpu.frame_owner(res[1]) != vm:
                        assert loose.cpu.isolation_violation(vm) is not None
                # Only the isolation check differs between the two processors.
                for s, r in zip(strict, relaxed, strict=True):
                    if s != r:
                        assert s[0] == "err" and s[2]["kind"] == "isolation"


@IMPLS
@settings(max_examples=scaled(500))
@given(
    seed=_SEED,
    pick=st.integers(0, 10**6),
    value=st.integers(0, 2**64 - 1),
    stage2=st.booleans(),
    hypervisor=st.booleans(),
    access=st.sampled_from((0, 1, 2)),
)
def test_scoped_invalidation(
    impl: ModuleType, seed: int, pick: int, value: int, stage2: bool, hypervisor: bool, access: int
) -> None:
    world = guest_world(impl.Processor, seed, hypervisor=hypervisor, tlb_entries=1024)
    cpu = world.cpu
    if stage2 and hypervisor:
        vm, gpa, size, at = world.s2_leaves[pick % len(world.s2_leaves)]
        domains = (0, 1, 2)
    else:
        vm, domain, _vaddr, size, at = world.leaves[pick % len(world.leaves)]
        domains = (domain,)
        if not hypervisor:
            vm = 0
    if value & 1 and random.Random(value).random() < 0.7:  # keep most rewrites mapping something
        value = (value & ~0x000F_FFFF_FFFF_F000) | (random.Random(value).randrange(1 << 20) & ~0xFFF)
    old = {d: _results(world, vm, d, access) for d in domains}  # fills the TLB
    _poke(cpu, at, value)
    for d in domains:
        new = _results(world, vm, d, access, walk=True)
        cached = _results(world, vm, d, access)
        for o, n, c in zip(old[d], new, cached, strict=True):
            assert c in (o, n)
    _enter(cpu, 0)
    if stage2 and hypervisor:
        cpu.invalidate_gpa(vm, gpa, size)
    elif size == PAGE_SIZE:
        cpu.invalidate_page(vm, _vaddr)
    else:
        cpu.invalidate_vm(vm)
    for d in domains:
        assert _results(world, vm, d, access) == _results(world, vm, d, access, walk=True)


@IMPLS
@settings(max_examples=scaled(500))
@given(
    seed=_SEED,
    schedule=st.lists(
        st.tuples(st.sampled_from((0, 1, 2)), st.sampled_from((0, 1, 2)), st.sampled_from((0, 1, 2))),
        min_size=1,
        max_size=12,
    ),
)
def test_vm_switch_equals_fresh_processor(
    impl: ModuleType, seed: int, schedule: list[tuple[int, int, int]]
) -> None:
    """Interleaving VMs on one processor (no flush on switch) gives the results
    of one processor per VM that only ever ran that VM."""
    shared = guest_world(impl.Processor, seed, tlb_entries=64)
    alone = {vm: guest_world(impl.Processor, seed, tlb_entries=64) for vm in (0, 1, 2)}
    for vm, domain, access in schedule:
        got = _results(shared, vm, domain, access)
        want = _results(alone[vm], vm, domain, access)
        assert got == want
    assert shared.cpu.stats()["tlb_hits"] > 0 or len(schedule) == 1 or not shared.addresses


@IMPLS
@settings(max_examples=scaled(500))
@given(
    seed=_SEED,
    pick=st.integers(0, 10**6),
    domain=st.sampled_from((0, 1, 2)),
    access=st.sampled_from((0, 1, 2)),
    vm=st.sampled_from((0, 1, 2)),
)
def test_permission_bit_is_per_domain(
    impl: ModuleType, seed: int, pick: int, domain: int, access: int, vm: int
) -> None:
    world = guest_world(impl.Processor, seed)
    cpu = world.cpu
    leaves = [leaf for leaf in world.leaves if leaf[0] == vm] or world.leaves
    at = leaves[pick % len(leaves)][4]
    before = {(d, a): _results(world, vm, d, a, walk=True) for d in (0, 1, 2) for a in (0, 1, 2)}
    _poke(cpu, at, _peek(cpu, at) ^ (1 << (52 + 3 * domain + access)))
    after = {(d, a): _results(world, vm, d, a, walk=True) for d in (0, 1, 2) for a in (0, 1, 2)}
    for key in before:
        if key[0] != domain:
            assert before[key] == after[key]
    # The flipped bit matters for the entry's own mapping in that domain only.
    changed = [k for k in before if before[k] != after[k]]
    assert all(k == (domain, access) for k in changed)


@IMPLS
@settings(max_examples=scaled(500))
@given(
    seed=_SEED,
    vms=st.lists(st.integers(0, 7), min_size=1, max_size=4),
    access=st.sampled_from((0, 1, 2)),
    domain=st.sampled_from((1, 2)),
    bad_entry=st.integers(0, 2**64 - 1),
)
def test_register_and_domain_rules(
    impl: ModuleType, seed: int, vms: list[int], access: int, domain: int, bad_entry: int
) -> None:
    # HSR clear: the VM register changes nothing.
    world = guest_world(impl.Processor, seed, hypervisor=False)
    baseline = _results(world, 0, domain, access, walk=True)
    for vm in vms:
        assert _results(world, vm, domain, access) == baseline
    # A VMR write from a non-hypervisor domain faults and changes nothing.
    world = guest_world(impl.Processor, seed, hypervisor=True)
    cpu = world.cpu
    cpu.write_vm_register(vms[0])
    _enter(cpu, domain)
    for vm in vms:
        with pytest.raises(RegisterAccessFault):
            cpu.write_vm_register(vm)
        assert cpu.vm_register == vms[0]
    # Entering a domain anywhere but its entry point faults and changes nothing.
    for target in (0, 1, 2):
        if bad_entry != ENTRY_POINTS[target]:
            with pytest.raises(DomainEntryFault):
                cpu.enter_domain(target, bad_entry)
            assert cpu.domain == domain
