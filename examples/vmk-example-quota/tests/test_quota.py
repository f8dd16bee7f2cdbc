"""Tests of the example plugin, written with the kit vmkernel ships."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test
from vmk_example_quota import plugin

import vmkernel
from vmkernel.errors import AuthorizationDenied, CapacityError, InvalidArgument
from vmkernel.testing import KernelMachine, scaled


def test_quota_refuses_and_rolls_back(make_kernel):
    k = make_kernel(plugins=[plugin], autoload=False, config={plugin.SETTING: 1})
    k.create_vm("a")
    events = len(k.journal)
    with pytest.raises(CapacityError, match="owner operator"):
        k.create_vm("b")
    assert [vm.name for vm in k.vms()] == ["a"]
    assert [e.kind for e in k.journal.events[events:]] == ["op.failed"]


def test_quota_is_per_owner(make_kernel):
    k = make_kernel(plugins=[plugin], autoload=False, config={plugin.SETTING: 1})
    k.add_principal("bob")
    k.create_vm("a")
    k.create_vm("b", principal="bob")
    assert sorted(vm.owner for vm in k.vms()) == ["bob", "operator"]


def test_bad_setting_is_a_typed_error(tmp_path):
    with pytest.raises(InvalidArgument, match=plugin.SETTING):
        vmkernel.Kernel(data_dir=tmp_path, plugins=[plugin], autoload=False, config={plugin.SETTING: "2"})


def test_viewer_cannot_change_vms(make_kernel):
    k = make_kernel(plugins=[plugin], autoload=False)
    k.add_principal("vera", roles=["viewer"])
    vm = k.create_vm("a")
    with pytest.raises(AuthorizationDenied, match="read-only"):
        k.launch_vm(vm, principal="vera")
    assert vm.state is vmkernel.VMState.CREATED


def test_entry_point_loads_the_plugin(make_kernel):
    k = make_kernel()  # autoload: the installed entry point
    assert k.has_plugin("example-quota")


class QuotaMachine(KernelMachine):
    plugins = (plugin,)
    kernel_kwargs = {"config": {plugin.SETTING: 3}}
    refusals = (CapacityError,)


def test_state_machine_keeps_quota():
    run_state_machine_as_test(QuotaMachine, settings=settings(max_examples=scaled(20)))
