"""The kernel state machine with the confidential plugin: random lifecycles, attestation, entropy."""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import multiple, rule
from vmk_confidential import plugin as confidential

from vmkernel.enums import VMState
from vmkernel.errors import (
    AttestationError,
    EntropyDenied,
    FeatureUnavailable,
    IllegalTransition,
    TranslationFault,
)
from vmkernel.testing.machine import KernelMachine
from vmkernel.testing.profiles import scaled


class ConfidentialMachine(KernelMachine):
    plugins = [confidential]
    refusals = (AttestationError,)

    @rule(
        target=KernelMachine.vms,
        index=st.integers(0, 50),
        options=st.sampled_from(
            [True, {"mode": "sev"}, {"debug": True}, {"vmpl": 1}, {"migrate_ma": True, "mode": "sev"}]
        ),
        vcpus=st.integers(1, 4),
    )
    def create_confidential(self, index: int, options: Any, vcpus: int) -> Any:
        name = f"cvm-{index}"
        if any(vm.name == name for vm in self.kernel.vms()):
            return multiple()
        vm = self.kernel.create_vm(name, memory_mib=64, vcpus=vcpus, confidential=options)
        self.model[vm.id] = VMState.CREATED
        return vm.id

    @rule(data=st.data())
    def launch_a_confidential_vm(self, data: st.DataObject) -> None:
        waiting = sorted(
            vm_id
            for vm_id, state in self.model.items()
            if state is not VMState.RUNNING and vm_id in confidential.state_of(self.kernel).vms
        )
        if waiting:
            self._apply("launch", data.draw(st.sampled_from(waiting)))

    @rule(vm_id=KernelMachine.vms, n=st.integers(0, 20000))
    def read_entropy(self, vm_id: str, n: int) -> None:
        if vm_id not in self.model:
            return
        try:
            data = self.kernel.entropy(vm_id).read(n)
        except (IllegalTransition, FeatureUnavailable):  # not running attested / not confidential
            return
        assert len(data) == n

    @rule(vm_id=KernelMachine.vms, offset=st.integers(0, 0x2000))
    def hypervisor_pokes_firmware(self, vm_id: str, offset: int) -> None:
        if vm_id not in self.model:
            return
        rec = confidential.state_of(self.kernel).vms.get(vm_id)
        if rec is None or rec.agent is None:
            return
        try:
            self.kernel.hypervisor_write(vm_id, 0x7F8000 + offset, b"\xcc" * 8)
        except TranslationFault:
            assert rec.options.mode.value == "snp"

    @rule(vm_id=KernelMachine.vms)
    def replay_is_denied(self, vm_id: str) -> None:
        rec = confidential.state_of(self.kernel).vms.get(vm_id)
        if vm_id not in self.model or rec is None or rec.entropy is None:
            return
        dev = rec.entropy
        if dev.stats.pages == 0:
            return
        try:
            dev.serve([dev._next - 4096], bytes(4096))
        except EntropyDenied:
            return
        raise AssertionError("a replayed entropy page was served")


TestConfidentialMachine = ConfidentialMachine.TestCase
TestConfidentialMachine.settings = settings(max_examples=scaled(20))
