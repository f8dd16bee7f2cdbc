"""Memory encryption engine: AES-XTS per page with the GPA as tweak, guest vs host views, SEV/SNP modes."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from vmk_confidential.memory import (
    PAGE_SIZE,
    DictPageStore,
    EncryptionMode,
    MemoryEncryptionEngine,
    SplitPageStore,
    xts_pages,
)

from vmkernel.errors import InvalidArgument, TranslationFault
from vmkernel.testing.profiles import scaled

KEY = bytes(range(64))


def _times_x(lo: np.ndarray, hi: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Multiply GF(2^128) elements (little-endian halves) by x**k, k <= 32, XTS polynomial."""
    over = hi >> np.uint64(64 - k)
    hi = (hi << np.uint64(k)) | (lo >> np.uint64(64 - k))
    lo = (
        (lo << np.uint64(k)) ^ over ^ (over << np.uint64(1)) ^ (over << np.uint64(2)) ^ (over << np.uint64(7))
    )
    return lo, hi


def reference_xts(key: bytes, gpas: list[int], data: bytes, decrypt: bool) -> bytes:
    """XTS built from AES-ECB and the IEEE 1619 tweak arithmetic, independent of the library's XTS mode."""
    n, blocks = len(gpas), PAGE_SIZE // 16
    tweaks = (
        Cipher(algorithms.AES(key[32:]), modes.ECB())
        .encryptor()
        .update(b"".join(g.to_bytes(16, "little") for g in gpas))
    )
    masks = np.empty((n, blocks, 2), dtype=np.uint64)
    masks[:, 0, :] = np.frombuffer(tweaks, dtype="<u8").reshape(n, 2)
    for j in range(1, blocks):
        masks[:, j, 0], masks[:, j, 1] = _times_x(masks[:, j - 1, 0], masks[:, j - 1, 1], 1)
    x = np.frombuffer(data, dtype="<u8").reshape(n, blocks, 2) ^ masks
    aes = Cipher(algorithms.AES(key[:32]), modes.ECB())
    ctx = aes.decryptor() if decrypt else aes.encryptor()
    y = np.frombuffer(ctx.update(x.tobytes()), dtype="<u8").reshape(n, blocks, 2) ^ masks
    return y.tobytes()


gpa_st = st.integers(0, (1 << 40) - 1).map(lambda x: x * PAGE_SIZE)


@settings(max_examples=scaled(300))
@given(
    key=st.binary(min_size=64, max_size=64).filter(lambda k: k[:32] != k[32:]),
    gpas=st.lists(gpa_st, min_size=1, max_size=6),
    seed=st.integers(0, 2**32),
    decrypt=st.booleans(),
)
def test_page_xts_equals_independent_xts_with_gpa_tweak(
    key: bytes, gpas: list[int], seed: int, decrypt: bool
) -> None:
    data = os.urandom(len(gpas) * PAGE_SIZE) if seed % 2 else bytes([seed % 256]) * (len(gpas) * PAGE_SIZE)
    assert xts_pages(key, gpas, data, decrypt=decrypt) == reference_xts(key, gpas, data, decrypt)


def test_large_batch_roundtrips_and_differs_per_address() -> None:
    gpas = [i * PAGE_SIZE for i in range(64)]
    data = bytes(PAGE_SIZE) * 64
    ct = xts_pages(KEY, gpas, data, decrypt=False)
    assert ct == reference_xts(KEY, gpas, data, decrypt=False)
    pages = {ct[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(64)}
    assert len(pages) == 64  # same plaintext, different tweak, different ciphertext
    assert xts_pages(KEY, gpas, ct, decrypt=True) == data


@pytest.mark.parametrize("mode", list(EncryptionMode))
def test_guest_sees_plaintext_host_sees_ciphertext(mode: EncryptionMode) -> None:
    engine = MemoryEncryptionEngine(DictPageStore(), KEY, mode)
    engine.mark_private([0x1000, 0x2000])
    secret = b"guest secret " * 600
    engine.guest_write(0x1000 + 5, secret[:5000])
    assert engine.guest_read(0x1000 + 5, 5000) == secret[:5000]
    host = engine.host_read_pages([0x1000, 0x2000])
    assert b"guest secret" not in host
    assert host == reference_xts(KEY, [0x1000, 0x2000], engine.guest_read_pages([0x1000, 0x2000]), False)


def test_shared_pages_are_plaintext_for_both() -> None:
    engine = MemoryEncryptionEngine(DictPageStore(), KEY, EncryptionMode.SNP)
    engine.guest_write(0x3000, b"shared")
    assert engine.host_read_pages([0x3000])[:6] == b"shared"
    engine.hypervisor_write(0x3000, b"HYPERV")
    assert engine.guest_read(0x3000, 6) == b"HYPERV"


def test_sev_hypervisor_write_to_private_lands_raw() -> None:
    engine = MemoryEncryptionEngine(DictPageStore(), KEY, EncryptionMode.SEV)
    engine.mark_private([0x4000])
    engine.guest_write(0x4000, b"A" * PAGE_SIZE)
    engine.hypervisor_write(0x4000, b"B" * 16)
    assert engine.host_read_pages([0x4000])[:16] == b"B" * 16
    view = engine.guest_read(0x4000, PAGE_SIZE)
    assert view[:16] != b"B" * 16  # decrypted garbage, not the hypervisor's bytes
    assert view[16:] == b"A" * (PAGE_SIZE - 16)  # XTS: other blocks unaffected


def test_snp_hypervisor_write_to_private_faults_and_changes_nothing() -> None:
    engine = MemoryEncryptionEngine(DictPageStore(), KEY, EncryptionMode.SNP)
    engine.mark_private([0x5000])
    engine.guest_write(0x5000, b"keep")
    before = engine.host_read_pages([0x5000])
    with pytest.raises(TranslationFault) as info:
        engine.hypervisor_write(0x5FF0, b"x" * 32)  # spans into a shared page too
    assert info.value.kind == "permission" and info.value.address == 0x5FF0
    with pytest.raises(TranslationFault):
        engine.hypervisor_write_pages([0x5000], bytes(PAGE_SIZE))
    assert engine.host_read_pages([0x5000]) == before
    assert engine.guest_read(0x5000, 4) == b"keep"


def test_bad_arguments_are_named() -> None:
    with pytest.raises(InvalidArgument, match="key"):
        MemoryEncryptionEngine(DictPageStore(), bytes(64), EncryptionMode.SEV)
    engine = MemoryEncryptionEngine(DictPageStore(), KEY, EncryptionMode.SEV)
    with pytest.raises(InvalidArgument, match="gpa"):
        engine.mark_private([0x1001])
    with pytest.raises(InvalidArgument, match="data length"):
        engine.guest_write_pages([0x1000], b"short")
    with pytest.raises(InvalidArgument, match="address range"):
        engine.guest_read(-1, 4)


def test_scrub_forgets_the_key() -> None:
    engine = MemoryEncryptionEngine(DictPageStore(), KEY, EncryptionMode.SEV)
    engine.mark_private([0])
    engine.guest_write(0, b"secret!")
    engine.scrub()
    assert b"secret!" not in engine.guest_read_pages([0])


def test_split_store_routes_by_address_and_keeps_batch_order() -> None:
    low, high = DictPageStore(), DictPageStore()
    store = SplitPageStore(low, high, 1 << 40)
    gpas = [(1 << 40) + PAGE_SIZE, 0x2000, 1 << 40, 0x1000]
    data = os.urandom(len(gpas) * PAGE_SIZE)
    store.write_pages(gpas, data)
    assert sorted(low.pages()) == [0x1000, 0x2000]
    assert sorted(high.pages()) == [1 << 40, (1 << 40) + PAGE_SIZE]
    assert store.read_pages(gpas) == data
    assert store.read_pages(gpas[::-1]) == b"".join(
        data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in (3, 2, 1, 0)
    )
    assert low.read_pages([0x2000]) == data[PAGE_SIZE : 2 * PAGE_SIZE]
    store.discard_pages([0x2000, 1 << 40])
    assert sorted(store.pages()) == [0x1000, (1 << 40) + PAGE_SIZE]
    assert store.read_pages([0x2000, 1 << 40]) == bytes(2 * PAGE_SIZE)
    engine = MemoryEncryptionEngine(store, KEY, EncryptionMode.SEV)
    engine.mark_private([0x3000, (1 << 40) + 0x5000])
    engine.guest_write_pages([0x3000, (1 << 40) + 0x5000], b"p" * 2 * PAGE_SIZE)
    assert engine.guest_read_pages([0x3000, (1 << 40) + 0x5000]) == b"p" * 2 * PAGE_SIZE
    assert low.read_pages([0x3000]) == xts_pages(KEY, [0x3000], b"p" * PAGE_SIZE, decrypt=False)
    with pytest.raises(InvalidArgument, match="boundary"):
        SplitPageStore(low, high, 100)
