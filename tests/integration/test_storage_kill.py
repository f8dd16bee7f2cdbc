"""kill -9 durability: a child process writes and flushes, the parent SIGKILLs it at a random
moment, reopens the unit and checks every acknowledged write and every returned byte.

The child's operations are a pure function of (seed, op number), so the parent can rebuild
exactly what was acknowledged (the child reports each flush on a pipe) and what might have
been written after it.  Each block must read back as its value at the last acknowledgement
or as a value a later operation gave it: never anything else.  Trials run one after the
other on the same unit, so every child also recovers from the previous kill.

Trials: ``VMK_STORAGE_KILL_TRIALS``, else 200 under CI (``CI`` set) and 30 otherwise;
the slow-marked test runs 1000.
"""

from __future__ import annotations

import os
import random
import select
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest
from vmk_storage import NbdBackend, UnitStore
from vmk_storage import testing as storage_testing
from vmk_storage.format import BLOCK
from vmk_storage.testing import new_vm_id

from vmkernel.errors import VmkError

SPAN = 48 * BLOCK  # each volume's region the workload touches
VOLUMES = ("disk0", "memory")
OPS_PER_CHILD = 400

# Fixtures shared by the storage suites (storage_backend runs each test on local and NBD).
storage_backend = storage_testing.storage_backend


def default_trials() -> int:
    if "VMK_STORAGE_KILL_TRIALS" in os.environ:
        return int(os.environ["VMK_STORAGE_KILL_TRIALS"])
    return 200 if os.environ.get("CI", "").lower() in ("1", "true", "yes") else 30


def op(seed: int, i: int) -> tuple:
    rng = random.Random(seed * 1_000_003 + i)
    r = rng.random()
    if r < 0.22:
        return ("flush",)
    if r < 0.24:
        return ("compact",)
    if r < 0.28:
        return ("object", f"value-{i}".encode())
    volume = rng.choice(VOLUMES)
    length = rng.choice([1, 17, 600, BLOCK, BLOCK + 1, 3 * BLOCK - 5, 5 * BLOCK])
    offset = rng.randrange(0, SPAN - length)
    if rng.random() < 0.5:
        offset -= offset % BLOCK
    return ("write", volume, offset, rng.randbytes(length))


def make_store(root: Path, kind: str, runtime: Path, sync: str = "single") -> UnitStore:
    return UnitStore(root, NbdBackend(runtime, capacity=256 << 20) if kind == "nbd" else "local", sync=sync)


def child(root: Path, kind: str, runtime: Path, vm: str, seed: int, first: int, wfd: int, sync: str) -> None:
    try:
        store = make_store(root, kind, runtime, sync)
        unit = store.get(vm)
        os.write(wfd, b"R\n")
        for i in range(first, first + OPS_PER_CHILD):
            o = op(seed, i)
            if o[0] == "write":
                unit.write(o[1], o[2], o[3])
            elif o[0] == "object":
                unit.put_object("obj", o[1])
            elif o[0] == "compact":
                unit.compact()
            else:
                unit.flush()
                os.write(wfd, f"A {i}\n".encode())
        unit.flush()
        os.write(wfd, f"A {first + OPS_PER_CHILD - 1}\n".encode())
        os._exit(0)
    except BaseException as exc:  # reported to the parent, which fails the test
        os.write(wfd, f"E {type(exc).__name__}: {exc}\n".encode())
        os._exit(3)


def read_state(unit) -> tuple[dict[str, bytes], bytes | None]:
    blocks = {v: bytes(unit.read(v, 0, SPAN)) for v in VOLUMES}
    obj = bytes(unit.get_object("obj")) if "obj" in unit.objects() else None
    return blocks, obj


def run_trials(kind: str, trials: int, tmp_path: Path, sync: str = "single") -> dict[str, int]:
    root = tmp_path / "units"
    runtime = Path(tempfile.mkdtemp(prefix="vmkkill-"))
    parent = make_store(root, kind, runtime)  # owns the qemu-nbd server for the NBD case
    vm = new_vm_id()
    parent.create(vm)
    parent.close_units()
    seed = 12345
    rng = random.Random(seed)
    state, obj = {v: bytes(SPAN) for v in VOLUMES}, None
    stats = {"trials": 0, "killed": 0, "acked_ops": 0, "mid_stream": 0}
    try:
        for trial in range(trials):
            first = trial * OPS_PER_CHILD
            rfd, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(rfd)
                child(root, kind, runtime, vm, seed, first, wfd, sync)
            os.close(wfd)
            # Kill after a random number of acknowledgements (0: possibly during recovery), plus jitter.
            out = b""
            target = rng.randrange(0, 8)
            while out.count(b"\n") < 1 + target:
                ready, _, _ = select.select([rfd], [], [], 60)
                assert ready, "child stalled"
                chunk = os.read(rfd, 4096)
                if not chunk:
                    break  # the child finished its operations
                out += chunk
            time.sleep(rng.uniform(0, 0.004))
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            while chunk := os.read(rfd, 65536):
                out += chunk
            os.close(rfd)
            lines = out.decode().split("\n")
            errors = [line for line in lines if line.startswith("E ")]
            assert not errors, f"trial {trial}: child failed: {errors}"
            acks = [int(line.split()[1]) for line in lines if line.startswith("A ")]
            acked = max(acks) if acks else first - 1
            stats["trials"] += 1
            stats["killed"] += os.WIFSIGNALED(status)
            stats["acked_ops"] += acked - first + 1
            stats["mid_stream"] += bool(acks) and os.WIFSIGNALED(status)

            # What the last acknowledgement vouches for, and every value a later op could leave.
            model = {v: bytearray(state[v]) for v in VOLUMES}
            model_obj = obj
            for i in range(first, acked + 1):
                o = op(seed, i)
                if o[0] == "write":
                    model[o[1]][o[2] : o[2] + len(o[3])] = o[3]
                elif o[0] == "object":
                    model_obj = o[1]
            later: dict[tuple[str, int], set[bytes]] = {}
            later_obj = {model_obj}
            evolving = {v: bytearray(model[v]) for v in VOLUMES}
            for i in range(acked + 1, first + OPS_PER_CHILD):
                o = op(seed, i)
                if o[0] == "write":
                    evolving[o[1]][o[2] : o[2] + len(o[3])] = o[3]
                    for b in range(o[2] // BLOCK, -(-(o[2] + len(o[3])) // BLOCK)):
                        later.setdefault((o[1], b), set()).add(
                            bytes(evolving[o[1]][b * BLOCK : (b + 1) * BLOCK])
                        )
                elif o[0] == "object":
                    later_obj.add(o[1])

            store = make_store(root, kind, runtime)
            unit = store.get(vm)
            try:
                got, got_obj = read_state(unit)
            except VmkError as exc:
                pytest.fail(f"trial {trial}: unit did not open after kill at ack {acked}: {exc}")
            for v in VOLUMES:
                for b in range(SPAN // BLOCK):
                    actual = got[v][b * BLOCK : (b + 1) * BLOCK]
                    if actual == model[v][b * BLOCK : (b + 1) * BLOCK]:
                        continue
                    assert actual in later.get((v, b), set()), (
                        f"trial {trial}: block {b} of {v} lost an acknowledged write (acked op {acked})"
                    )
            assert got_obj in later_obj, f"trial {trial}: object holds {got_obj!r}"
            problems = [p for p in unit.check() if p.kind != "torn-tail"]
            assert problems == [], f"trial {trial}: {problems}"
            state, obj = got, got_obj
            store.close_units()
    finally:
        parent.close()
        NbdBackend(runtime).stop_all()  # servers that killed children started
        shutil.rmtree(runtime, ignore_errors=True)
    return stats


def check_stats(stats: dict[str, int], trials: int) -> None:
    print(f"\nkill -9 trials: {stats}")
    assert stats["trials"] == trials
    # The kills must land while the child works, or the test proves nothing.
    assert stats["mid_stream"] >= trials // 2, stats


def test_kill9_never_loses_acknowledged_writes(storage_backend, tmp_path, record_property):
    trials = default_trials()
    stats = run_trials(storage_backend, trials, tmp_path)
    record_property("kill_trials", stats["trials"])
    check_stats(stats, trials)


def test_kill9_with_ordered_sync(tmp_path, record_property):
    trials = max(10, default_trials() // 4)
    stats = run_trials("local", trials, tmp_path, sync="ordered")
    record_property("kill_trials", stats["trials"])
    check_stats(stats, trials)


@pytest.mark.slow
def test_kill9_many_trials(storage_backend, tmp_path, record_property):
    stats = run_trials(storage_backend, 1000, tmp_path)
    record_property("kill_trials", stats["trials"])
    check_stats(stats, 1000)
