"""The entropy device's output against SP 800-90B-style min-entropy, `ent` and a `dieharder` subset.

The device output passes; the stream a hypervisor replaying one page would
produce fails every one of them (and the device denies the replay).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmk_confidential import plugin as confidential
from vmk_confidential.memory import PAGE_SIZE
from vmk_confidential.quality import assess_min_entropy, mcv_min_entropy, run_dieharder, run_ent

from vmkernel import Kernel
from vmkernel.errors import EntropyDenied

MIB = 1 << 20


@pytest.fixture(scope="module", params=["sev", "snp"])
def samples(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, Path]]:
    cfg = {"confidential": {"deterministic_keys": True}}
    with Kernel(seed=2024, plugins=[confidential], autoload=False, config=cfg) as k:
        vm = k.create_vm("rng", confidential={"mode": request.param})
        k.launch_vm(vm.id)
        device = k.entropy(vm.id)
        first = device.read(PAGE_SIZE)
        stream = device.read(MIB)
        # a hypervisor replaying the first page: same address, same data -> denied
        with pytest.raises(EntropyDenied):
            device.serve([device._next - MIB - PAGE_SIZE], b"\x00" * PAGE_SIZE)
        replayed = first * (MIB // PAGE_SIZE)  # what the guest would have read had the replay been served
    out = tmp_path_factory.mktemp(f"entropy-{request.param}")
    good, bad = out / "device.bin", out / "replay.bin"
    good.write_bytes(stream)
    bad.write_bytes(replayed)
    yield good, bad


def test_min_entropy(samples: tuple[Path, Path]) -> None:
    good, bad = samples
    device = assess_min_entropy(good.read_bytes())
    assert device.restart_passed and device.min_entropy >= 7.0, device
    replay = assess_min_entropy(bad.read_bytes())
    assert not replay.restart_passed and replay.min_entropy == 0.0, replay
    assert mcv_min_entropy(bad.read_bytes()) > 7.0  # the byte histogram alone cannot see a replay


@pytest.mark.skipif(shutil.which("ent") is None, reason="Debian package `ent` is not installed")
def test_ent(samples: tuple[Path, Path]) -> None:
    good, bad = samples
    device, replay = run_ent(good), run_ent(bad)
    assert device is not None and replay is not None
    assert device.passed, device
    assert not replay.passed, replay


@pytest.mark.skipif(shutil.which("dieharder") is None, reason="Debian package `dieharder` is not installed")
def test_dieharder_subset(samples: tuple[Path, Path]) -> None:
    good, bad = samples
    device, replay = run_dieharder(good), run_dieharder(bad)
    assert device is not None and replay is not None
    assert device.total >= 30 and device.failed == 0, [a for a in device.assessments if a[2] != "PASSED"]
    assert replay.total == device.total and replay.failed == replay.total


def test_constant_stream_is_caught_by_mcv() -> None:
    assert mcv_min_entropy(bytes(MIB)) == 0.0
