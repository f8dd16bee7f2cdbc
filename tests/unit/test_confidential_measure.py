"""The launch digest equals sev-snp-measure's for the same page updates."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vmk_confidential.measure import LaunchDigest, PageType
from vmk_confidential.psp import LaunchImage, SecurityModule, guest_policy

from vmkernel.errors import InvalidArgument
from vmkernel.testing.profiles import scaled

gctx = pytest.importorskip("sevsnpmeasure.gctx", reason="sev-snp-measure is not installed")

PAGE = 4096

update_st = st.one_of(
    st.tuples(
        st.just("normal"), st.integers(0, 1 << 30), st.integers(1, 3), st.binary(min_size=1, max_size=64)
    ),
    st.tuples(st.just("zero"), st.integers(0, 1 << 30), st.integers(1, 3), st.just(b"")),
    st.tuples(st.just("unmeasured"), st.integers(0, 1 << 30), st.integers(1, 3), st.just(b"")),
    st.tuples(st.just("secrets"), st.integers(0, 1 << 30), st.just(1), st.just(b"")),
    st.tuples(st.just("cpuid"), st.integers(0, 1 << 30), st.just(1), st.just(b"")),
    st.tuples(st.just("vmsa"), st.just(0), st.just(1), st.binary(min_size=1, max_size=64)),
)


@settings(max_examples=scaled(300))
@given(updates=st.lists(update_st, max_size=8), seed=st.binary(min_size=48, max_size=48) | st.just(bytes(48)))
def test_launch_digest_matches_sev_snp_measure(
    updates: list[tuple[str, int, int, bytes]], seed: bytes
) -> None:
    ours = LaunchDigest(seed)
    theirs = gctx.GCTX(seed=seed)
    for kind, page_no, pages, pattern in updates:
        gpa = page_no * PAGE
        data = (pattern * (pages * PAGE // max(1, len(pattern)) + 1))[: pages * PAGE] if pattern else b""
        if kind == "normal":
            ours.update_normal_pages(gpa, data)
            theirs.update_normal_pages(gpa, data)
        elif kind == "zero":
            ours.update_pages(PageType.ZERO, [gpa + i * PAGE for i in range(pages)])
            theirs.update_zero_pages(gpa, pages * PAGE)
        elif kind == "unmeasured":
            ours.update_pages(PageType.UNMEASURED, [gpa + i * PAGE for i in range(pages)])
            theirs.update_unmeasured_pages(gpa, pages * PAGE)
        elif kind == "secrets":
            ours.update(PageType.SECRETS, gpa)
            theirs.update_secrets_page(gpa)
        elif kind == "cpuid":
            ours.update(PageType.CPUID, gpa)
            theirs.update_cpuid_page(gpa)
        else:
            ours.update_vmsa(data)
            theirs.update_vmsa_page(data)
    assert ours.digest == theirs.ld()


def test_security_module_launch_equals_reference_and_tool() -> None:
    from vmk_confidential.certs import Vendor
    from vmk_confidential.psp import CPUID_GPA, FIRMWARE_GPA, SECRETS_GPA, ZERO_GPA, ZERO_PAGES, _vmsa_page

    image = LaunchImage(vcpus=3)
    module = SecurityModule("h", Vendor())
    ctx = module.launch_start("vm", policy=guest_policy())
    measured = module.launch_image(ctx, image)
    tool = gctx.GCTX()
    tool.update_normal_pages(FIRMWARE_GPA, image.firmware)
    tool.update_zero_pages(ZERO_GPA, ZERO_PAGES * PAGE)
    tool.update_secrets_page(SECRETS_GPA)
    tool.update_cpuid_page(CPUID_GPA)
    for vcpu in range(3):
        tool.update_vmsa_page(_vmsa_page(vcpu))
    assert measured == image.reference_measurement() == tool.ld()
    assert LaunchImage(vcpus=2).reference_measurement() != measured


def test_measurement_rejects_bad_pages() -> None:
    digest = LaunchDigest()
    with pytest.raises(InvalidArgument, match="gpa"):
        digest.update(PageType.ZERO, 0x10)
    with pytest.raises(InvalidArgument, match="page"):
        digest.update(PageType.NORMAL, 0, b"short")
    with pytest.raises(InvalidArgument, match="data length"):
        digest.update_normal_pages(0, b"x" * 100)
