"""Benchmark of the emulated processor: Rust (vmkernel.fast) and the pure-Python
reference side by side in one run.

Prints: batch translation with TLB hits (goal >= 100 M/s, >= 300x the
reference), cold two-dimensional walks (goal >= 10 M/s), scalar translate from
Python (goal <= 300 ns/call), and a VM-register write + one translation
against a full flush + one translation.

Run: .venv/bin/python bench/bench_processor.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))

from vmk_processor.tables import PageTables, phys_io

from vmkernel import Access, Domain, fast, reference

MiB = 1 << 20


def best(fn: Callable[[], Any], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def host_world(cls: Any, pages: int) -> Any:
    """No hypervisor: ``pages`` 4 KiB pages at 0x7000_0000_0000 -> physical 16 MiB + i*4 KiB."""
    cpu = cls(64 * MiB, False)
    nxt = iter(range(MiB, 16 * MiB, 4096))
    tables = PageTables(*phys_io(cpu), nxt.__next__)
    tables.map_pages(0x7000_0000_0000, 16 * MiB, pages)
    cpu.set_table_root(0, Domain.HYPERVISOR, tables.root)
    return cpu


def guest_world(cls: Any, pages: int, vms: int = 2, isolation: bool = False) -> Any:
    """Hypervisor; each VM maps ``pages`` 4 KiB guest pages with 4 KiB pages in both stages.
    With ``isolation``, VM ``n`` owns its 96 MiB region (tables included)."""
    region = 96 * MiB
    cpu = cls(region * (vms + 1), True, isolation=isolation)
    write, read = phys_io(cpu)
    for vm in range(1, vms + 1):
        base = region * vm
        s2_next = iter(range(base + 80 * MiB, base + region, 4096))
        s2 = PageTables(write, read, s2_next.__next__)
        s2.map_pages(0, base, (80 * MiB) // 4096)
        cpu.set_stage2_root(vm, s2.root)
        g_next = iter(range(64 * MiB, 80 * MiB, 4096))
        s1 = PageTables(
            lambda a, d, base=base: write(base + a, d), lambda a, base=base: read(base + a), g_next.__next__
        )
        s1.map_pages(0x7000_0000_0000, 0, pages)
        cpu.set_table_root(vm, Domain.HYPERVISOR, s1.root)
        if isolation:
            cpu.set_frame_owner(base, region, vm)
    cpu.write_vm_register(1)
    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller inputs")
    args = parser.parse_args()
    n = 1 << (20 if not args.quick else 16)
    rng = np.random.default_rng(1)
    rows: list[tuple[str, str, str, str]] = []

    # 1. Batch translation, TLB hits: 1024 distinct pages (fit in the 4096-entry TLB).
    addrs = (
        np.uint64(0x7000_0000_0000)
        + (rng.integers(0, 1024, n, dtype=np.uint64) << np.uint64(12))
        + rng.integers(0, 4096, n, dtype=np.uint64)
    ).astype(np.uint64)
    out = np.zeros_like(addrs)
    cpu = host_world(fast.Processor, 1024)
    cpu.translate_batch(addrs, Access.READ, out)
    t_fast = best(lambda: cpu.translate_batch(addrs, Access.READ, out)) / n
    ref = host_world(reference.Processor, 1024)
    m = 20_000
    small, small_out = addrs[:m].copy(), np.zeros(m, dtype=np.uint64)
    ref.translate_batch(small, Access.READ, small_out)
    t_ref = best(lambda: ref.translate_batch(small, Access.READ, small_out), 2) / m
    rows.append(
        (
            "batch translate, TLB hits",
            f"{1e-6 / t_fast:,.1f} M/s ({t_fast * 1e9:.2f} ns)",
            f"{1e-6 / t_ref:,.3f} M/s ({t_ref * 1e9:,.0f} ns)",
            f"{t_ref / t_fast:,.0f}x",
        )
    )

    # Same in a guest (two stages; combined entries).
    g = guest_world(fast.Processor, 1024)
    g.translate_batch(addrs, Access.READ, out)
    t_g = best(lambda: g.translate_batch(addrs, Access.READ, out)) / n
    rows.append(("batch translate, TLB hits, guest", f"{1e-6 / t_g:,.1f} M/s ({t_g * 1e9:.2f} ns)", "", ""))

    # 2. Cold two-dimensional walks: every address a distinct page, TLB emptied first.
    pages = 16384
    cold = (np.uint64(0x7000_0000_0000) + (rng.permutation(pages).astype(np.uint64) << np.uint64(12))).astype(
        np.uint64
    )
    cold_out = np.zeros_like(cold)
    g_cold = guest_world(fast.Processor, pages)

    def cold_pass(cpu: Any, src: Any, dst: Any) -> Callable[[], None]:
        def run() -> None:
            cpu.invalidate_all()
            cpu.translate_batch(src, Access.READ, dst)

        return run

    g_cold.reset_stats()
    t_cold = best(cold_pass(g_cold, cold, cold_out)) / pages
    st = g_cold.stats()
    reads = st["table_reads"] / max(st["walks"], 1)
    r_cold = guest_world(reference.Processor, 512)
    k = 512
    t_rcold = (
        best(
            cold_pass(
                r_cold,
                cold[:k].copy() % np.uint64(0x7000_0000_0000 + (512 << 12)) | np.uint64(0x7000_0000_0000),
                np.zeros(k, dtype=np.uint64),
            ),
            2,
        )
        / k
    )
    rows.append(
        (
            f"cold 2D walk ({reads:.0f} reads each)",
            f"{1e-6 / t_cold:,.1f} M/s ({t_cold * 1e9:.0f} ns)",
            f"{1e-6 / t_rcold:,.3f} M/s ({t_rcold * 1e6:,.1f} us)",
            f"{t_rcold / t_cold:,.0f}x",
        )
    )
    h_cold = host_world(fast.Processor, pages)
    t_hcold = best(cold_pass(h_cold, cold, cold_out)) / pages
    rows.append(
        (
            "cold 1D walk (4 reads, no hypervisor)",
            f"{1e-6 / t_hcold:,.1f} M/s ({t_hcold * 1e9:.0f} ns)",
            "",
            "",
        )
    )

    # 3. Scalar translate from Python (TLB hit).
    calls = 200_000 if not args.quick else 20_000
    items = addrs[:calls].tolist()

    def scalar(cpu: Any, items: list[int]) -> Callable[[], None]:
        def run() -> None:
            tr, r = cpu.translate, Access.READ
            for a in items:
                tr(a, r)

        return run

    t_scalar = best(scalar(cpu, items), 3) / calls
    t_rscalar = best(scalar(ref, items[:20_000]), 2) / 20_000
    rows.append(
        (
            "scalar translate() from Python",
            f"{t_scalar * 1e9:.0f} ns/call",
            f"{t_rscalar * 1e9:,.0f} ns/call",
            f"{t_rscalar / t_scalar:,.0f}x",
        )
    )

    # 4. VM switch + one translation vs full flush + one translation (guest, warm entries).
    sw = guest_world(fast.Processor, 1024)
    a = 0x7000_0000_0000 + 0x5123
    for vm in (1, 2):
        sw.write_vm_register(vm)
        sw.translate(a, Access.READ)
    reps = 100_000 if not args.quick else 10_000

    def switch() -> None:
        w, tr, r = sw.write_vm_register, sw.translate, Access.READ
        for _ in range(reps // 2):
            w(1)
            tr(a, r)
            w(2)
            tr(a, r)

    def flush() -> None:
        inv, tr, r = sw.invalidate_all, sw.translate, Access.READ
        for _ in range(reps):
            inv()
            tr(a, r)

    t_switch = best(switch, 3) / reps
    t_flush = best(flush, 3) / reps
    rows.append(("VMR write + translate (no flush)", f"{t_switch * 1e9:.0f} ns", "", ""))
    rows.append(
        (
            "full flush + translate (2D walk)",
            f"{t_flush * 1e9:.0f} ns",
            "",
            f"flush costs {t_flush / t_switch:.1f}x",
        )
    )
    # Batch form: after a switch a 4096-address batch of warm pages vs the same after a flush.
    warm = addrs[:4096].copy() & np.uint64(~0xFFF & (2**64 - 1)) | np.uint64(0x123)
    warm_out = np.zeros_like(warm)
    for vm in (1, 2):
        sw.write_vm_register(vm)
        sw.translate_batch(warm, Access.READ, warm_out)

    def switch_batch() -> None:
        sw.write_vm_register(1 if sw.vm_register == 2 else 2)
        sw.translate_batch(warm, Access.READ, warm_out)

    def flush_batch() -> None:
        sw.invalidate_all()
        sw.translate_batch(warm, Access.READ, warm_out)

    t_sb = best(switch_batch, 20)
    t_fb = best(flush_batch, 20)
    rows.append(("VMR write + 4096-address batch", f"{t_sb * 1e6:.1f} us", "", ""))
    rows.append(("full flush + 4096-address batch", f"{t_fb * 1e6:.1f} us", "", f"{t_fb / t_sb:.1f}x"))

    # Under isolation, another VM receiving frames (a launch) keeps VM 1's entries cached;
    # dropping everything is what an ownership change cost before it was scoped.
    iso = guest_world(fast.Processor, 1024, vms=2, isolation=True)
    iso.translate_batch(warm, Access.READ, warm_out)
    spare = 96 * MiB * 3 - 4096  # the last frame of VM 2's region, outside its tables

    def give_away_batch() -> None:
        iso.set_frame_owner(spare, 4096, 2 if iso.frame_owner(spare) != 2 else 0)
        iso.translate_batch(warm, Access.READ, warm_out)

    def flush_all_batch() -> None:
        iso.set_frame_owner(spare, 4096, 2 if iso.frame_owner(spare) != 2 else 0)
        iso.invalidate_all()
        iso.translate_batch(warm, Access.READ, warm_out)

    t_give = best(give_away_batch, 20)
    t_all = best(flush_all_batch, 20)
    rows.append(("frames to another VM + 4096-address batch", f"{t_give * 1e6:.1f} us", "", ""))
    rows.append(
        (
            "... with the whole TLB dropped (the old rule)",
            f"{t_all * 1e6:.1f} us",
            "",
            f"{t_all / t_give:.1f}x",
        )
    )

    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'Rust (vmkernel.fast)':>28}  {'reference (pure Python)':>26}  ratio")
    for name, f, r, ratio in rows:
        print(f"{name:<{width}}  {f:>28}  {r:>26}  {ratio}")


if __name__ == "__main__":
    main()
