"""Which implementation of the fast paths the kernel itself uses.

The kernel runs on the Rust core (``vmkernel.fast``).  Setting
``VMKERNEL_IMPL=reference`` switches it to the pure-Python models, which is
how the test suite proves that a whole kernel behaves the same on both.
Plugins with fast paths of their own pick their classes from
``vmkernel.implementation()`` so that they follow the same switch.
"""

from __future__ import annotations

import os
from types import ModuleType

from vmkernel.errors import InvalidArgument

__all__ = ["implementation"]


def implementation() -> ModuleType:
    """The module (``vmkernel.fast`` or ``vmkernel.reference``) selected by ``VMKERNEL_IMPL``."""
    choice = os.environ.get("VMKERNEL_IMPL", "fast")
    if choice == "fast":
        from vmkernel import fast

        return fast
    if choice == "reference":
        from vmkernel import reference

        return reference
    raise InvalidArgument("VMKERNEL_IMPL", choice, "'fast' or 'reference'")
