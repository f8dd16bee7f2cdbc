"""Hypothesis profiles shared by vmkernel's own tests and by plugin authors' tests.

``dev`` is fast for the edit-test loop, ``ci`` runs many more examples with no
deadline (shared CI machines are noisy), ``nightly`` is a long hunt run by
hand.  The profile is chosen by ``VMKERNEL_HYPOTHESIS_PROFILE``; without it,
``ci`` when the ``CI`` environment variable is set, else ``dev``.  Tests that
need a count of their own (a state machine, a differential test with a
target of N examples) use :func:`scaled`.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

from vmkernel.errors import InvalidArgument

__all__ = ["PROFILES", "PROFILE_ENV", "active_profile", "load_profile", "scaled"]

PROFILE_ENV = "VMKERNEL_HYPOTHESIS_PROFILE"
PROFILES = ("dev", "ci", "nightly")
_FACTOR = {"dev": 0.1, "ci": 1.0, "nightly": 10.0}

settings.register_profile("dev", max_examples=20, deadline=None, stateful_step_count=30)
settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    stateful_step_count=200,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "nightly",
    max_examples=5000,
    deadline=None,
    stateful_step_count=500,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)


def active_profile() -> str:
    """The profile name selected by the environment."""
    chosen = os.environ.get(PROFILE_ENV)
    if chosen is None:
        chosen = "ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "dev"
    if chosen not in PROFILES:
        raise InvalidArgument(PROFILE_ENV, chosen, "one of " + ", ".join(PROFILES))
    return chosen


def load_profile() -> str:
    """Load the selected profile into hypothesis; returns its name."""
    name = active_profile()
    settings.load_profile(name)
    return name


def scaled(ci_count: int, *, minimum: int = 1) -> int:
    """``ci_count`` for the ``ci`` profile, a tenth for ``dev``, ten times for ``nightly``."""
    return max(minimum, int(ci_count * _FACTOR[active_profile()]))
