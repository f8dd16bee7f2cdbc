"""Pre-filter throughput: Rust against the pure-Python reference, side by side in one run.

Prints, for raw Ethernet frames parsed and classified in one ``classify_batch``
call on one core:

* 100 ClassBench-style ACL rules: Mpps (goal >= 5);
* 2,500 ClassBench-style ACL rules: Mpps (goal >= 4);
* the speed-up over the reference on the same frames (goal >= 100x);
* the build time of a 10,000-rule table (goal < 1 s).

Traffic follows ClassBench's trace generator: each packet is drawn to match a
random rule (so lookups end at varied priorities), plus 10 % random headers.
Run: ``.venv/bin/python bench/bench_prefilter.py [--frames N]``.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from vmk_prefilter import build_frame, classbench_acl, matching_header

import vmkernel.fast
import vmkernel.reference


def traffic(rules: str, n: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = random.Random(seed)
    lines = rules.splitlines()
    frames = []
    for _ in range(n):
        if rng.random() < 0.1:
            src = ".".join(str(rng.randrange(256)) for _ in range(4))
            dst = ".".join(str(rng.randrange(256)) for _ in range(4))
            proto, sport, dport = rng.choice((6, 17)), rng.randrange(65536), rng.randrange(65536)
        else:
            src, dst, proto, sport, dport = matching_header(rng.choice(lines), rng)
        frames.append(build_frame(src, dst, proto=proto, sport=sport, dport=dport))
    lengths = np.array([len(f) for f in frames], dtype=np.uint32)
    offsets = np.zeros(n, dtype=np.uint32)
    offsets[1:] = np.cumsum(lengths[:-1])
    return b"".join(frames), offsets, lengths


def best_of(repeats: int, call: Callable[[], Any]) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200_000, help="distinct frames per Rust measurement")
    parser.add_argument(
        "--reference-frames", type=int, default=3_000, help="frames per reference measurement"
    )
    args = parser.parse_args()

    print(f"{'workload':<30}{'rust Mpps':>11}{'reference kpps':>16}{'speed-up':>10}{'goal':>14}")
    for n_rules, goal in ((100, 5.0), (2_500, 4.0)):
        rules = classbench_acl(n_rules, seed=n_rules)
        fast = vmkernel.fast.Prefilter.from_classbench(rules)
        ref = vmkernel.reference.Prefilter.from_classbench(rules)
        buf, offs, lens = traffic(rules, args.frames, seed=7)
        fast.classify_batch(buf, offs, lens)  # warm caches
        t_fast = best_of(5, lambda f=fast, b=buf, o=offs, n=lens: f.classify_batch(b, o, n))
        m = min(args.reference_frames, args.frames)
        ro, rl = offs[:m].copy(), lens[:m].copy()
        t_ref = best_of(2, lambda r=ref, b=buf, o=ro, n=rl: r.classify_batch(b, o, n))
        # Both give the same answers on the frames both classified.
        for a, b in zip(fast.classify_batch(buf, ro, rl), ref.classify_batch(buf, ro, rl), strict=True):
            assert (a == b).all()
        mpps = args.frames / t_fast / 1e6
        ref_kpps = m / t_ref / 1e3
        speedup = (args.frames / t_fast) / (m / t_ref)
        label = f"{n_rules:,} ClassBench ACL rules"
        print(f"{label:<30}{mpps:>11.2f}{ref_kpps:>16.1f}{speedup:>9.0f}x{f'>= {goal} Mpps':>14}")

    rules = classbench_acl(10_000, seed=10_000)
    t_build = best_of(3, lambda: vmkernel.fast.Prefilter.from_classbench(rules))
    t_build_ref = best_of(1, lambda: vmkernel.reference.Prefilter.from_classbench(rules))
    print(
        f"{'10,000-rule table build':<30}{t_build * 1e3:>9.1f}ms{t_build_ref * 1e3:>14.1f}ms"
        f"{t_build_ref / t_build:>9.0f}x{'< 1 s':>14}"
    )
    print("parse + classify on one core, one call per batch; the reference is the linear")
    print("pure-Python definition the Rust tuple-space table is tested against")


if __name__ == "__main__":
    main()
