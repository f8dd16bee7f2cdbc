"""The testing kit: the state machine, the strategies and the profiles."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis.stateful import run_state_machine_as_test

import vmkernel
from vmkernel import Invariant, StashKey, VMState, hookimpl
from vmkernel.errors import CapacityError, InvalidArgument, InvariantViolation, VmkError
from vmkernel.testing import KernelMachine, profiles, scaled
from vmkernel.testing import strategies as vst


class AutoloadMachine(KernelMachine):
    """Every installed plugin, as a user's `vmkernel demo` would load them."""

    autoload = True
    refusals = (CapacityError,)


def test_state_machine_over_installed_plugins():
    # ci profile: 50 examples x 200 steps (stateful_step_count of the profile).
    run_state_machine_as_test(AutoloadMachine, settings=settings(max_examples=scaled(50, minimum=5)))


LAUNCHES = StashKey[list[str]]("leaky")


class LeakyPlugin:
    """Deliberately broken: it forgets to drop VMs from its running set when they stop."""

    name = "leaky"

    @hookimpl
    def vmk_configure(self, kernel):
        kernel.stash[LAUNCHES] = []

    @hookimpl
    def vmk_vm_launch(self, kernel, vm):
        kernel.stash[LAUNCHES].append(vm.id)

    @hookimpl
    def vmk_invariants(self, kernel):
        def matches():
            running = {vm.id for vm in kernel.vms() if vm.state is VMState.RUNNING}
            tracked = set(kernel.stash[LAUNCHES])
            return (
                None if tracked == running else f"tracked {len(tracked)} running, kernel has {len(running)}"
            )

        return [Invariant("leaky.running-set", matches)]


class LeakyMachine(KernelMachine):
    plugins = (LeakyPlugin(),)


def test_state_machine_catches_a_broken_plugin():
    with pytest.raises(InvariantViolation, match=r"leaky\.running-set"):
        run_state_machine_as_test(LeakyMachine, settings=settings(max_examples=200, stateful_step_count=50))


class StateCorruptor:
    """Deliberately broken: changes a VM's state behind the kernel's back."""

    name = "corruptor"

    @hookimpl
    def vmk_tick(self, kernel, now_ns):
        for vm in kernel.vms():
            vm.state = VMState.STOPPED


class CorruptMachine(KernelMachine):
    plugins = (StateCorruptor(),)


def test_kernel_invariant_catches_state_changed_outside_the_journal():
    with pytest.raises((InvariantViolation, AssertionError)):
        run_state_machine_as_test(CorruptMachine, settings=settings(max_examples=200, stateful_step_count=50))


@given(vst.names())
def test_names_are_accepted(name):
    with vmkernel.Kernel(autoload=False) as k:
        assert k.create_vm(name).name == name


@given(vst.bad_names())
def test_bad_names_are_refused(name):
    with vmkernel.Kernel(autoload=False) as k, pytest.raises(InvalidArgument):
        k.create_vm(name)


@given(vst.bad_memory_mib())
def test_bad_memory_is_refused(memory):
    with vmkernel.Kernel(autoload=False) as k, pytest.raises(VmkError):
        k.create_vm("vm", memory_mib=memory)


@given(vst.event_data())
def test_event_data_strategy_is_journalable(data):
    with vmkernel.Kernel(autoload=False) as k:
        k.emit("test.data", "test", **data)
        assert k.journal[-1].data == data


def test_profiles(monkeypatch):
    monkeypatch.setenv(profiles.PROFILE_ENV, "nightly")
    assert scaled(100) == 1000
    monkeypatch.setenv(profiles.PROFILE_ENV, "dev")
    assert scaled(100) == 10
    assert scaled(5, minimum=3) == 3
    monkeypatch.setenv(profiles.PROFILE_ENV, "weekly")
    with pytest.raises(InvalidArgument, match="one of dev, ci, nightly"):
        profiles.active_profile()
    monkeypatch.delenv(profiles.PROFILE_ENV)
    monkeypatch.setenv("CI", "true")
    assert profiles.active_profile() == "ci"


def test_kernel_fixture(kernel, tmp_path):
    assert kernel.data_dir.parent == tmp_path
    assert kernel.create_vm("x").state is VMState.CREATED


def test_make_kernel_fixture_gives_independent_kernels(make_kernel):
    a, b = make_kernel(seed=1, autoload=False), make_kernel(seed=1, autoload=False)
    assert a.data_dir != b.data_dir
    assert a.create_vm("x").id == b.create_vm("x").id
