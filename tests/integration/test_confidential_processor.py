"""Confidential VMs whose pages live in the processor's guest memory.

With both plugins loaded the memory encryption engine stores a confidential
VM's pages in ``kernel.guest_memory(vm)``: the host reads AES-XTS ciphertext
through the processor while the guest reads plaintext through the engine, the
entropy device and its replay denial keep working, and the storage plugin's
save/restore carries the ciphertext into a new kernel.  Without the processor
the engine keeps its own sparse store, as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from vmk_confidential import plugin as confidential
from vmk_confidential.entropy import ENTROPY_APERTURE
from vmk_confidential.memory import PAGE_SIZE, DictPageStore, SplitPageStore
from vmk_confidential.psp import DELIVERY_GPA, FIRMWARE_GPA, LaunchImage
from vmk_confidential.quality import assess_min_entropy
from vmk_processor import plugin as processor
from vmk_processor.plugin import PROCESSOR
from vmk_storage import plugin as storage

from vmkernel import Kernel, VMState
from vmkernel.errors import AttestationError, EntropyDenied, InvalidArgument, TranslationFault

FIRMWARE = LaunchImage().firmware
CONFIG = {"processor.memory_mib": 256}
DATA_GPA = 0x20_0000  # a page the guest makes private and writes after launch
SECRET_TEXT = b"the guest's own private data, never seen by the host "


def xts_encrypt(key: bytes, gpa: int, page: bytes) -> bytes:
    return Cipher(algorithms.AES(key), modes.XTS(gpa.to_bytes(16, "little"))).encryptor().update(page)


@pytest.fixture(params=["processor registered first", "processor registered last"])
def kernel(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Kernel]:
    plugins: list[Any] = [processor, confidential]
    if request.param.endswith("last"):
        plugins.reverse()
    with Kernel(seed=11, plugins=plugins, autoload=False, data_dir=tmp_path, config=CONFIG) as k:
        yield k


# -- (a) host view and guest view ------------------------------------------------------


@pytest.mark.parametrize("mode", ["sev", "snp"])
def test_host_reads_ciphertext_through_the_processor_guest_reads_plaintext(kernel: Kernel, mode: str) -> None:
    vm = kernel.create_vm("cvm", memory_mib=16, confidential={"mode": mode})
    kernel.launch_vm(vm)
    engine = confidential.engine_of(kernel, vm)
    memory = kernel.guest_memory(vm)
    assert isinstance(engine.store, SplitPageStore) and engine.store.low.pages() == memory.pages()
    for i, gpa in enumerate(LaunchImage().firmware_gpas()):
        plain = FIRMWARE[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
        host = memory.read(gpa, PAGE_SIZE)
        assert host != plain
        assert host == xts_encrypt(engine._key, gpa, plain)  # AES-256-XTS, tweak = GPA
        assert engine.guest_read_pages([gpa]) == plain
        cpu = kernel.stash[PROCESSOR].cpu  # the bytes are in the host frames the processor maps
        assert cpu.read_phys(memory.translate(gpa), PAGE_SIZE) == host

    engine.mark_private([DATA_GPA])
    engine.guest_write(DATA_GPA + 100, SECRET_TEXT)
    assert engine.guest_read(DATA_GPA + 100, len(SECRET_TEXT)) == SECRET_TEXT
    host = memory.read(DATA_GPA, PAGE_SIZE)
    assert SECRET_TEXT not in host and host == engine.host_read_pages([DATA_GPA])
    assert DATA_GPA in memory.pages()

    # Shared pages are plain for both sides.
    engine.guest_write(0x30_0000, b"shared with the host")
    assert memory.read(0x30_0000, 20) == b"shared with the host"
    # The released secret sits in private memory: the host sees only ciphertext.
    secret = confidential.state_of(kernel).vms[vm.id].agent.secret()  # type: ignore[union-attr]
    assert secret is not None and secret not in memory.read(0, 16 << 20)
    assert DELIVERY_GPA in memory.pages()
    assert kernel.check_invariants() is None


def test_hypervisor_writes_land_in_guest_memory(kernel: Kernel) -> None:
    sev = kernel.create_vm("sev", memory_mib=16, confidential={"mode": "sev"})
    snp = kernel.create_vm("snp", memory_mib=16, confidential={"mode": "snp"})
    kernel.launch_vm(sev)
    kernel.launch_vm(snp)
    kernel.hypervisor_write(sev, FIRMWARE_GPA, b"\x90" * 16)
    assert kernel.guest_memory(sev).read(FIRMWARE_GPA, 16) == b"\x90" * 16  # raw: the host has no key
    assert confidential.engine_of(kernel, sev).guest_read(FIRMWARE_GPA, 16) != b"\x90" * 16
    before = kernel.guest_memory(snp).read(FIRMWARE_GPA, PAGE_SIZE)
    with pytest.raises(TranslationFault):
        kernel.hypervisor_write(snp, FIRMWARE_GPA, b"\x90" * 16)
    assert kernel.guest_memory(snp).read(FIRMWARE_GPA, PAGE_SIZE) == before
    kernel.hypervisor_write(snp, 0x100_0000 - 9, b"shared ok")
    assert confidential.engine_of(kernel, snp).guest_read(0x100_0000 - 9, 9) == b"shared ok"


def test_without_the_processor_pages_stay_in_the_engine(tmp_path: Path) -> None:
    with Kernel(seed=11, plugins=[confidential], autoload=False, data_dir=tmp_path) as k:
        vm = k.create_vm("cvm", memory_mib=1, confidential=True)  # no RAM bound without guest memory
        k.launch_vm(vm)
        engine = confidential.engine_of(k, vm)
        assert type(engine.store) is DictPageStore
        assert engine.guest_read_pages([FIRMWARE_GPA]) == FIRMWARE[:PAGE_SIZE]
        assert engine.host_read_pages([FIRMWARE_GPA]) != FIRMWARE[:PAGE_SIZE]
        assert len(k.entropy(vm).read(10_000)) == 10_000
        assert k.check_invariants() is None


def test_a_vm_too_small_for_its_launch_image_is_refused_by_name(kernel: Kernel) -> None:
    vm = kernel.create_vm("tiny", memory_mib=8, confidential=True)
    with pytest.raises(InvalidArgument) as info:
        kernel.launch_vm(vm)
    assert "confidential vm tiny" in info.value.thing and "at least 9 MiB" in info.value.expected
    assert kernel.vm(vm.id).state is VMState.CREATED
    assert not kernel.stash[PROCESSOR].vms  # the launch's memory went back with the rollback
    assert kernel.check_invariants() is None


def test_failed_attestation_releases_the_memory_the_launch_mapped(kernel: Kernel) -> None:
    state = kernel.stash[PROCESSOR]
    free = len(state.free_chunks)
    vm = kernel.create_vm("dbg", memory_mib=16, confidential={"debug": True})
    with pytest.raises(AttestationError, match="DEBUG_ENABLED"):
        kernel.launch_vm(vm)
    assert not state.vms and len(state.free_chunks) == free
    assert kernel.check_invariants() is None


def test_destroy_zeroes_the_ciphertext_and_scrubs_the_key(kernel: Kernel) -> None:
    vm = kernel.create_vm("cvm", memory_mib=16, confidential=True)
    kernel.launch_vm(vm)
    hpa = kernel.guest_memory(vm).translate(FIRMWARE_GPA)
    cpu = kernel.stash[PROCESSOR].cpu
    assert cpu.read_phys(hpa, PAGE_SIZE) != bytes(PAGE_SIZE)
    kernel.destroy_vm(vm, force=True)
    assert cpu.read_phys(hpa, PAGE_SIZE) == bytes(PAGE_SIZE)
    st = confidential.state_of(kernel)
    assert vm.id not in st.vms and not st.graveyard
    assert kernel.check_invariants() is None


def test_relaunch_re_encrypts_the_image_under_a_new_key(kernel: Kernel) -> None:
    vm = kernel.create_vm("cvm", memory_mib=16, confidential={"mode": "sev"})
    kernel.launch_vm(vm)
    first = kernel.guest_memory(vm).read(FIRMWARE_GPA, PAGE_SIZE)
    kernel.stop_vm(vm)
    kernel.launch_vm(vm)
    again = kernel.guest_memory(vm).read(FIRMWARE_GPA, PAGE_SIZE)
    assert again != first  # same plaintext and address, new launch key
    assert confidential.engine_of(kernel, vm).guest_read_pages([FIRMWARE_GPA]) == FIRMWARE[:PAGE_SIZE]
    assert kernel.check_invariants() is None


# -- (b) entropy device --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sev", "snp"])
def test_entropy_device_and_replay_denial_with_guest_memory(kernel: Kernel, mode: str) -> None:
    vm = kernel.create_vm(f"rng-{mode}", memory_mib=16, confidential={"mode": mode})
    kernel.launch_vm(vm)
    memory = kernel.guest_memory(vm)
    held = memory.pages()
    device = kernel.entropy(vm)
    sample = device.read(1 << 20)
    estimate = assess_min_entropy(sample)
    assert estimate.restart_passed and estimate.min_entropy >= 7.0, estimate
    # The aperture is above guest RAM: RAM is untouched and the served pages were released.
    assert device._next > ENTROPY_APERTURE and memory.pages() == held
    engine = confidential.engine_of(kernel, vm)
    assert isinstance(engine.store, SplitPageStore) and not list(engine.store.high.pages())
    with pytest.raises(EntropyDenied, match="page address"):
        device.serve([device._next - PAGE_SIZE], bytes(PAGE_SIZE))
    page = b"\x5a" * PAGE_SIZE
    device.serve([device._next], page)
    device._next += PAGE_SIZE
    with pytest.raises(EntropyDenied, match="page digest"):
        device.serve([device._next], page)
    assert confidential.state_of(kernel).denials == 2
    assert kernel.check_invariants() is None


# -- (c) save and restore through the storage plugin -----------------------------------


def _save_confidential_vm(data: Path, config: dict[str, Any]) -> tuple[str, bytes]:
    """A launched confidential VM with private data, stopped, saved, destroyed; its id and host view."""
    with Kernel(
        seed=5, data_dir=data, plugins=[processor, storage, confidential], autoload=False, config=config
    ) as k:
        vm = k.create_vm("saved-cvm", memory_mib=16, confidential=True)
        k.launch_vm(vm)
        engine = confidential.engine_of(k, vm)
        engine.mark_private([DATA_GPA])
        engine.guest_write(DATA_GPA, SECRET_TEXT)
        k.stop_vm(vm)
        k.save_vm(vm)
        host_view = k.guest_memory(vm).read(0, 16 << 20)
        k.destroy_vm(vm)
        return vm.id, host_view


@pytest.mark.parametrize("keys", ["per-launch keys", "deterministic keys"])
def test_save_restore_carries_the_ciphertext_into_a_new_kernel(tmp_path: Path, keys: str) -> None:
    config: dict[str, Any] = {**CONFIG, "confidential": {"deterministic_keys": keys == "deterministic keys"}}
    data = tmp_path / "data"
    vm_id, saved = _save_confidential_vm(data, config)
    assert FIRMWARE[:PAGE_SIZE] not in saved and SECRET_TEXT not in saved  # only ciphertext was saved

    with Kernel(
        seed=5, data_dir=data, plugins=[processor, storage, confidential], autoload=False, config=config
    ) as k:
        vm = k.restore_vm(vm_id)
        memory = k.guest_memory(vm)
        assert memory.read(0, 16 << 20) == saved  # byte-identical host view before any launch
        assert vm.id in confidential.state_of(k).vms  # still a confidential VM
        assert k.journal.of_kind("confidential.restore")

        k.launch_vm(vm)  # measured and attested afresh: a new launch, and a key for it
        engine = confidential.engine_of(k, vm)
        assert engine.guest_read_pages([FIRMWARE_GPA]) == FIRMWARE[:PAGE_SIZE]
        assert memory.read(DATA_GPA, PAGE_SIZE) == saved[DATA_GPA : DATA_GPA + PAGE_SIZE]  # untouched
        engine.mark_private([DATA_GPA])  # the guest validates its private page again
        view = engine.guest_read(DATA_GPA, len(SECRET_TEXT))
        same_key = memory.read(FIRMWARE_GPA, PAGE_SIZE) == saved[FIRMWARE_GPA : FIRMWARE_GPA + PAGE_SIZE]
        if keys == "deterministic keys":
            # The seed derives the same key for the same launch: the saved pages decrypt.
            assert same_key and view == SECRET_TEXT
        else:
            # A launch key dies with its launch: the image is re-encrypted under the new key, and
            # what was encrypted under the old one reads as noise.
            assert not same_key and view != SECRET_TEXT
        assert k.check_invariants() is None


def test_demo_shows_the_host_view_is_ciphertext(kernel: Kernel) -> None:
    class Demo:
        def __init__(self) -> None:
            self.records: dict[str, object] = {}

        def step(self, text: str) -> None:
            pass

        def record(self, key: str, value: object) -> None:
            self.records[key] = value

    demo = Demo()
    confidential.vmk_demo(kernel, demo)
    assert demo.records["pages in"] == "the processor's guest memory"
    assert demo.records["host view differs from guest view"] is True
    assert demo.records["replay"] == "EntropyDenied"
