"""The processor's guest memory behaves as a page store exactly like the reference sparse store.

Random sequences of page writes, byte writes, discards and reads go to a VM's
guest memory (through translation, on both processor implementations) and to
a ``DictPageStore`` model; every read agrees, and ``pages()`` is exactly the
set of pages whose contents are not all zeros.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import vmk_processor.plugin as processor_plugin
from hypothesis import given, settings
from hypothesis import strategies as st
from vmk_confidential.memory import DictPageStore

from vmkernel import Kernel
from vmkernel.testing.profiles import scaled

PAGE = 4096
MEMORY = 4 << 20
page_gpas = st.integers(0, MEMORY // PAGE - 1).map(lambda i: i * PAGE)
contents = st.sampled_from(["zeros", "ones", "random"])


def _page(kind: str, salt: int) -> bytes:
    if kind == "zeros":
        return bytes(PAGE)
    if kind == "ones":
        return bytes([salt % 255 + 1]) * PAGE
    return os.urandom(PAGE)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("write_pages"), st.lists(st.tuples(page_gpas, contents), min_size=1, max_size=12)),
        st.tuples(st.just("discard"), st.lists(page_gpas, min_size=1, max_size=6)),
        st.tuples(
            st.just("write"),
            st.tuples(st.integers(0, MEMORY - 1), st.integers(0, 3 * PAGE), st.integers(0, 255)),
        ),
        st.tuples(st.just("read_pages"), st.lists(page_gpas, min_size=0, max_size=12)),
    ),
    max_size=25,
)


def _model_write(model: DictPageStore, gpa: int, data: bytes) -> None:
    first = gpa - gpa % PAGE
    pages = list(range(first, gpa + len(data), PAGE)) if data else []
    if not pages:
        return
    buf = bytearray(model.read_pages(pages))
    buf[gpa - first : gpa - first + len(data)] = data
    model.write_pages(pages, bytes(buf))


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_guest_memory_pages_agree_with_a_sparse_store(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMKERNEL_IMPL", impl)

    @settings(max_examples=scaled(100 if impl == "fast" else 20), deadline=None)
    @given(ops=operations)
    def run(ops: list[tuple[str, Any]]) -> None:
        with Kernel(plugins=[processor_plugin], autoload=False, config={"processor.memory_mib": 8}) as k:
            vm = k.create_vm("p", memory_mib=MEMORY >> 20)
            k.launch_vm(vm)
            mem = k.guest_memory(vm)
            model = DictPageStore()
            for salt, (op, arg) in enumerate(ops):
                if op == "write_pages":
                    gpas = [g for g, _ in arg]
                    data = b"".join(_page(kind, salt + i) for i, (_, kind) in enumerate(arg))
                    mem.write_pages(gpas, data)
                    model.write_pages(gpas, data)
                elif op == "discard":
                    mem.discard_pages(arg)
                    model.discard_pages(arg)
                elif op == "write":
                    gpa, n, byte = arg
                    n = min(n, MEMORY - gpa)
                    data = bytes([byte]) * n
                    mem.write(gpa, data)
                    _model_write(model, gpa, data)
                else:
                    assert mem.read_pages(arg) == model.read_pages(arg)
            held = sorted(g for g in model.pages() if model.read_pages([g]) != bytes(PAGE))
            assert mem.pages() == held
            assert mem.read_pages(held) == model.read_pages(held)
            every = range(0, MEMORY, PAGE)
            assert mem.read(0, MEMORY) == model.read_pages(every)

    run()
