"""Small value types that plugins return from hooks."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["Decision", "Effect", "Invariant", "ReportSection"]


class Effect(enum.Enum):
    """The outcome of an authorization decision."""

    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class Decision:
    """One plugin's answer to ``vmk_authorize``.

    ``source`` names the policy (and revision) that produced it so that a
    denial can always be explained.
    """

    effect: Effect
    reason: str = ""
    source: str = ""

    @classmethod
    def allow(cls, reason: str = "", source: str = "") -> Decision:
        return cls(Effect.ALLOW, reason, source)

    @classmethod
    def deny(cls, reason: str, source: str = "") -> Decision:
        return cls(Effect.DENY, reason, source)


@dataclass(frozen=True, slots=True)
class Invariant:
    """A named check: ``check()`` returns ``None`` when it holds, else a description."""

    name: str
    check: Callable[[], str | None]


@dataclass(frozen=True, slots=True)
class ReportSection:
    """A titled block of lines for ``vmkernel status`` and the demo report."""

    title: str
    lines: Sequence[str] = field(default_factory=tuple)
