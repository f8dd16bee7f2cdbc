"""A hypothesis state machine that drives a whole kernel through random operations.

After every step it runs every invariant the loaded plugins contribute
through ``vmk_invariants`` (plus the kernel's own), and it keeps a model of
the VM lifecycle to check the kernel against.  Plugin authors subclass it::

    class MyMachine(KernelMachine):
        plugins = [my_plugin]

    TestMyPlugin = MyMachine.TestCase

and every rule below then exercises their plugin too.  Subclasses may add
their own ``@rule`` methods that use ``self.kernel``.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from vmkernel._kernel import Kernel
from vmkernel.enums import VMState
from vmkernel.errors import IllegalTransition, UnknownResource, VmkError
from vmkernel.testing import strategies as vst

__all__ = ["KernelMachine"]

_FROM = {
    "launch": {VMState.CREATED, VMState.STOPPED},
    "stop": {VMState.RUNNING},
    "destroy": {VMState.CREATED, VMState.STOPPED},
}


class KernelMachine(RuleBasedStateMachine):
    """Random VM lifecycles, host changes and clock advances on one kernel."""

    #: plugins registered explicitly on every kernel the machine builds
    plugins: ClassVar[Sequence[Any]] = ()
    #: load installed plugins from entry points too
    autoload: ClassVar[bool] = False
    #: extra keyword arguments for ``Kernel``
    kernel_kwargs: ClassVar[dict[str, Any]] = {}
    #: error types a plugin may legitimately raise to refuse an operation (e.g. CapacityError)
    refusals: ClassVar[tuple[type[VmkError], ...]] = ()

    vms = Bundle("vms")

    def __init__(self) -> None:
        super().__init__()
        self._tmp = tempfile.TemporaryDirectory(prefix="vmk-machine-")
        self.kernel = Kernel(
            seed=0,
            data_dir=Path(self._tmp.name),
            plugins=list(self.plugins),
            autoload=self.autoload,
            **self.kernel_kwargs,
        )
        self.model: dict[str, VMState] = {}
        self.steps = 0

    def teardown(self) -> None:
        try:
            self.kernel.close()
        finally:
            self._tmp.cleanup()

    # -- rules -----------------------------------------------------------------
    @initialize()
    def add_first_host(self) -> None:
        self.kernel.add_host("host-0", memory_mib=4096, cpus=16)

    @rule(index=st.integers(1, 3), memory=st.sampled_from([1024, 4096, 16384]))
    def add_host(self, index: int, memory: int) -> None:
        name = f"host-{index}"
        if any(h.name == name for h in self.kernel.hosts()):
            return
        with contextlib.suppress(*self.refusals):
            self.kernel.add_host(name, memory_mib=memory, cpus=8)

    @rule(target=vms, name=vst.names(), memory=vst.memory_mib(), vcpus=st.integers(1, 4))
    def create_vm(self, name: str, memory: int, vcpus: int) -> Any:
        if any(vm.name == name for vm in self.kernel.vms()):
            return multiple()
        try:
            vm = self.kernel.create_vm(name, memory_mib=memory, vcpus=vcpus)
        except self.refusals:
            return multiple()
        self.model[vm.id] = VMState.CREATED
        return vm.id

    def _apply(self, op: str, vm_id: str) -> None:
        state = self.model.get(vm_id)
        method = getattr(self.kernel, f"{op}_vm")
        if state is None:
            try:
                method(vm_id)
            except UnknownResource:
                return
            raise AssertionError(f"{op} of destroyed VM {vm_id} did not raise UnknownResource")
        if state not in _FROM[op]:
            try:
                method(vm_id)
            except IllegalTransition as exc:
                assert exc.value == state.value, f"error names state {exc.value}, model has {state.value}"
                return
            raise AssertionError(f"{op} from {state.value} was allowed")
        try:
            method(vm_id)
        except self.refusals:
            return
        self.model[vm_id] = {
            "launch": VMState.RUNNING,
            "stop": VMState.STOPPED,
            "destroy": VMState.DESTROYED,
        }[op]
        if op == "destroy":
            del self.model[vm_id]

    @rule(vm_id=vms)
    def launch(self, vm_id: str) -> None:
        self._apply("launch", vm_id)

    @rule(vm_id=vms)
    def stop(self, vm_id: str) -> None:
        self._apply("stop", vm_id)

    @rule(vm_id=consumes(vms))
    def destroy(self, vm_id: str) -> None:
        self._apply("destroy", vm_id)

    @precondition(lambda self: any(s is VMState.RUNNING for s in self.model.values()))
    @rule(data=st.data())
    def destroy_running_with_force(self, data: st.DataObject) -> None:
        running = sorted(k for k, s in self.model.items() if s is VMState.RUNNING)
        vm_id = data.draw(st.sampled_from(running))
        try:
            self.kernel.destroy_vm(vm_id, force=True)
        except self.refusals:
            return
        del self.model[vm_id]

    @rule(delta=vst.time_deltas())
    def advance_clock(self, delta: int) -> None:
        before = self.kernel.clock.now_ns
        try:
            self.kernel.clock.advance(delta)
        except self.refusals:
            assert self.kernel.clock.now_ns == before
            return
        assert self.kernel.clock.now_ns == before + delta

    @rule(memory=vst.bad_memory_mib())
    def bad_create_is_refused(self, memory: Any) -> None:
        before = len(self.kernel.journal)
        try:
            self.kernel.create_vm("rejected", memory_mib=memory)
        except VmkError:
            assert len(self.kernel.journal) == before, "a rejected create left events in the journal"
            return
        raise AssertionError(f"create_vm accepted memory_mib={memory!r}")

    # -- checks after every step -----------------------------------------------
    @invariant()
    def kernel_matches_model(self) -> None:
        live = {vm.id: vm.state for vm in self.kernel.vms()}
        assert live == self.model, f"kernel {live} != model {self.model}"

    @invariant()
    def plugin_invariants_hold(self) -> None:
        self.steps += 1
        self.kernel.check_invariants()
