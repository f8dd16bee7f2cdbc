"""Throughput of the journal hash chain: reference vs Rust, scalar vs batch.

A plain script, not a test: ``python bench/bench_journal_chain.py [LINES]``.
All variants run side by side in one process on the same data and must
agree on the final head.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np

import vmkernel.fast
import vmkernel.reference


def build(count: int, seed: int = 7) -> tuple[bytes, np.ndarray, np.ndarray, list[bytes]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(60, 201, size=count, dtype=np.uint64)
    offsets = np.zeros(count, dtype=np.uint64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    buffer = rng.integers(32, 127, size=int(lengths.sum()), dtype=np.uint8).tobytes()
    lines = [buffer[int(o) : int(o + n)] for o, n in zip(offsets, lengths, strict=True)]
    return buffer, offsets, lengths, lines


def best_of(repeats: int, run: Callable[[], bytes]) -> tuple[float, bytes]:
    best, head = float("inf"), b""
    for _ in range(repeats):
        start = time.perf_counter()
        head = run()
        best = min(best, time.perf_counter() - start)
    return best, head


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    buffer, offsets, lengths, lines = build(count)
    megabytes = len(buffer) / 1e6

    def scalar(module: object) -> Callable[[], bytes]:
        def run() -> bytes:
            chain = module.JournalChain()  # type: ignore[attr-defined]
            update = chain.update
            for line in lines:
                update(line)
            return bytes(chain.head)

        return run

    def batch(module: object) -> Callable[[], bytes]:
        def run() -> bytes:
            return bytes(module.JournalChain().update_batch(buffer, offsets, lengths))  # type: ignore[attr-defined]

        return run

    variants = {
        "reference scalar": scalar(vmkernel.reference),
        "reference batch": batch(vmkernel.reference),
        "fast scalar": scalar(vmkernel.fast),
        "fast batch": batch(vmkernel.fast),
    }
    print(f"{count} lines, {megabytes:.1f} MB (60-200 bytes each), best of 3")
    times: dict[str, float] = {}
    heads = set()
    for name, run in variants.items():
        seconds, head = best_of(3, run)
        times[name] = seconds
        heads.add(head)
        print(f"  {name:17s} {count / seconds:12,.0f} lines/s {megabytes / seconds:9.1f} MB/s")
    if len(heads) != 1:
        raise SystemExit("the variants disagree on the final head")
    base = times["reference scalar"]
    print("ratios vs reference scalar:")
    for name, seconds in times.items():
        print(f"  {name:17s} x{base / seconds:.1f}")
    print(f"fast batch vs fast scalar: x{times['fast scalar'] / times['fast batch']:.1f}")


if __name__ == "__main__":
    main()
