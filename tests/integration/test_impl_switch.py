"""A whole kernel behaves the same on the Rust fast paths and on their references."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vmkernel.errors import InvalidArgument

SCENARIO = """
import vmkernel
with vmkernel.Kernel(seed=5, autoload=False) as k:
    for i in range(20):
        vm = k.create_vm(f"vm{i}", memory_mib=64 + i)
        k.launch_vm(vm)
        k.clock.advance(1000 * i)
        if i % 3:
            k.stop_vm(vm)
    print(k.journal.digest())
"""


def run_with(impl: str) -> str:
    env = {**os.environ, "VMKERNEL_IMPL": impl}
    done = subprocess.run(
        [sys.executable, "-c", SCENARIO], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_same_journal_digest_on_both_implementations():
    fast, reference = run_with("fast"), run_with("reference")
    assert len(fast) == 64
    assert fast == reference


def test_unknown_implementation_is_a_typed_error(monkeypatch):
    from vmkernel._impl import implementation

    monkeypatch.setenv("VMKERNEL_IMPL", "gpu")
    with pytest.raises(InvalidArgument, match="VMKERNEL_IMPL"):
        implementation()
