"""Storage unit throughput, measured side by side in one run.

Prints, on the same file system:
  * durable sequential writes through a unit (write + flush per chunk) against raw
    ``pwrite`` + ``fdatasync`` of the same chunks (goal: >= 75 % of raw);
  * 4 KiB durable writes (latency) through a unit against raw;
  * reads from the page cache through a unit (every block's crc32c verified) against raw ``pread``
    (goal: >= 1 GB/s);
  * the NBD backend (qemu-nbd on a unix socket) against the local backend (the client that
    ``vmkernel.implementation()`` selects: Rust unless VMKERNEL_IMPL=reference), and the bare Rust
    NBD client against the pure-Python reference client on one export;
  * content ids (BLAKE3), the Rust crc32c tables against the reference, qcow2 export and import.

Usage: python bench/bench_storage.py [--mib 128] [--rounds 3] [--dir PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from vmk_storage import NbdBackend, UnitStore, images, qemu_nbd_path
from vmk_storage.nbd import NbdServer

import vmkernel
import vmkernel.fast
import vmkernel.reference


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def raw_durable(path: Path, chunk: bytes, count: int) -> float:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        t = time.perf_counter()
        for i in range(count):
            os.pwrite(fd, chunk, i * len(chunk))
            os.fdatasync(fd)
        return time.perf_counter() - t
    finally:
        os.close(fd)


def raw_read(path: Path, size: int, nbytes: int) -> float:
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(size)
    total = os.fstat(fd).st_size

    def run() -> None:
        for off in range(0, total - size + 1, size):
            os.preadv(fd, [buf], off)

    try:
        return best(run) * nbytes / (total - total % size)
    finally:
        os.close(fd)


def unit_durable(store: UnitStore, chunk: bytes, count: int) -> tuple[float, object]:
    unit = store.create(str(uuid.uuid4()))
    unit.write("disk0", 0, b"warm")  # open for writing before the clock starts
    unit.flush()
    t = time.perf_counter()
    for i in range(count):
        unit.write("disk0", i * len(chunk), chunk)
        unit.flush()
    return time.perf_counter() - t, unit


def unit_read(unit, size: int, total: int) -> float:
    def run() -> None:
        for off in range(0, total, size):
            unit.read("disk0", off, size)

    run()  # page cache warm
    return best(run)


def bare_nbd_clients(base: Path, total: int, rounds: int) -> list[tuple[str, str]]:
    """Bare writes and reads through the Rust NBD client and the reference on one qemu-nbd export,
    in alternating rounds (medians compared): ``total`` bytes in 4 MiB requests (throughput), and
    4 KiB requests (latency: the per-request cost of each client shows there)."""
    image = base / "bare.raw"
    image.write_bytes(b"")
    os.truncate(image, total)
    server = NbdServer(image, Path(tempfile.mkdtemp(prefix="vmkbn-")) / "bare.sock")
    server.start()
    sizes = {"4 MiB": (4 << 20, total // (4 << 20)), "4 KiB": (4096, 5000)}
    try:
        clients = {
            "Rust": vmkernel.fast.NbdClient(str(server.socket_path)),
            "reference": vmkernel.reference.NbdClient(str(server.socket_path)),
        }
        times: dict[tuple[str, str, str], list[float]] = {}
        for r in range(-1, rounds):  # round -1 fills the export and warms the page cache, unrecorded
            for label, (size, count) in sizes.items():
                chunk = os.urandom(size)
                buf = bytearray(size)
                for name, client in clients.items():
                    t = time.perf_counter()
                    for i in range(count):
                        client.write([chunk], i * size)
                    write_t = time.perf_counter() - t
                    t = time.perf_counter()
                    for i in range(count):
                        client.readinto(buf, i * size)
                    read_t = time.perf_counter() - t
                    if r >= 0:
                        times.setdefault((label, name, "write"), []).append(write_t)
                        times.setdefault((label, name, "read"), []).append(read_t)
        for client in clients.values():
            client.close()
    finally:
        server.stop()
        shutil.rmtree(server.socket_path.parent, ignore_errors=True)
    rows = []
    for label, (size, count) in sizes.items():
        for op in ("read", "write"):
            ref_t = statistics.median(times[label, "reference", op])
            fast_t = statistics.median(times[label, "Rust", op])
            what = f"bare NBD client, {label} {op}s"
            if op == "write":
                what += " (qemu-nbd writeback, no flush)"
            if size >= 1 << 20:
                ref, fast = f"{gbps(size * count, ref_t):.2f} GB/s", f"{gbps(size * count, fast_t):.2f} GB/s"
            else:
                ref, fast = f"{ref_t / count * 1e6:.1f} us", f"{fast_t / count * 1e6:.1f} us"
            rows.append((f"{what}: reference", ref))
            rows.append((f"{what}: Rust", f"{fast} = {ref_t / fast_t:.2f}x the reference"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=128, help="MiB written per measurement")
    ap.add_argument("--rounds", type=int, default=7, help="alternating raw/unit rounds (median reported)")
    ap.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vmkbench-", dir=args.dir))
    total = args.mib << 20
    rows: list[tuple[str, str]] = []
    try:
        print(f"storage bench: {args.mib} MiB per run in {base}")
        # Raw and unit runs alternate, several rounds, medians compared: the disk is shared and noisy.
        for chunk_size in (1 << 20, 4 << 20):
            chunk = os.urandom(chunk_size)
            count = total // chunk_size
            raw_ts, unit_ts = [], []
            for r in range(-1, args.rounds):  # round -1 warms the disk and the allocator up, unrecorded
                raw_t = raw_durable(base / "raw.bin", chunk, count)
                store = UnitStore(base / f"local-{chunk_size}-{r}")
                unit_t = unit_durable(store, chunk, count)[0]
                store.close()
                shutil.rmtree(base / f"local-{chunk_size}-{r}")
                if r < 0:
                    continue
                raw_ts.append(raw_t)
                unit_ts.append(unit_t)
            raw_t, unit_t = statistics.median(raw_ts), statistics.median(unit_ts)
            rows.append(
                (
                    f"durable seq write {chunk_size >> 20} MiB chunks: raw write+fdatasync",
                    f"{gbps(total, raw_t):.3f} GB/s",
                )
            )
            rows.append(
                (
                    f"durable seq write {chunk_size >> 20} MiB chunks: unit (local)",
                    f"{gbps(total, unit_t):.3f} GB/s = {raw_t / unit_t:.0%} of raw",
                )
            )

        small = os.urandom(4096)
        n = 300
        raw_ts, unit_ts, ordered_ts = [], [], []
        for r in range(args.rounds):
            raw_ts.append(raw_durable(base / "raw4k.bin", small, n))
            store = UnitStore(base / f"local-4k-{r}")
            unit_ts.append(unit_durable(store, small, n)[0])
            store.close()
            store = UnitStore(base / f"ordered-4k-{r}", sync="ordered")
            ordered_ts.append(unit_durable(store, small, n)[0])
            store.close()
        rows.append(
            ("4 KiB durable write: raw write+fdatasync", f"{statistics.median(raw_ts) / n * 1e3:.2f} ms")
        )
        rows.append(
            ("4 KiB durable write: unit, sync=single", f"{statistics.median(unit_ts) / n * 1e3:.2f} ms")
        )
        rows.append(
            ("4 KiB durable write: unit, sync=ordered", f"{statistics.median(ordered_ts) / n * 1e3:.2f} ms")
        )

        # Page-cache reads of a volume written in 4 MiB extents.
        chunk = os.urandom(4 << 20)
        store = UnitStore(base / "local-read")
        _, unit = unit_durable(store, chunk, total // len(chunk))
        for size in (1 << 20, 4 << 20):
            t = unit_read(unit, size, total)
            rows.append(
                (
                    f"page-cache read {size >> 20} MiB requests: unit (local, crc32c verified)",
                    f"{gbps(total, t):.2f} GB/s",
                )
            )
        raw_t = raw_read(unit.image_path, 4 << 20, total)
        rows.append(
            ("page-cache read 4 MiB requests: raw pread of the image", f"{gbps(total, raw_t):.2f} GB/s")
        )
        cid_t = best(lambda: unit.content_id("disk0"))
        rows.append(("content id (BLAKE3 of the volume, blocks verified)", f"{gbps(total, cid_t):.2f} GB/s"))
        store.close()

        # The per-block checksum table of one 1 MiB record: Rust against the reference.
        record = os.urandom(1 << 20)
        n = 64
        fast_t = best(lambda: [vmkernel.fast.crc32c_blocks(record) for _ in range(n)])
        ref_t = best(lambda: [vmkernel.reference.crc32c_blocks(record) for _ in range(n)])
        rows.append(("crc32c table of 1 MiB records: reference", f"{gbps(n << 20, ref_t):.2f} GB/s"))
        rows.append(
            (
                "crc32c table of 1 MiB records: Rust",
                f"{gbps(n << 20, fast_t):.2f} GB/s = {ref_t / fast_t:.1f}x the reference",
            )
        )

        if images.qemu_img_path() is not None:
            store = UnitStore(base / "images")
            unit = store.create(str(uuid.uuid4()))
            for off in range(0, total, 4 << 20):
                unit.write("disk0", off, os.urandom(4 << 20))
            unit.flush()
            qcow = base / "disk0.qcow2"
            t = time.perf_counter()
            unit.export_volume("disk0", qcow, format="qcow2")
            export_t = time.perf_counter() - t
            t = time.perf_counter()
            unit.import_volume("disk1", qcow)
            import_t = time.perf_counter() - t
            rows.append(("export to qcow2 (qemu-img convert)", f"{gbps(total, export_t):.2f} GB/s"))
            rows.append(("import from qcow2 (checked, verified)", f"{gbps(total, import_t):.2f} GB/s"))
            store.close()

        if qemu_nbd_path() is None:
            rows.append(("NBD backend", "skipped: qemu-nbd not installed"))
        else:
            nbd = UnitStore(base / "nbd", NbdBackend(capacity=total + (64 << 20)))
            client = "Rust" if vmkernel.implementation() is vmkernel.fast else "reference"
            chunk = os.urandom(4 << 20)
            local = UnitStore(base / "local-cmp")
            local_t, local_unit = unit_durable(local, chunk, total // len(chunk))
            nbd_t, nbd_unit = unit_durable(nbd, chunk, total // len(chunk))
            rows.append(("durable seq write 4 MiB chunks: unit (local)", f"{gbps(total, local_t):.3f} GB/s"))
            rows.append(
                (
                    f"durable seq write 4 MiB chunks: unit (NBD, qemu-nbd, {client} client)",
                    f"{gbps(total, nbd_t):.3f} GB/s = {local_t / nbd_t:.0%} of local",
                )
            )
            lr = unit_read(local_unit, 4 << 20, total)
            nr = unit_read(nbd_unit, 4 << 20, total)
            rows.append(("read 4 MiB requests: unit (local)", f"{gbps(total, lr):.2f} GB/s"))
            rows.append(
                (
                    f"read 4 MiB requests: unit (NBD, {client} client)",
                    f"{gbps(total, nr):.2f} GB/s = {lr / nr:.0%} of local",
                )
            )
            nbd.close()
            local.close()
            rows.extend(bare_nbd_clients(base, total, args.rounds))
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
