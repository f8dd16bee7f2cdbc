"""Content identity (BLAKE3), discard, and raw/qcow2 import and export of unit volumes.

Run on the local backend and a real qemu-nbd; the qcow2 cases need qemu-img
(Debian's qemu-utils) and skip, saying so, without it.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import blake3
import pytest
from vmk_storage import testing as storage_testing
from vmk_storage.format import BLOCK
from vmk_storage.testing import new_vm_id

from vmkernel.errors import CommingleRefused, DiskImageError, InvalidArgument

make_store = storage_testing.make_store
storage_backend = storage_testing.storage_backend

needs_qemu_img = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img not found: install Debian's qemu-utils"
)


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def sparse_raw(path: Path, size: int, pieces: dict[int, bytes]) -> bytes:
    """A sparse raw image of ``size`` bytes with ``pieces`` written; returns its full bytes."""
    image = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in pieces.items():
            f.seek(off)
            f.write(data)
            image[off : off + len(data)] = data
    return bytes(image)


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True)


def test_content_id_is_blake3_of_the_logical_bytes(make_store):
    unit = make_store().create(new_vm_id())
    assert unit.content_id("disk0") == b3(b"")  # never written: empty
    unit.write("disk0", 3 * BLOCK + 5, b"payload")
    unit.flush()
    logical = bytearray(4 * BLOCK)
    logical[3 * BLOCK + 5 : 3 * BLOCK + 12] = b"payload"
    assert unit.content_id("disk0") == b3(bytes(logical))
    unit.snapshot("s")
    unit.write("disk0", 0, b"x")
    assert unit.content_id("disk0", snapshot="s") == b3(bytes(logical))
    assert unit.content_id("disk0") != b3(bytes(logical))
    unit.put_object("meta", b"m")
    ids = unit.content_ids()
    assert ids["object:meta"] == b3(b"m") and set(ids) == {"disk0", "object:meta"}


def test_clone_has_the_same_content_ids_and_zero_blocks_count(make_store):
    store = make_store()
    unit = store.create(new_vm_id())
    data = random.Random(7).randbytes(5 * BLOCK)
    unit.write("disk0", 0, data)
    unit.write("disk0", 9 * BLOCK, bytes(BLOCK))  # an explicit zero block is written data
    unit.flush()
    clone = unit.clone(new_vm_id())
    assert clone.content_ids() == unit.content_ids()
    assert unit.volumes()["disk0"]["size"] == 10 * BLOCK


def test_discard_reads_zeros_and_is_durable(make_store):
    store = make_store()
    vm = new_vm_id()
    unit = store.create(vm)
    data = random.Random(3).randbytes(8 * BLOCK)
    unit.write("disk0", 0, data)
    unit.flush()
    unit.discard("disk0", BLOCK + 100, 4 * BLOCK)  # partial first and last block, 3 whole blocks
    unit.flush()
    expect = bytearray(data)
    expect[BLOCK + 100 : 5 * BLOCK + 100] = bytes(4 * BLOCK)
    assert unit.read("disk0", 0, 8 * BLOCK) == bytes(expect)
    assert unit.volumes()["disk0"]["blocks"] == 5  # 2, 3, 4 dropped; 1 and 5 rewritten
    assert unit.verify_acknowledged() is None
    store.close()
    again = make_store().get(vm)
    assert again.read("disk0", 0, 8 * BLOCK) == bytes(expect)
    with pytest.raises(InvalidArgument):
        again.discard("disk0", 0, -1)
    again.discard("swap", 0, BLOCK)  # a volume never written: nothing to do


def test_export_raw_is_sparse_and_exact(make_store, tmp_path):
    unit = make_store().create(new_vm_id())
    unit.write("disk1", 2 << 20, b"late data")
    unit.write("disk1", 0, b"boot")
    unit.flush()
    out = tmp_path / "disk1.raw"
    cid = unit.export_volume("disk1", out)
    raw = out.read_bytes()
    assert len(raw) == (2 << 20) + BLOCK
    assert raw[:4] == b"boot" and raw[2 << 20 : (2 << 20) + 9] == b"late data"
    assert cid == b3(raw) == unit.content_id("disk1")
    assert os.stat(out).st_blocks * 512 < 1 << 20  # the 2 MiB gap is a hole
    with pytest.raises(InvalidArgument):
        unit.export_volume("disk1", out)  # exists
    assert unit.export_volume("disk1", out, overwrite=True) == cid
    with pytest.raises(InvalidArgument):
        unit.export_volume("disk1", tmp_path / "x.vmdk", format="vmdk")


@needs_qemu_img
def test_qcow2_round_trip_through_qemu_img(make_store, tmp_path):
    rng = random.Random(11)
    raw = tmp_path / "src.raw"
    size = 8 << 20
    image = sparse_raw(
        raw, size, {1 << 20: rng.randbytes(70_000), size - 100: b"end" * 33, 5 << 20: bytes(BLOCK)}
    )
    qcow = tmp_path / "src.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow))
    unit = make_store().create(new_vm_id())
    unit.write("disk0", 7 << 20, b"old content that the import replaces" * 300)
    unit.flush()
    cid = unit.import_volume("disk0", qcow)
    assert cid == b3(image) == unit.content_id("disk0")
    assert unit.read("disk0", 0, size) == image
    assert unit.volumes()["disk0"]["size"] == size
    out = tmp_path / "out.qcow2"
    assert unit.export_volume("disk0", out, format="qcow2") == cid
    assert qemu_img("compare", str(qcow), str(out)).returncode == 0
    info = qemu_img("info", "--output=json", str(out)).stdout
    assert '"format": "qcow2"' in info


@needs_qemu_img
def test_raw_import_needs_the_format_said(make_store, tmp_path):
    raw = tmp_path / "disk.raw"
    image = sparse_raw(raw, 3 * BLOCK + 512, {BLOCK: b"data"})
    unit = make_store().create(new_vm_id())
    with pytest.raises(DiskImageError) as unknown:
        unit.import_volume("disk0", raw)  # never probed as raw
    assert "format unknown" in str(unknown.value) and unknown.value.offset == 0
    cid = unit.import_volume("disk0", raw, format="raw")
    assert cid == b3(image + bytes(BLOCK - 512))  # rounded up to whole blocks
    assert unit.volumes()["disk0"]["size"] == 4 * BLOCK


@needs_qemu_img
def test_bad_images_are_refused_with_typed_errors(make_store, tmp_path):
    store = make_store()
    unit = store.create(new_vm_id())
    other = store.create(new_vm_id())
    other.write("disk0", 0, b"secret of another VM")
    other.flush()
    raw = tmp_path / "base.raw"
    sparse_raw(raw, 4 << 20, {0: b"base", 3 << 20: random.Random(1).randbytes(200_000)})
    base = tmp_path / "base.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(base))
    before = unit.content_ids()

    overlay = tmp_path / "overlay.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(overlay))
    with pytest.raises(DiskImageError, match="backing file"):
        unit.import_volume("disk0", overlay)

    truncated = tmp_path / "truncated.qcow2"
    truncated.write_bytes(base.read_bytes()[: base.stat().st_size - 65536])
    with pytest.raises(DiskImageError):
        unit.import_volume("disk0", truncated)

    marked = tmp_path / "marked.qcow2"
    header = bytearray(base.read_bytes())
    (incompat,) = struct.unpack_from(">Q", header, 72)
    struct.pack_into(">Q", header, 72, incompat | 2)  # the "corrupt" bit
    marked.write_bytes(bytes(header))
    with pytest.raises(DiskImageError):
        unit.import_volume("disk0", marked)

    bad_magic = tmp_path / "bad_magic.qcow2"
    bad_magic.write_bytes(b"QFI\x00" + base.read_bytes()[4:])
    with pytest.raises(DiskImageError, match="qcow2 magic"):
        unit.import_volume("disk0", bad_magic, format="qcow2")

    with pytest.raises(DiskImageError, match="unit image"):
        unit.import_volume("disk0", unit.image_path, format="raw")
    with pytest.raises(CommingleRefused):
        unit.import_volume("disk0", other.image_path, format="raw")
    with pytest.raises(DiskImageError, match="cannot be read"):
        unit.import_volume("disk0", tmp_path / "missing.qcow2")
    with pytest.raises(InvalidArgument):
        unit.import_volume("disk0", base, format="vmdk")
    with pytest.raises(InvalidArgument):
        unit.import_volume("../disk0", base)
    assert unit.content_ids() == before  # nothing reached the unit
    assert other.read("disk0", 0, 20) == b"secret of another VM"


def test_export_and_streaming_arguments_are_typed(make_store, tmp_path):
    unit = make_store().create(new_vm_id())
    unit.write("disk0", 0, b"x")
    for fmt_name in ("raw", "qcow2"):
        with pytest.raises(InvalidArgument) as err:
            unit.export_volume("disk0", tmp_path / "missing-dir" / "out.img", format=fmt_name)
        assert err.value.thing == "export destination"
    for chunk in (0, -1, 1 << 20, True):
        with pytest.raises(InvalidArgument) as err:
            list(unit.iter_volume("disk0", chunk=chunk))
        assert (err.value.thing, err.value.value) == ("chunk", chunk)
