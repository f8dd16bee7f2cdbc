"""The kernel's simulated clock.

Time is an integer count of nanoseconds that only moves when someone calls
``advance``; nothing inside the kernel reads the wall clock, which is what
makes a run reproducible from its seed.
"""

from __future__ import annotations

from collections.abc import Callable

from vmkernel.errors import ClockError

__all__ = ["Clock"]

_MAX_NS = 2**63 - 1


class Clock:
    """Integer-nanosecond simulated time.

    ``advance`` calls the kernel back so that the tick hook runs inside an
    operation: if a tick handler fails, the clock keeps its old value.
    Without a kernel (``on_advance=None``) it is a plain counter.
    """

    __slots__ = ("_now_ns", "_on_advance")

    def __init__(self, on_advance: Callable[[int, int], None] | None = None) -> None:
        self._now_ns = 0
        self._on_advance = on_advance

    @property
    def now_ns(self) -> int:
        """The current simulated time in nanoseconds since the kernel started."""
        return self._now_ns

    def advance(self, delta_ns: int) -> int:
        """Move the clock forward by ``delta_ns`` (an ``int`` >= 0) and fire ``vmk_tick``.

        Returns the new time.  A negative or non-integer delta raises
        :class:`ClockError` and leaves the clock unchanged.
        """
        if isinstance(delta_ns, bool) or not isinstance(delta_ns, int):
            raise ClockError("clock delta_ns", delta_ns, "an int number of nanoseconds")
        if delta_ns < 0:
            raise ClockError("clock delta_ns", delta_ns, "a non-negative number of nanoseconds")
        target = self._now_ns + delta_ns
        if target > _MAX_NS:
            raise ClockError("clock time", target, f"at most {_MAX_NS} ns")
        if self._on_advance is None:
            self._now_ns = target
        else:
            # The kernel moves the time inside an operation (via _set) so that a
            # failing tick handler rolls the time back with everything else.
            self._on_advance(self._now_ns, target)
        return target

    def _set(self, now_ns: int) -> None:
        self._now_ns = now_ns

    def advance_to(self, when_ns: int) -> int:
        """Move the clock to the absolute time ``when_ns``; it must not be in the past."""
        if isinstance(when_ns, bool) or not isinstance(when_ns, int):
            raise ClockError("clock time", when_ns, "an int number of nanoseconds")
        if when_ns < self._now_ns:
            raise ClockError("clock time", when_ns, f"a time >= the current {self._now_ns} ns")
        return self.advance(when_ns - self._now_ns)

    def __repr__(self) -> str:
        return f"Clock(now_ns={self._now_ns})"
