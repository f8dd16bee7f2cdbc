"""The kernel state machine with the processor and confidential plugins together.

Random lifecycles of plain and confidential VMs, attestation refusals, entropy
reads, hypervisor writes and guest writes to private pages, with every
plugin's invariants checked after each step: the processor's isolation and
bookkeeping, and the confidential plugin's (no secret in host-visible state,
which now includes the processor's guest memory; private memory encrypted).
"""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, multiple, rule
from vmk_confidential import plugin as confidential
from vmk_confidential.memory import PAGE_SIZE, SplitPageStore
from vmk_processor import plugin as processor

from vmkernel.enums import VMState
from vmkernel.errors import (
    AttestationError,
    CapacityError,
    EntropyDenied,
    FeatureUnavailable,
    IllegalTransition,
    TranslationFault,
)
from vmkernel.testing.machine import KernelMachine
from vmkernel.testing.profiles import scaled

MARKER = b"private guest bytes "


class ConfidentialProcessorMachine(KernelMachine):
    plugins = [processor, confidential]
    kernel_kwargs = {"config": {"processor.memory_mib": 512}}
    refusals = (AttestationError, CapacityError)

    @rule(
        target=KernelMachine.vms,
        index=st.integers(0, 20),
        options=st.sampled_from([True, {"mode": "sev"}, {"debug": True}, {"vmpl": 1}]),
        memory=st.sampled_from([16, 64]),
    )
    def create_confidential(self, index: int, options: Any, memory: int) -> Any:
        name = f"cvm-{index}"
        if any(vm.name == name for vm in self.kernel.vms()):
            return multiple()
        vm = self.kernel.create_vm(name, memory_mib=memory, confidential=options)
        self.model[vm.id] = VMState.CREATED
        return vm.id

    def _launched(self, vm_id: str) -> Any:
        rec = confidential.state_of(self.kernel).vms.get(vm_id)
        return rec if vm_id in self.model and rec is not None and rec.agent is not None else None

    @rule(vm_id=KernelMachine.vms, n=st.integers(0, 20000))
    def read_entropy(self, vm_id: str, n: int) -> None:
        if vm_id not in self.model:
            return
        try:
            data = self.kernel.entropy(vm_id).read(n)
        except (IllegalTransition, FeatureUnavailable):
            return
        assert len(data) == n

    @rule(vm_id=KernelMachine.vms, page=st.integers(0x200, 0x7EF))
    def guest_writes_a_private_page(self, vm_id: str, page: int) -> None:
        rec = self._launched(vm_id)
        if rec is None:
            return
        gpa = page * PAGE_SIZE  # 2 MiB .. the launch image: guest RAM the image does not use
        engine = rec.agent.ctx.engine
        engine.mark_private([gpa])
        engine.guest_write(gpa, MARKER)
        host = self.kernel.guest_memory(vm_id).read(gpa, PAGE_SIZE)
        assert MARKER not in host
        assert engine.guest_read(gpa, len(MARKER)) == MARKER

    @rule(vm_id=KernelMachine.vms, offset=st.integers(0, 0x2000))
    def hypervisor_pokes_firmware(self, vm_id: str, offset: int) -> None:
        rec = self._launched(vm_id)
        if rec is None:
            return
        try:
            self.kernel.hypervisor_write(vm_id, 0x7F8000 + offset, b"\xcc" * 8)
        except TranslationFault:
            assert rec.options.mode.value == "snp"
            return
        assert self.kernel.guest_memory(vm_id).read(0x7F8000 + offset, 8) == b"\xcc" * 8

    @rule(vm_id=KernelMachine.vms)
    def replay_is_denied(self, vm_id: str) -> None:
        rec = self._launched(vm_id)
        if rec is None or rec.entropy is None or rec.entropy.stats.pages == 0:
            return
        dev = rec.entropy
        try:
            dev.serve([dev._next - PAGE_SIZE], bytes(PAGE_SIZE))
        except EntropyDenied:
            return
        raise AssertionError("a replayed entropy page was served")

    @invariant()
    def engines_store_pages_in_guest_memory(self) -> None:
        for vm_id, rec in confidential.state_of(self.kernel).vms.items():
            if rec.agent is None:
                continue
            store = rec.agent.ctx.engine.store
            assert isinstance(store, SplitPageStore), type(store)
            assert list(store.high.pages()) == []  # entropy pages never outlive a request
            assert store.low.pages() == self.kernel.guest_memory(vm_id).pages()


TestConfidentialProcessorMachine = ConfidentialProcessorMachine.TestCase
TestConfidentialProcessorMachine.settings = settings(max_examples=scaled(20))
