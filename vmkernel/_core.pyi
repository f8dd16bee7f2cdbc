# Hand-written stub of the Rust extension vmkernel._core (rust_core/vmk-py).
# Checked by: .venv/bin/python -m mypy.stubtest vmkernel._core
# Append one section per wrapped vmk-core module; keep it in step with the
# reference model of the same name in vmkernel/reference/.

from typing import final

from typing_extensions import Buffer

# The extension sets __all__ (PyO3 does); add each new class here too.
__all__ = [
    "JournalChain",
]

# --- journal_chain ----------------------------------------------------------

@final
class JournalChain:
    """Tamper-evident hash chain over journal lines:
    ``head' = sha256(head || u64-LE len(line) || line)``."""

    def __new__(cls, genesis: Buffer | None = None) -> JournalChain: ...
    @property
    def head(self) -> bytes: ...
    @property
    def count(self) -> int: ...
    def update(self, line: Buffer) -> bytes: ...
    def update_batch(self, buffer: Buffer, offsets: Buffer, lengths: Buffer) -> bytes: ...
    def copy(self) -> JournalChain: ...
