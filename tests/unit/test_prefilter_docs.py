"""The scripting examples of docs/prefilter.md run as written and print what their comments say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "prefilter.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def expected_output(block: str) -> list[str]:
    """The ``# ...`` comment of every ``print(...)`` line, in order."""
    return [m.group(1).strip() for m in re.finditer(r"^\s*print\(.*\)\s+#\s*(.+)$", block, re.M)]


def test_the_doc_has_examples() -> None:
    assert len(BLOCKS) >= 2
    assert any("deliver_frames" in block for block in BLOCKS)
    assert all(expected_output(block) for block in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_prints_what_it_says(index: int, capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(BLOCKS[index], f"{DOC.name} example {index + 1}", "exec"), {})
    assert capsys.readouterr().out.splitlines() == expected_output(BLOCKS[index])
