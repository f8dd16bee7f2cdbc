"""Rust fast paths (the ``vmkernel._core`` extension).

Convention: :mod:`vmkernel.fast` and :mod:`vmkernel.reference` export the same
names with identical APIs and errors; the pure-Python reference defines the
behaviour and the differential tests hold these to it.  Add one import line
and one ``__all__`` entry per fast path.
"""

from vmkernel._core import (
    Determination,
    JournalChain,
    NbdClient,
    Prefilter,
    PrefilterDecision,
    Processor,
    RuleEngine,
    crc32c_blocks,
    crc32c_first_mismatch,
)

__all__ = [
    "Determination",
    "JournalChain",
    "NbdClient",
    "Prefilter",
    "PrefilterDecision",
    "Processor",
    "RuleEngine",
    "crc32c_blocks",
    "crc32c_first_mismatch",
]
