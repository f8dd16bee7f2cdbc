"""The append-only event journal.

Every state change in a kernel is an :class:`Event`.  An event is serialised
to its canonical JSON line (sorted keys, compact, UTF-8) the moment it is
appended: that both validates the data (a plugin cannot slip a non-JSON value
in and break the journal later) and fixes the bytes that determinism is
judged on.  The journal's digest is a SHA-256 hash chain over those lines,
computed lazily in one batch call into the Rust core whenever somebody asks,
so appending stays cheap.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import orjson

from vmkernel._impl import implementation
from vmkernel.errors import InvalidArgument

__all__ = ["Event", "Journal"]


@dataclass(frozen=True, slots=True)
class Event:
    """One journal entry: ``seq`` is its position, ``time_ns`` the simulated time."""

    seq: int
    time_ns: int
    kind: str
    subject: str
    data: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time_ns": self.time_ns,
            "kind": self.kind,
            "subject": self.subject,
            "data": dict(self.data),
        }


def canonical_line(seq: int, time_ns: int, kind: str, subject: str, data_json: bytes) -> bytes:
    """The canonical JSON line of an event (no newline): keys sorted, compact.

    ``data_json`` is the event data already serialised with sorted keys (the
    kernel serialises it when the event is emitted, which validates it).
    """
    return b"".join(
        (
            b'{"data":',
            data_json,
            b',"kind":',
            orjson.dumps(kind),
            b',"seq":',
            str(seq).encode(),
            b',"subject":',
            orjson.dumps(subject),
            b',"time_ns":',
            str(time_ns).encode(),
            b"}",
        )
    )


class Journal:
    """The kernel's committed events, in order.  Append-only: there is no way to remove one."""

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._lines: list[bytes] = []
        chain_cls = implementation().JournalChain
        self._chain = chain_cls()
        self._hashed = 0  # lines already folded into _chain

    # -- appending (the kernel calls this when an operation commits) --------
    def _append(
        self, time_ns: int, kind: str, subject: str, data_json: bytes, data: Mapping[str, Any]
    ) -> Event:
        seq = len(self._events)
        event = Event(seq, time_ns, kind, subject, data)
        self._events.append(event)
        self._lines.append(canonical_line(seq, time_ns, kind, subject, data_json))
        return event

    # -- reading -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._events)

    def __iter__(self) -> Iterator[Event]:
        return iter(self._events)

    def __getitem__(self, index: int) -> Event:
        return self._events[index]

    @property
    def events(self) -> tuple[Event, ...]:
        """A snapshot of every committed event."""
        return tuple(self._events)

    def of_kind(self, prefix: str) -> list[Event]:
        """Events whose kind is ``prefix`` or starts with ``prefix + '.'``."""
        dotted = prefix + "."
        return [e for e in self._events if e.kind == prefix or e.kind.startswith(dotted)]

    def lines(self) -> list[bytes]:
        """The canonical JSON line of every event (no trailing newlines)."""
        return list(self._lines)

    def to_jsonl(self) -> str:
        """The whole journal as JSON Lines text."""
        return "".join(line.decode() + "\n" for line in self._lines)

    def write_jsonl(self, fp: IO[str]) -> int:
        """Write every event as one JSON line to the text file ``fp``; returns the count."""
        if not hasattr(fp, "write"):
            raise InvalidArgument("fp", fp, "a text file object with a write() method")
        for line in self._lines:
            fp.write(line.decode())
            fp.write("\n")
        return len(self._lines)

    def digest(self) -> str:
        """Hex SHA-256 hash-chain head over every canonical line (same journal, same digest)."""
        pending = self._lines[self._hashed :]
        if pending:
            lengths = np.fromiter((len(x) for x in pending), dtype=np.uint64, count=len(pending))
            offsets = np.zeros(len(pending), dtype=np.uint64)
            if len(pending) > 1:
                np.cumsum(lengths[:-1], out=offsets[1:])
            self._chain.update_batch(b"".join(pending), offsets, lengths)
            self._hashed += len(pending)
        return bytes(self._chain.head).hex()

    @staticmethod
    def read_jsonl(fp: IO[str]) -> list[Event]:
        """Parse a JSON Lines journal written by :meth:`write_jsonl`."""
        events = []
        for number, raw in enumerate(fp, start=1):
            if not raw.strip():
                continue
            try:
                obj = orjson.loads(raw)
                events.append(Event(obj["seq"], obj["time_ns"], obj["kind"], obj["subject"], obj["data"]))
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                raise InvalidArgument(
                    f"journal line {number}", raw[:80], f"an event JSON object ({exc})"
                ) from None
        return events
