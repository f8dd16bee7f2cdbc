"""Pure-Python reference models of the Rust fast paths.

Convention: :mod:`vmkernel.fast` and :mod:`vmkernel.reference` export the same
names with identical APIs and errors; the reference is the readable definition
and the differential tests hold the Rust versions to it.  Add one import line
and one ``__all__`` entry per model.
"""

from vmkernel.reference.blockcrc import crc32c_blocks, crc32c_first_mismatch
from vmkernel.reference.journal_chain import JournalChain
from vmkernel.reference.nbd import NbdClient
from vmkernel.reference.prefilter import Prefilter, PrefilterDecision
from vmkernel.reference.processor import Processor
from vmkernel.reference.rulevm import Determination, RuleEngine

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
