"""Kernel overheads: a VM lifecycle cycle, journal appends, and the cost of a hook call.

A plain script (not a test): ``python bench/bench_kernel.py``.  Each figure is
the best of several rounds, measured side by side in one run, printed next to
its goal.  The numbers are wall-clock timings of the control plane; nothing
here enters the kernel's simulated time.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import vmkernel
from vmkernel import Kernel, hookimpl

ROUNDS = 5


def best_per_op(fn: Callable[[int], None], n: int) -> float:
    """Seconds per operation: the fastest of ROUNDS rounds of ``fn(n)``."""
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        fn(n)
        best = min(best, (time.perf_counter() - start) / n)
    return best


def kernel(tmp: Path, name: str, plugins: list[Any] | None = None) -> Kernel:
    return Kernel(seed=1, data_dir=tmp / name, plugins=plugins or [], autoload=False)


def bench_vm_cycle(tmp: Path) -> float:
    k = kernel(tmp, "cycle")
    counter = iter(range(10**9))

    def cycle(n: int) -> None:
        for _ in range(n):
            vm = k.create_vm(f"vm-{next(counter)}")
            k.launch_vm(vm)
            k.stop_vm(vm)
            k.destroy_vm(vm)

    per = best_per_op(cycle, 2_000)
    k.close()
    return per


def bench_emit(tmp: Path) -> float:
    k = kernel(tmp, "emit")

    def emit(n: int) -> None:
        for i in range(n):
            k.emit("bench.event", "kernel", i=i, ok=True)

    per = best_per_op(emit, 50_000)
    k.close()
    return per


def bench_digest(tmp: Path) -> float:
    """Lines folded into the hash chain per second (digest is computed lazily, in one batch)."""
    best = float("inf")
    for r in range(ROUNDS):
        k = kernel(tmp, f"digest-{r}")
        for i in range(50_000):
            k.emit("bench.event", "kernel", i=i)
        start = time.perf_counter()
        k.journal.digest()
        best = min(best, (time.perf_counter() - start) / len(k.journal))
        k.close()
    return best


def sample_impl(index: int) -> Any:
    class Sample:
        name = f"sample-{index}"

        @hookimpl
        def vmk_frames_out(self, kernel: Kernel, vm: Any, nic: int, frames: Any) -> None:
            return None

    return Sample()


def bench_hook_call(tmp: Path, implementations: int) -> float:
    k = kernel(tmp, f"hook-{implementations}", [sample_impl(i) for i in range(implementations)])
    vm = k.launch_vm(k.create_vm("web"))
    call = k.hook.vmk_frames_out
    frames = [b"\x00" * 64]

    def run(n: int) -> None:
        for _ in range(n):
            call(kernel=k, vm=vm, nic=0, frames=frames)

    per = best_per_op(run, 50_000)
    k.close()
    return per


def bench_operation(tmp: Path, implementations: int) -> float:
    """A whole kernel operation around the same hook: ``send_frames`` (lookup, checks, rollback scope)."""
    k = kernel(tmp, f"op-{implementations}", [sample_impl(i) for i in range(implementations)])
    vm = k.launch_vm(k.create_vm("web"))
    frames = [b"\x00" * 64]

    def run(n: int) -> None:
        for _ in range(n):
            k.send_frames(vm, frames)

    per = best_per_op(run, 20_000)
    k.close()
    return per


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def main() -> None:
    impl = os.environ.get("VMKERNEL_IMPL", "fast")
    print(f"vmkernel {vmkernel.__version__}, fast paths: {impl}, best of {ROUNDS} rounds")
    with tempfile.TemporaryDirectory(prefix="vmk-bench-") as d:
        tmp = Path(d)
        cycle = bench_vm_cycle(tmp) * 1e6
        print(
            f"VM create/launch/stop/destroy cycle, no plugins: {cycle:8.1f} us/cycle   "
            f"goal <= 50 us   {verdict(cycle <= 50)}"
        )
        emit_rate = 1 / bench_emit(tmp)
        print(
            f"journal appends through kernel.emit:            {emit_rate / 1e3:8.0f} k/s        "
            f"goal >= 200 k/s {verdict(emit_rate >= 200_000)}"
        )
        digest_rate = 1 / bench_digest(tmp)
        print(f"journal digest (hash chain, one batch):         {digest_rate / 1e6:8.2f} M lines/s")
        calls = {n: bench_hook_call(tmp, n) * 1e6 for n in (0, 1, 10)}
        for n, us in calls.items():
            print(f"one hook call, {n:2d} implementations:            {us:8.2f} us")
        print(
            f"  10 implementations vs 0: x{calls[10] / calls[0]:.1f}, vs 1: x{calls[10] / calls[1]:.1f}; "
            f"per extra implementation: {(calls[10] - calls[1]) / 9:.2f} us"
        )
        ops = {n: bench_operation(tmp, n) * 1e6 for n in (0, 1, 10)}
        for n, us in ops.items():
            ratio = us / calls[n]
            print(
                f"one kernel operation around it, {n:2d} impls:    {us:8.2f} us  (x{ratio:.1f} the bare call)"
            )


if __name__ == "__main__":
    main()
