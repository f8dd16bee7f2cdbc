"""Shared test configuration: the hypothesis profile comes from vmkernel's pytest plugin."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: The public data corpus beside the project (SigmaHQ rules, SEV fixtures); absent in a user's clone.
SHARED_DATA = Path(
    os.environ.get("VMKERNEL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data corpus not found at {SHARED_DATA} (set VMKERNEL_SHARED_DATA)")
    return SHARED_DATA
