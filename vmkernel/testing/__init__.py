"""The testing kit vmkernel ships for its users.

* :mod:`vmkernel.testing.strategies`: hypothesis strategies for kernel inputs.
* :class:`KernelMachine`: a state machine that drives a kernel through random
  operations and checks every plugin's invariants after every step.
* :mod:`vmkernel.testing.profiles`: the ``dev`` / ``ci`` / ``nightly`` profiles.
* A pytest plugin (registered through ``pytest11``) with ``kernel`` and
  ``make_kernel`` fixtures.
"""

from __future__ import annotations

from vmkernel.testing import profiles, strategies
from vmkernel.testing.machine import KernelMachine
from vmkernel.testing.profiles import load_profile, scaled

__all__ = ["KernelMachine", "load_profile", "profiles", "scaled", "strategies"]
