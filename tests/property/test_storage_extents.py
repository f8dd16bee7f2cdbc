"""The extent index of a storage volume against a block-by-block model."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from vmk_storage.extents import Extent, ExtentMap, changed_runs, gone_runs
from vmk_storage.format import BLOCK

Model = dict[int, tuple[int, int, int]]  # block -> (image position, crc, seq)

ops_st = st.lists(
    st.tuples(st.sampled_from(["put", "put", "put", "trim", "snap"]), st.integers(0, 40), st.integers(1, 12)),
    max_size=40,
)


def expand(emap: ExtentMap) -> Model:
    out: Model = {}
    last_end = -1
    for ext in emap:
        assert ext.count > 0 and ext.start >= last_end, "extents overlap or are unsorted"
        assert len(ext.crcs) == 4 * ext.count
        last_end = ext.end
        for i in range(ext.count):
            out[ext.start + i] = (ext.pos + i * BLOCK, ext.crc_at(ext.start + i), ext.seq)
    return out


def apply_ops(ops: list[tuple[str, int, int]]) -> tuple[ExtentMap, Model, list[tuple[ExtentMap, Model]]]:
    emap, model = ExtentMap(), {}
    frozen: list[tuple[ExtentMap, Model]] = []
    pos = 8192
    for seq, (op, start, count) in enumerate(ops, 1):
        if op == "put":
            crcs = [(seq * 1000 + i) & 0xFFFFFFFF for i in range(count)]
            emap.put(Extent(start, count, pos, struct.pack(f"<{count}I", *crcs), seq))
            for i in range(count):
                model[start + i] = (pos + i * BLOCK, crcs[i], seq)
            pos += count * BLOCK + 100
        elif op == "trim":
            emap.trim(start, count)
            for b in range(start, start + count):
                model.pop(b, None)
        else:
            frozen.append((emap.copy(), dict(model)))
    return emap, model, frozen


@settings(deadline=None)
@given(ops=ops_st, lo=st.integers(0, 60), span=st.integers(0, 30))
def test_index_matches_the_block_model(ops: list[tuple[str, int, int]], lo: int, span: int) -> None:
    emap, model, frozen = apply_ops(ops)
    assert expand(emap) == model
    for snap, snap_model in frozen:  # copies are unaffected by later writes
        assert expand(snap) == snap_model
    assert emap.block_count == len(model)
    assert emap.end_block == (max(model) + 1 if model else 0)
    pieces = emap.lookup(lo, lo + span)
    got = {}
    for piece in pieces:
        assert lo <= piece.start and piece.end <= lo + span
        for i in range(piece.count):
            got[piece.start + i] = (piece.pos + i * BLOCK, piece.crc_at(piece.start + i), piece.seq)
    assert got == {b: e for b, e in model.items() if lo <= b < lo + span}
    for b in range(lo, lo + span):
        at = emap.at(b)
        assert (at is None) == (b not in model)


@settings(deadline=None)
@given(ops=ops_st)
def test_changed_and_gone_runs_describe_the_difference(ops: list[tuple[str, int, int]]) -> None:
    new, new_model, frozen = apply_ops(ops)
    old, old_model = frozen[0] if frozen else (ExtentMap(), {})
    changed = {}
    for piece in changed_runs(old, new):
        for i in range(piece.count):
            changed[piece.start + i] = (piece.pos + i * BLOCK, piece.crc_at(piece.start + i), piece.seq)
    assert changed == {b: e for b, e in new_model.items() if old_model.get(b) != e}
    gone = {b for start, count in gone_runs(old, new) for b in range(start, start + count)}
    assert gone == set(old_model) - set(new_model)
