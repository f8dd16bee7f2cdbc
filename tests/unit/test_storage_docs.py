"""The scripting examples of docs/storage.md run as written (in a scratch directory)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "storage.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def test_the_doc_has_examples() -> None:
    assert len(BLOCKS) >= 2


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not found: install qemu-utils")
def test_examples_run_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the examples use ./vmkernel-data and ./disk0.qcow2
    for index, block in enumerate(BLOCKS):
        exec(compile(block, f"{DOC.name} example {index + 1}", "exec"), {})
    assert (tmp_path / "disk0.qcow2").read_bytes()[:4] == b"QFI\xfb"
    assert any((tmp_path / "vmkernel-data" / "storage").iterdir())
