"""The simulated clock: integer nanoseconds, one vmk_tick per advance, rolled back with a failing tick."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmkernel import Kernel, hookimpl
from vmkernel.errors import ClockError, HookFailed, InvalidArgument

MAX_NS = 2**63 - 1


class Ticks:
    name = "ticks"

    def __init__(self) -> None:
        self.ticks: list[int] = []
        self.fail_at: set[int] = set()

    @hookimpl
    def vmk_tick(self, kernel: Kernel, now_ns: int) -> None:
        assert kernel.clock.now_ns == now_ns  # already moved when plugins hear of it
        self.ticks.append(now_ns)
        kernel.emit("ticks.seen", "clock", at=now_ns)
        if now_ns in self.fail_at:
            raise RuntimeError(f"cannot handle {now_ns}")


@pytest.fixture
def ticks() -> Ticks:
    return Ticks()


@pytest.fixture
def kernel(tmp_path: Path, ticks: Ticks) -> Iterator[Kernel]:
    with Kernel(seed=2, data_dir=tmp_path / "k", plugins=[ticks], autoload=False) as k:
        yield k


def test_starts_at_zero(kernel: Kernel) -> None:
    assert kernel.clock.now_ns == 0
    assert all(e.time_ns == 0 for e in kernel.journal)


def test_advance_fires_one_tick_with_the_new_time(kernel: Kernel, ticks: Ticks) -> None:
    assert kernel.clock.advance(1_500) == 1_500
    assert ticks.ticks == [1_500]
    assert kernel.clock.advance(3_600 * 10**9) == 1_500 + 3_600 * 10**9  # one tick however far it jumps
    assert ticks.ticks == [1_500, 1_500 + 3_600 * 10**9]
    adv = kernel.journal.of_kind("clock.advance")
    assert [(e.time_ns, e.data["from_ns"]) for e in adv] == [(1_500, 0), (1_500 + 3_600 * 10**9, 1_500)]
    # events emitted during the tick carry the new time
    assert [e.time_ns for e in kernel.journal.of_kind("ticks.seen")] == ticks.ticks


def test_zero_advance_still_ticks(kernel: Kernel, ticks: Ticks) -> None:
    kernel.clock.advance(0)
    assert ticks.ticks == [0]
    assert kernel.clock.now_ns == 0


def test_advance_to(kernel: Kernel, ticks: Ticks) -> None:
    kernel.clock.advance(100)
    assert kernel.clock.advance_to(250) == 250
    assert kernel.clock.advance_to(250) == 250
    assert ticks.ticks == [100, 250, 250]
    with pytest.raises(ClockError, match="249"):
        kernel.clock.advance_to(249)
    assert kernel.clock.now_ns == 250


BAD_DELTAS: list[Any] = [
    -1,
    -(2**70),
    1.0,
    0.5,
    float("nan"),
    True,
    False,
    "10",
    None,
    b"\x01",
    10**30,
    MAX_NS + 1,
]


@pytest.mark.parametrize("delta", BAD_DELTAS, ids=[repr(d) for d in BAD_DELTAS])
def test_bad_delta_is_a_clock_error_and_changes_nothing(kernel: Kernel, ticks: Ticks, delta: Any) -> None:
    kernel.clock.advance(10)
    lines = kernel.journal.lines()
    with pytest.raises(ClockError) as info:
        kernel.clock.advance(delta)
    assert isinstance(info.value, InvalidArgument)
    assert "clock" in info.value.thing
    assert kernel.clock.now_ns == 10
    assert kernel.journal.lines() == lines
    assert ticks.ticks == [10]


def test_advance_up_to_the_limit(kernel: Kernel) -> None:
    kernel.clock.advance(MAX_NS - 5)
    with pytest.raises(ClockError):
        kernel.clock.advance(6)
    assert kernel.clock.advance(5) == MAX_NS
    assert kernel.clock.now_ns == MAX_NS


def test_failing_tick_rolls_the_time_back(kernel: Kernel, ticks: Ticks) -> None:
    kernel.clock.advance(100)
    ticks.fail_at = {300}
    lines = kernel.journal.lines()
    with pytest.raises(HookFailed) as info:
        kernel.clock.advance(200)
    assert info.value.operation == "clock.advance"
    assert kernel.clock.now_ns == 100
    new = kernel.journal.events[len(lines) :]
    assert [(e.kind, e.time_ns) for e in new] == [("op.failed", 100)]  # journaled at the old time
    assert kernel.clock.advance(50) == 150  # and the clock carries on from there
    kernel.check_invariants()


def test_clock_rolls_back_with_an_outer_operation(tmp_path: Path) -> None:
    class AdvancesThenFails:
        @hookimpl
        def vmk_vm_launch(self, kernel: Kernel) -> None:
            kernel.clock.advance(1_000)  # boot takes a microsecond of simulated time
            raise RuntimeError("boot failed")

    with Kernel(plugins=[AdvancesThenFails()], autoload=False, data_dir=tmp_path / "k") as k:
        vm = k.create_vm("web")
        with pytest.raises(HookFailed):
            k.launch_vm(vm)
        assert k.clock.now_ns == 0
        assert k.journal.of_kind("clock.advance") == []
        k.check_invariants()


@settings()
@given(deltas=st.lists(st.integers(0, 10**12), max_size=30), failing=st.sets(st.integers(0, 29)))
def test_time_is_the_sum_of_successful_advances(
    tmp_path_factory: Any, deltas: list[int], failing: set[int]
) -> None:
    plugin = Ticks()
    with Kernel(plugins=[plugin], autoload=False, data_dir=tmp_path_factory.mktemp("k")) as k:
        expected = 0
        for i, delta in enumerate(deltas):
            plugin.fail_at = {expected + delta} if i in failing else set()
            if i in failing:
                with pytest.raises(HookFailed):
                    k.clock.advance(delta)
            else:
                k.clock.advance(delta)
                expected += delta
            assert k.clock.now_ns == expected
        assert len(k.journal.of_kind("clock.advance")) == len(deltas) - len(failing & set(range(len(deltas))))
        k.check_invariants()
