"""Random damage to a unit image: never garbage, never anything but a typed error.

A unit is written (volumes, objects, a snapshot, a discard), flushed and
closed cleanly.  Then its image is damaged at random: one flipped bit, several,
a truncation, or bytes appended.  Opening it, reading every volume and object
(current and snapshot) and running ``check`` must each either raise a
``vmkernel.errors.VmkError`` or return what was acknowledged: exactly, for one
fault; for several at once (say the newest superblock and a record of the
last flush), possibly an earlier state the log went through, as after a crash
in that flush, but never other bytes.  Any other exception fails the test.  With exactly one flipped bit
in the part of the image that carries meaning, ``check`` must report a problem.
Local backend: the damage is applied to the file directly.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
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


Volumes = dict[str, bytes]


def build(root: Path, writes: list[tuple[str, int, bytes]]) -> tuple[list[Volumes], Volumes]:
    """Write a unit, close it cleanly.  Returns the volumes after each change (the states a
    prefix of the log holds; the last one is what was acknowledged) and the snapshot's volumes."""
    store = UnitStore(root)
    unit = store.create(VM)
    model: dict[str, bytearray] = {}
    states: list[Volumes] = [{}]
    snap: Volumes = {}
    half = len(writes) // 2
    for i, (volume, offset, data) in enumerate(writes):
        vol = model.setdefault(volume, bytearray())
        vol.extend(bytes(max(0, offset + len(data) - len(vol))))
        vol[offset : offset + len(data)] = data
        unit.write(volume, offset, data)  # one record: a prefix holds all of it or none
        states.append({k: bytes(v) for k, v in model.items()})
        if i == half:
            unit.put_object("meta", b"object payload")
            unit.snapshot("snap")
            snap = dict(states[-1])
    unit.discard(writes[0][0], 0, 4096)  # one trim record
    first = model[writes[0][0]]
    first[0:4096] = bytes(len(first[0:4096]))
    states.append({k: bytes(v) for k, v in model.items()})
    unit.flush()
    store.close()
    return states, snap


def read_all(root: Path, states: list[Volumes], snap: Volumes, exact: bool) -> None:
    """Reads raise typed errors or return acknowledged bytes.

    ``exact``: the current volumes are the acknowledged ones.  Otherwise (several
    faults at once, e.g. the newest superblock and a record both damaged) they may
    be an earlier state the log went through, never a mix of states or other bytes.
    """
    final = states[-1]
    store = UnitStore(root)
    try:
        unit = store.get(VM)
        got: Volumes = {}
        for volume, want in final.items():
            with contextlib.suppress(VmkError):
                got[volume] = bytes(unit.read(volume, 0, len(want)))
        candidates = [final] if exact else states
        assert any(
            all(
                data == st_.get(v, b"").ljust(len(final[v]), b"\0")[: len(final[v])]
                for v, data in got.items()
            )
            for st_ in candidates
        ), f"volumes {sorted(got)} hold bytes of no acknowledged or intermediate state"
        for volume, want in snap.items():
            with contextlib.suppress(VmkError):
                assert unit.read(volume, 0, len(want), snapshot="snap") == want, f"snapshot {volume}"
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
# Two faults: the newest superblock and the last record; the unit falls back to an earlier state.
@example(writes=[("disk0", 0, b"\x01"), ("disk0", 0, b"\x00")], damage=("flip", [(0.75, 0), (0.25, 0)]))
def test_damaged_images_give_typed_errors_or_acknowledged_bytes(writes, damage):
    root = Path(tempfile.mkdtemp(prefix="vmkcorrupt-"))
    try:
        states, snap = build(root, writes)
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
        single_flip = kind == "flip" and len(damage[1]) == 1
        read_all(root, states, snap, exact=single_flip or kind == "append")
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
