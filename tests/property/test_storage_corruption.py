"""Random damage to a unit image: never garbage, never anything but a typed error.

A unit is written (volumes, objects, a snapshot, a discard), flushed and
closed cleanly.  Then its image is damaged at random: one flipped bit, several,
a truncation, or bytes appended.  Opening it, reading every volume and object
(current and snapshot) and running ``check`` must each either return exactly
what was acknowledged or raise a ``vmkernel.errors.VmkError``; any other
exception, or different bytes, fails the test.  With exactly one flipped bit
in the part of the image that carries meaning, ``check`` must report a problem.
Local backend: the damage is applied to the file directly.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vmk_storage import UnitStore
from vmk_storage import format as fmt
from vmk_storage.unit import IMAGE

from vmkernel.errors import VmkError
from vmkernel.testing.profiles import scaled

VM = str(uuid.UUID(int=0xC0FFEE, version=4))

writes_st = st.lists(
    st.tuples(
        st.sampled_from(["disk0", "disk1", "memory"]),
        st.integers(0, 20_000),
        st.binary(min_size=1, max_size=9000),
    ),
    min_size=1,
    max_size=6,
)
damage_st = st.one_of(
    st.tuples(
        st.just("flip"),
        st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=4),
    ),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=300)),
)


def build(root: Path, writes: list[tuple[str, int, bytes]]) -> dict[str, bytes]:
    """Write a unit, close it cleanly; returns everything it must read back (the model)."""
    store = UnitStore(root)
    unit = store.create(VM)
    model: dict[str, bytearray] = {}
    half = len(writes) // 2
    for i, (volume, offset, data) in enumerate(writes):
        vol = model.setdefault(volume, bytearray())
        vol.extend(bytes(max(0, offset + len(data) - len(vol))))
        vol[offset : offset + len(data)] = data
        unit.write(volume, offset, data)
        if i == half:
            unit.put_object("meta", b"object payload")
            unit.snapshot("snap")
            snap = {f"snap:{k}": bytes(v) for k, v in model.items()}
    unit.discard(writes[0][0], 0, 4096)
    first = model[writes[0][0]]
    first[0:4096] = bytes(len(first[0:4096]))
    unit.flush()
    store.close()
    out = {k: bytes(v) for k, v in model.items()}
    out.update(snap)
    return out


def read_all(root: Path, model: dict[str, bytes]) -> None:
    """Every read returns the model's bytes or raises a typed error."""
    store = UnitStore(root)
    try:
        unit = store.get(VM)
        for key, want in model.items():
            snapshot, _, volume = key.rpartition(":")
            try:
                got = unit.read(volume, 0, len(want), snapshot=snapshot or None)
            except VmkError:
                continue
            assert got == want, f"{key} returned bytes that were never acknowledged"
        with contextlib.suppress(VmkError):
            assert unit.get_object("meta") == b"object payload"
    except VmkError:
        pass
    finally:
        store.close()


def check_problems(root: Path) -> list:
    store = UnitStore(root)
    try:
        return store.get(VM).check()
    except VmkError as exc:
        return [exc]
    finally:
        store.close()


@settings(
    max_examples=scaled(150),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(writes=writes_st, damage=damage_st)
def test_damaged_images_give_typed_errors_or_acknowledged_bytes(writes, damage):
    root = Path(tempfile.mkdtemp(prefix="vmkcorrupt-"))
    try:
        model = build(root, writes)
        image = root / VM / IMAGE
        raw = bytearray(image.read_bytes())
        meaningful = 0
        kind = damage[0]
        if kind == "flip":
            for where, bit in damage[1]:
                pos = int(where * len(raw))
                raw[pos] ^= 1 << bit
                meaningful += _carries_meaning(bytes(image.read_bytes()), pos)
        elif kind == "truncate":
            del raw[int(damage[1] * len(raw)) :]
        else:
            raw += damage[1]
        image.write_bytes(bytes(raw))
        read_all(root, model)
        problems = check_problems(root)
        if kind == "flip" and len(damage[1]) == 1 and meaningful:
            assert problems, f"a flipped bit at {int(damage[1][0][0] * len(raw))} went unnoticed by check"
        if kind == "truncate":
            assert problems, "a truncated image went unnoticed by check"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _carries_meaning(image: bytes, pos: int) -> bool:
    """Whether byte ``pos`` is covered by a checksum (superblock body or a log record)."""
    if pos < fmt.LOG_START:
        return pos % fmt.SB_SLOT < fmt._SB.size + fmt._SB_CRC.size
    return True  # the log is packed: every byte belongs to a checksummed record
