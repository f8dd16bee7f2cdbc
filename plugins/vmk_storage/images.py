"""Disk image files in and out of storage units: raw and qcow2, with content identity.

Design note.  qcow2 images are read and written with ``qemu-img`` (Debian's
qemu-utils), the reference implementation of the format.  qemu-img is
lenient where a lab must not be, so an import checks more than it does:

* the format is never guessed: a file is qcow2 only when it carries the
  qcow2 magic, and raw only when the caller says ``format="raw"`` (qemu-img
  probes a file with a damaged magic as raw);
* ``qemu-img check`` must report no corruption, and every allocated cluster
  must lie inside the file (qemu-img reads a truncated image's missing
  clusters as zeros);
* backing files and external data files are refused: they would pull bytes
  from outside the one image the caller named, possibly another VM's;
* a unit image (ours) is refused too: copying one VM's unit into another is
  what ``clone`` is for, and it restamps.

Only allocated extents are written into the volume (holes stay unwritten,
explicit zeros stay written), and the volume's size is rounded up to whole
4 KiB blocks: its last block is written even when the image leaves it
unallocated, so the volume's content id (BLAKE3 of its logical bytes)
equals ``b3sum`` of the image's raw form when the virtual size is a multiple
of 4 KiB.  The import computes that BLAKE3 while reading the source, flushes,
re-reads the volume and compares: an import that returns has been verified
end to end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import blake3

from vmk_storage import format as fmt
from vmkernel.errors import CommingleRefused, CorruptUnit, DiskImageError, FeatureUnavailable, InvalidArgument

if TYPE_CHECKING:
    from vmk_storage.unit import StorageUnit

QCOW2_MAGIC = b"QFI\xfb"
FORMATS = ("raw", "qcow2")
QEMU_IMG_TIMEOUT = 600.0  # seconds; a stuck qemu-img becomes a typed error, never a hang
_CHUNK = 4 << 20


def qemu_img_path() -> str | None:
    """The ``qemu-img`` executable, or ``None`` when qemu-utils is not installed."""
    return shutil.which("qemu-img")


def _qemu_img(
    args: list[str], path: Path, *, ok_codes: tuple[int, ...] = (0,)
) -> subprocess.CompletedProcess[str]:
    exe = qemu_img_path()
    if exe is None:
        raise FeatureUnavailable("qcow2 images (qemu-img from Debian's qemu-utils)", "storage import/export")
    try:
        done = subprocess.run(
            [exe, *args], capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise DiskImageError(
            str(path),
            None,
            f"qemu-img {args[0]} did not finish",
            f"{QEMU_IMG_TIMEOUT:.0f} s",
            "a prompt answer",
        ) from None
    if done.returncode not in ok_codes:
        raise DiskImageError(
            str(path),
            None,
            f"qemu-img {args[0]} failed",
            done.stderr.strip() or f"exit status {done.returncode}",
            "an image qemu-img can read",
        )
    return done


def _json(done: subprocess.CompletedProcess[str], path: Path, what: str) -> Any:
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        raise DiskImageError(
            str(path), None, f"qemu-img {what} printed no JSON", done.stdout[:200], "JSON"
        ) from None


# ------------------------------------------------------------------ inspect


def detect_format(path: Path, declared: str | None) -> str:
    """The image's format: qcow2 by its magic, raw only when declared; never guessed."""
    if declared is not None and declared not in FORMATS:
        raise InvalidArgument("format", declared, "'raw', 'qcow2' or None (qcow2 detected by its magic)")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        raise DiskImageError(str(path), None, "cannot be read", str(exc), "a readable file") from None
    if head == fmt.SB_MAGIC:
        raise DiskImageError(
            str(path),
            0,
            "is a vmkernel storage unit image",
            "unit magic",
            "a raw or qcow2 disk image (use clone)",
        )
    if declared == "raw":
        return "raw"
    if head[:4] == QCOW2_MAGIC:
        return "qcow2"
    raise DiskImageError(
        str(path),
        0,
        "does not carry the qcow2 magic" if declared == "qcow2" else "format unknown",
        head[:4],
        f"magic {QCOW2_MAGIC!r} (qcow2), or format='raw' for a raw image",
    )


def _raw_extents(path: Path, size: int) -> list[tuple[int, int]]:
    """Allocated ranges of a (possibly sparse) raw file, by SEEK_DATA / SEEK_HOLE."""
    out: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end - start))
            pos = end
    except OSError:
        return [(0, size)] if size else []  # no hole support: everything is data
    finally:
        os.close(fd)
    return out


def inspect_qcow2(path: Path) -> tuple[int, list[tuple[int, int]]]:
    """Virtual size and allocated guest ranges of a qcow2 image, after refusing unsafe ones."""
    info = _json(_qemu_img(["info", "--output=json", "-f", "qcow2", str(path)], path), path, "info")
    size = int(info.get("virtual-size", -1))
    if size < 0:
        raise DiskImageError(str(path), None, "has no virtual size", info, "a qcow2 header with a size")
    if info.get("backing-filename"):
        raise DiskImageError(
            str(path),
            None,
            "has a backing file",
            info["backing-filename"],
            "a self-contained image (qemu-img convert)",
        )
    specific = (info.get("format-specific") or {}).get("data") or {}
    if specific.get("data-file"):
        raise DiskImageError(
            str(path),
            None,
            "keeps its data in an external file",
            specific["data-file"],
            "a self-contained image",
        )
    if specific.get("corrupt"):
        raise DiskImageError(str(path), None, "is marked corrupt in its header", True, "a consistent image")
    # Exit 2: corruptions, 3: leaked clusters only (harmless), 1: check could not complete.
    check = _json(
        _qemu_img(["check", "--output=json", "-f", "qcow2", str(path)], path, ok_codes=(0, 2, 3)),
        path,
        "check",
    )
    if check.get("corruptions", 0) or check.get("check-errors", 0):
        raise DiskImageError(
            str(path),
            None,
            "fails qemu-img check",
            f"{check.get('corruptions', 0)} corruptions, {check.get('check-errors', 0)} check errors",
            "no corruption",
        )
    mapping = _json(_qemu_img(["map", "--output=json", "-f", "qcow2", str(path)], path), path, "map")
    file_size = path.stat().st_size
    extents: list[tuple[int, int]] = []
    for entry in mapping:
        if not entry.get("data"):
            continue
        host = entry.get("offset")
        if isinstance(host, int) and host + entry["length"] > file_size:
            raise DiskImageError(
                str(path),
                host,
                f"guest bytes from {entry['start']} (length {entry['length']}) lie past the end of the file",
                file_size,
                "a complete (untruncated) image",
            )
        extents.append((int(entry["start"]), int(entry["length"])))
    return size, extents


# ------------------------------------------------------------------- import


def import_volume(unit: StorageUnit, volume: str, path: Path, *, image_format: str | None = None) -> str:
    """Make ``volume`` of ``unit`` a verified copy of the image at ``path``; returns its content id."""
    unit._check_volume(volume)
    _refuse_unit_files(unit, path)
    kind = detect_format(path, image_format)
    with contextlib.ExitStack() as stack:
        if kind == "qcow2":
            size, extents = inspect_qcow2(path)
            tmp = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix=".import-", dir=unit.path.parent))
            )
            raw = tmp / "image.raw"
            _qemu_img(["convert", "-f", "qcow2", "-O", "raw", str(path), str(raw)], path)
        else:
            raw = path
            size = path.stat().st_size
            extents = _raw_extents(path, size)
        blocks = -(-size // fmt.BLOCK)
        padded = blocks * fmt.BLOCK
        old_size = unit.volumes().get(volume, {}).get("size", 0)
        if old_size:
            unit.discard(volume, 0, old_size)
        expected = _copy_and_hash(unit, volume, raw, size, padded, extents)
        if blocks and not any(s <= padded - 1 < s + n for s, n in extents):
            last = (blocks - 1) * fmt.BLOCK
            unit.write(volume, last, bytes(unit.read(volume, last, fmt.BLOCK)))  # fix the logical size
        unit.flush()
    got = unit.content_id(volume)
    if got != expected:
        raise CorruptUnit(
            unit.vm_id, None, f"volume {volume} differs from the image it imported", got, expected
        )
    return got


def _copy_and_hash(
    unit: StorageUnit, volume: str, raw: Path, size: int, padded: int, extents: list[tuple[int, int]]
) -> str:
    """One pass over the raw image: hash every byte (holes as zeros) and write the allocated
    extents into the volume.  Returns the BLAKE3 of the image padded to whole blocks."""
    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    pending = sorted(extents)
    first = 0  # pending[:first] end before the current chunk
    with open(raw, "rb") as src:
        for off in range(0, size, _CHUNK):
            data = src.read(min(_CHUNK, size - off))
            if len(data) != min(_CHUNK, size - off):
                raise DiskImageError(
                    str(raw), off + len(data), "ends early", off + len(data), f"{size} bytes"
                )
            hasher.update(data)
            end = off + len(data)
            view = memoryview(data)
            i = first
            while i < len(pending) and pending[i][0] < end:
                start, length = pending[i]
                lo, hi = max(start, off), min(start + length, end)
                if lo < hi:
                    unit.write(volume, lo, view[lo - off : hi - off])
                if start + length <= end and i == first:
                    first += 1  # done with it
                i += 1
    hasher.update(bytes(padded - size))
    return str(hasher.hexdigest())


# ------------------------------------------------------------------- export


def export_volume(
    unit: StorageUnit, volume: str, dest: Path, *, image_format: str, snapshot: str | None, overwrite: bool
) -> str:
    """Write ``volume`` (or its state in ``snapshot``) to ``dest`` as raw or qcow2; returns the content id."""
    if image_format not in FORMATS:
        raise InvalidArgument("format", image_format, "'raw' or 'qcow2'")
    if not dest.parent.is_dir():
        raise InvalidArgument("export destination", str(dest), "a path in an existing directory")
    if dest.exists() and not overwrite:
        raise InvalidArgument(
            "export destination", str(dest), "a path that does not exist yet (or overwrite=True)"
        )
    if image_format == "qcow2" and qemu_img_path() is None:
        raise FeatureUnavailable("qcow2 images (qemu-img from Debian's qemu-utils)", "storage export")
    with contextlib.ExitStack() as stack:
        raw = dest
        if image_format == "qcow2":
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=".export-", dir=dest.parent)))
            raw = tmp / "image.raw"
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        try:
            fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise InvalidArgument(
                "export destination", str(dest), f"a writable path ({exc.strerror})"
            ) from None
        try:
            end = 0
            for off, data, written in unit.iter_volume(volume, snapshot=snapshot):
                hasher.update(data)
                if written:
                    _write_nonzero(fd, data, off)
                end = off + len(data)
            os.ftruncate(fd, end)  # holes stay holes
            os.fsync(fd)
        finally:
            os.close(fd)
        if image_format == "qcow2":
            if dest.exists():
                dest.unlink()
            _qemu_img(["convert", "-f", "raw", "-O", "qcow2", str(raw), str(dest)], dest)
    return str(hasher.hexdigest())


def _write_nonzero(fd: int, data: bytes, offset: int) -> None:
    """Write the runs of ``data`` that are not all-zero blocks; zero blocks stay holes in the file."""
    view = memoryview(data)
    zero = bytes(fmt.BLOCK)
    run = -1
    for b in range(0, len(data) // fmt.BLOCK + 1):
        nonzero = b < len(data) // fmt.BLOCK and view[b * fmt.BLOCK : (b + 1) * fmt.BLOCK] != zero
        if nonzero and run < 0:
            run = b
        elif not nonzero and run >= 0:
            part = view[run * fmt.BLOCK : b * fmt.BLOCK]
            done = 0
            while done < len(part):
                done += os.pwrite(fd, part[done:], offset + run * fmt.BLOCK + done)
            run = -1


def _refuse_unit_files(unit: StorageUnit, path: Path) -> None:
    """A file under another VM's unit directory holds that VM's data: never import it."""
    where = path.resolve()
    root = unit.store.root.resolve()
    if root in where.parents and unit.path.resolve() not in where.parents:
        owner = where.relative_to(root).parts[0]
        raise CommingleRefused(
            unit.vm_id,
            None,
            "image file inside another VM's unit directory",
            owner,
            "a file outside other units",
        )
