"""Inbound steering: ``Kernel.deliver_frames`` through the pre-filter plugin (``vmk_frames_in``).

Every test runs on both implementations of the pre-filter (the plugin builds
its instance from ``VMKERNEL_IMPL`` at configure time).  Rules with
``dir=in`` must see only delivered frames, ``dir=out`` only sent ones, and
rules without a direction both; the service table steers each direction on
its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
from test_prefilter_plugin import two_vms  # the same two running VMs as the outbound tests
from vmk_prefilter import build_frame
from vmk_prefilter import plugin as prefilter_plugin

import vmkernel.fast
import vmkernel.reference
from vmkernel import VM, Kernel, hookimpl
from vmkernel.errors import HookFailed, IllegalTransition, InvalidArgument, UnknownResource

NO_RULE = 2**32 - 1
OUTSIDE = "198.51.100.7"


@pytest.fixture(params=["fast", "reference"])
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("VMKERNEL_IMPL", request.param)
    return str(request.param)


@pytest.fixture
def make(make_kernel: Callable[..., Kernel], impl: str) -> Callable[..., Kernel]:
    """Kernels with only the pre-filter plugin (and ``extra`` ones), on the parametrized implementation."""

    def factory(*extra: Any, **kwargs: Any) -> Kernel:
        return make_kernel(plugins=[prefilter_plugin, *extra], autoload=False, **kwargs)

    return factory


@pytest.fixture
def kernel(make: Callable[..., Kernel]) -> Kernel:
    return make()


def invariants(k: Kernel) -> dict[str, str | None]:
    return {inv.name: inv.check() for contributed in k.hook.vmk_invariants(kernel=k) for inv in contributed}


def batches(k: Kernel) -> list[dict[str, Any]]:
    return [dict(e.data) for e in k.journal.events if e.kind == "prefilter.batch"]


def hits(k: Kernel) -> dict[int, int]:
    return {i: n for i, n in prefilter_plugin.state(k).rule_hits.items() if n}


def telnet_in() -> bytes:
    return build_frame(OUTSIDE, "10.0.0.2", dport=23)


def telnet_out() -> bytes:
    return build_frame("10.0.0.2", OUTSIDE, dport=23)


def test_the_plugin_runs_on_the_selected_implementation(kernel: Kernel, impl: str) -> None:
    module = vmkernel.fast if impl == "fast" else vmkernel.reference
    assert type(prefilter_plugin.state(kernel).prefilter) is module.Prefilter


# --------------------------------------------------------------------------- direction of rules


def test_an_in_rule_matches_delivered_frames_and_not_sent_ones(kernel: Kernel) -> None:
    _, server = two_vms(kernel)
    prefilter_plugin.set_service_path(kernel, server, 0, "inout", spi=9)
    prefilter_plugin.load_rules(kernel, "drop dir=in proto=tcp dport=23\nbypass proto=tcp dport=23\n")
    [inbound] = kernel.deliver_frames(server, [telnet_in()])
    assert (inbound["drop"], inbound["bypass"], inbound["delivered"]) == (1, 0, 0)
    assert inbound["direction"] == "in" and inbound["steered"] is True
    assert hits(kernel) == {0: 1}
    [outbound] = kernel.send_frames(server, [telnet_out()])
    assert (outbound["drop"], outbound["bypass"], outbound["delivered"]) == (0, 1, 1)
    assert outbound["direction"] == "out"
    assert hits(kernel) == {0: 1, 1: 1}  # the in-only rule never saw the sent frame
    assert server.id not in prefilter_plugin.state(kernel).inbox  # the dropped frame never arrived
    assert prefilter_plugin.state(kernel).inbox["uplink"] == [telnet_out()]
    assert all(v is None for v in invariants(kernel).values())


def test_an_out_rule_matches_sent_frames_and_not_delivered_ones(kernel: Kernel) -> None:
    _, server = two_vms(kernel)
    prefilter_plugin.set_service_path(kernel, server, 0, "inout", spi=9)
    prefilter_plugin.load_rules(kernel, "drop dir=out proto=tcp dport=23\nbypass proto=tcp dport=23\n")
    [outbound] = kernel.send_frames(server, [telnet_out()])
    assert (outbound["drop"], outbound["bypass"]) == (1, 0)
    assert hits(kernel) == {0: 1}
    [inbound] = kernel.deliver_frames(server, [telnet_in()])
    assert (inbound["drop"], inbound["bypass"], inbound["delivered"]) == (0, 1, 1)
    assert hits(kernel) == {0: 1, 1: 1}
    assert prefilter_plugin.state(kernel).inbox[server.id] == [telnet_in()]
    assert "uplink" not in prefilter_plugin.state(kernel).inbox


@pytest.mark.parametrize("rule", ["drop proto=tcp dport=23", "drop dir=inout proto=tcp dport=23"])
def test_an_inout_rule_matches_both_directions(kernel: Kernel, rule: str) -> None:
    _, server = two_vms(kernel)
    prefilter_plugin.set_service_path(kernel, server, 0, "inout", spi=9)
    prefilter_plugin.load_rules(kernel, rule + "\nbypass proto=tcp\n")
    [inbound] = kernel.deliver_frames(server, [telnet_in()] * 3)
    [outbound] = kernel.send_frames(server, [telnet_out()] * 2)
    assert (inbound["drop"], outbound["drop"]) == (3, 2)
    assert inbound["delivered"] == outbound["delivered"] == 0
    assert hits(kernel) == {0: 5}


def test_rules_without_direction_classify_both_ways_alike(kernel: Kernel) -> None:
    # The same frames and rules give the same verdicts and paths either way.
    _, server = two_vms(kernel)
    prefilter_plugin.set_service_path(kernel, server, 0, "inout", spi=9, si=200)
    prefilter_plugin.load_rules(kernel, "redirect spi=100 proto=tcp dport=80-443\nbypass proto=udp\n")
    frames = [
        build_frame(OUTSIDE, "10.0.0.2", proto=17, dport=53),
        build_frame(OUTSIDE, "10.0.0.2", dport=8080),  # no rule: the NIC's path
        build_frame(OUTSIDE, "10.0.0.2", dport=443, flags=0x18),
        b"\x00" * 20,  # truncated: fail closed
    ]
    [inbound] = kernel.deliver_frames(server, frames)
    prefilter_plugin.state(kernel).prefilter.flush_flows()
    [outbound] = kernel.send_frames(server, frames)
    keys = ("bypass", "redirect", "drop", "spis", "sis")
    assert {k: inbound[k] for k in keys} == {k: outbound[k] for k in keys}
    assert inbound["spis"] == [0, 9, 100, 9] and inbound["sis"] == [0, 200, 255, 200]


# --------------------------------------------------------------------------- the service table


def test_each_direction_is_steered_by_its_own_service_entry(kernel: Kernel) -> None:
    _, server = two_vms(kernel)
    prefilter_plugin.load_rules(kernel, "drop proto=tcp dport=23")
    prefilter_plugin.set_service_path(kernel, server, 0, "in", spi=5)
    [inbound] = kernel.deliver_frames(server, [telnet_in()])
    [outbound] = kernel.send_frames(server, [telnet_out()])
    assert inbound["steered"] is True and inbound["drop"] == 1
    assert outbound["steered"] is False and outbound["delivered"] == 1  # no "out" entry: not steered
    prefilter_plugin.set_service_path(kernel, server, 1, "out", spi=6)
    [inbound_nic1] = kernel.deliver_frames(server, [telnet_in()], nic=1)
    [outbound_nic1] = kernel.send_frames(server, [telnet_out()], nic=1)
    assert inbound_nic1["steered"] is False and outbound_nic1["steered"] is True
    assert [(b["direction"], b["nic"], b["spi"]) for b in batches(kernel)] == [("in", 0, 5), ("out", 1, 6)]


def test_inout_entry_serves_both_directions_and_a_specific_entry_wins(kernel: Kernel) -> None:
    client, _ = two_vms(kernel)
    prefilter_plugin.set_service_path(kernel, client, 0, "inout", spi=9, si=90)
    assert prefilter_plugin.service_path(kernel, client, 0, "in") == (9, 90)
    assert prefilter_plugin.service_path(kernel, client, 0, "out") == (9, 90)
    prefilter_plugin.set_service_path(kernel, client, 0, "in", spi=4, si=40)
    assert prefilter_plugin.service_path(kernel, client, 0, "in") == (4, 40)
    assert prefilter_plugin.service_path(kernel, client, 0, "out") == (9, 90)
    assert prefilter_plugin.service_path(kernel, client, 1, "in") is None
    unruled = build_frame(OUTSIDE, "10.0.0.1", dport=8080)
    [inbound] = kernel.deliver_frames(client, [unruled])
    assert (inbound["spis"], inbound["sis"]) == ([4], [40])  # fail-closed redirect on the "in" path
    for bad in ("inout", "in_out", "both", None):
        with pytest.raises(InvalidArgument) as info:
            prefilter_plugin.service_path(kernel, client, 0, bad)  # type: ignore[arg-type]
        assert info.value.thing == "direction"
    for bad in ("in_out", "IN", "", 1):
        with pytest.raises(InvalidArgument) as info:
            prefilter_plugin.set_service_path(kernel, client, 0, bad, spi=1)  # type: ignore[arg-type]
        assert info.value.thing == "direction"
    kernel.stop_vm(client)
    kernel.destroy_vm(client)
    assert prefilter_plugin.state(kernel).services == {}
    assert invariants(kernel)["prefilter.service-table-valid"] is None


def test_invariant_catches_a_bad_service_direction(kernel: Kernel) -> None:
    client, _ = two_vms(kernel)
    prefilter_plugin.state(kernel).services[(client.id, 0, "sideways")] = (1, 255)
    assert "sideways" in (invariants(kernel)["prefilter.service-table-valid"] or "")


# --------------------------------------------------------------------------- delivery


def test_unsteered_delivery_reaches_the_receiving_vm_whatever_the_address(kernel: Kernel) -> None:
    client, server = two_vms(kernel)
    frame = build_frame(OUTSIDE, "10.0.0.2", dport=80)  # addressed to the server
    [summary] = kernel.deliver_frames(client, [frame])
    assert summary == {"frames": 1, "steered": False, "delivered": 1, "dropped": 0, "to": {client.id: 1}}
    st = prefilter_plugin.state(kernel)
    assert st.inbox[client.id] == [frame] and server.id not in st.inbox
    assert kernel.deliver_frames(client, []) == []  # an empty batch: no summary, no event
    assert batches(kernel) == []
    assert st.by_direction["in"]["unsteered"] == 1 and st.by_direction["out"]["frames"] == 0


def test_inbox_is_bounded(kernel: Kernel) -> None:
    _, server = two_vms(kernel)
    frame = build_frame(OUTSIDE, "10.0.0.2", dport=80)
    kernel.deliver_frames(server, [frame] * (prefilter_plugin.INBOX_LIMIT + 5))
    kernel.deliver_frames(server, [frame])
    assert len(prefilter_plugin.state(kernel).inbox[server.id]) == prefilter_plugin.INBOX_LIMIT
    assert prefilter_plugin.state(kernel).counters["delivered"] == prefilter_plugin.INBOX_LIMIT + 6


# --------------------------------------------------------------------------- the security component


class Recording:
    """A user's security component that records what it sees and passes everything."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, list[bytes]]] = []

    @hookimpl
    def vmk_security_inspect(self, kernel: Kernel, vm: VM, frames: Sequence[bytes]) -> list[int]:
        self.seen.append((vm.name, list(frames)))
        return [0] * len(frames)


def test_the_security_component_sees_inbound_handshakes(make: Callable[..., Kernel]) -> None:
    recording = Recording()
    k = make(recording)
    _, server = two_vms(k)
    prefilter_plugin.set_service_path(k, server, 0, "in", spi=9)
    prefilter_plugin.load_rules(k, "redirect spi=100 dir=in proto=tcp flags=0x02/0x12\nbypass proto=tcp\n")
    syn = build_frame(OUTSIDE, "10.0.0.2", dport=443, flags=0x02)
    data = build_frame(OUTSIDE, "10.0.0.2", dport=443, flags=0x18)
    [summary] = k.deliver_frames(server, [data, syn, data])
    assert recording.seen == [("server", [syn])]  # one call per batch, only the handshake
    assert summary["redirect"] == 1 and summary["spis"] == [0, 100, 0] and summary["delivered"] == 3
    assert prefilter_plugin.state(k).inbox[server.id] == [data, syn, data]


def test_the_default_component_approves_inbound_flows(kernel: Kernel) -> None:
    _, server = two_vms(kernel)
    prefilter_plugin.set_service_path(kernel, server, 0, "inout", spi=9)
    prefilter_plugin.load_rules(kernel, "redirect spi=100 proto=tcp dport=80-443\n")
    syn = build_frame(OUTSIDE, "10.0.0.2", sport=40000, dport=443, flags=0x02)
    data = build_frame(OUTSIDE, "10.0.0.2", sport=40000, dport=443, flags=0x18)
    reply = build_frame("10.0.0.2", OUTSIDE, sport=443, dport=40000, flags=0x18)
    [first] = kernel.deliver_frames(server, [data])
    assert first["redirect"] == 1  # no approved flow yet: inspected
    [handshake] = kernel.deliver_frames(server, [syn])
    assert handshake["redirect"] == 1 and prefilter_plugin.state(kernel).prefilter.flow_count == 1
    [rest] = kernel.deliver_frames(server, [data] * 4)
    assert rest["bypass"] == 4 and rest["redirect"] == 0
    # The flow cache is keyed without direction: the server's replies bypass too.
    [replies] = kernel.send_frames(server, [reply] * 2)
    assert replies["bypass"] == 2 and replies["to"] == {"uplink": 2}
    assert [b["direction"] for b in batches(kernel)] == ["in", "in", "in", "out"]
    assert all(v is None for v in invariants(kernel).values())


class BrokenSecurity:
    @hookimpl
    def vmk_security_inspect(self, kernel: Kernel, vm: VM, frames: Sequence[bytes]) -> Any:
        raise RuntimeError("inspection engine crashed")


@pytest.mark.parametrize(("policy", "delivered"), [("block", 0), ("allow", 2)])
def test_inbound_failure_policy(make: Callable[..., Kernel], policy: str, delivered: int) -> None:
    k = make(BrokenSecurity(), config={"prefilter": {"failure_policy": policy}})
    _, server = two_vms(k)
    prefilter_plugin.set_service_path(k, server, 0, "in", spi=7)
    [summary] = k.deliver_frames(server, [build_frame(OUTSIDE, "10.0.0.2", dport=p) for p in (80, 443)])
    assert summary["delivered"] == delivered and summary["redirect"] == 2
    [event] = batches(k)
    assert event["direction"] == "in" and "inspection engine crashed" in event["failure"]
    assert all(v is None for v in invariants(k).values())


# --------------------------------------------------------------------------- counters, journal, report


def test_counters_split_by_direction_and_add_up(kernel: Kernel) -> None:
    client, server = two_vms(kernel)
    prefilter_plugin.set_service_path(kernel, server, 0, "inout", spi=9)
    prefilter_plugin.load_rules(kernel, "drop dir=in proto=tcp dport=23\nbypass proto=udp\n")
    kernel.deliver_frames(server, [telnet_in(), build_frame(OUTSIDE, "10.0.0.2", proto=17, dport=53)])
    kernel.send_frames(server, [telnet_out()])
    kernel.send_frames(client, [telnet_out()])  # the client is not steered
    st = prefilter_plugin.state(kernel)
    assert st.by_direction["in"]["frames"] == 2 and st.by_direction["in"]["drop"] == 1
    assert st.by_direction["out"]["frames"] == 2 and st.by_direction["out"]["unsteered"] == 1
    assert st.counters["frames"] == 4 and st.counters["drop"] == 1
    assert all(v is None for v in invariants(kernel).values())
    lines = prefilter_plugin.vmk_report(kernel).lines
    assert "inbound: 2 frames (bypass 1, redirect 0, drop 1, unsteered 0)" in lines
    st.by_direction["in"]["frames"] += 1
    assert "inbound" in (invariants(kernel)["prefilter.counters-add-up"] or "")


def test_one_event_per_inbound_batch(kernel: Kernel) -> None:
    _, server = two_vms(kernel)
    prefilter_plugin.set_service_path(kernel, server, 0, "in", spi=9, si=99)
    kernel.deliver_frames(server, [telnet_in()] * 50)
    kernel.deliver_frames(server, [telnet_in()] * 7, nic=0)
    events = batches(kernel)
    assert [(e["frames"], e["direction"], e["spi"], e["si"]) for e in events] == [
        (50, "in", 9, 99),
        (7, "in", 9, 99),
    ]


# --------------------------------------------------------------------------- bad inputs


def test_bad_deliveries_are_typed_and_change_nothing(kernel: Kernel) -> None:
    client, server = two_vms(kernel)
    prefilter_plugin.set_service_path(kernel, server, 0, "in", spi=9)
    st = prefilter_plugin.state(kernel)
    before = (len(kernel.journal), dict(st.counters), dict(st.inbox))
    with pytest.raises(UnknownResource, match="ghost"):
        kernel.deliver_frames("ghost", [telnet_in()])
    for frames, nic, thing in (
        ([telnet_in(), "not bytes"], 0, "frames[1]"),
        ([42], 0, "frames[0]"),
        (telnet_in(), 0, "frames"),
        ([telnet_in()], 256, "nic"),
        ([telnet_in()], -1, "nic"),
        ([telnet_in()], "0", "nic"),
    ):
        with pytest.raises(InvalidArgument) as info:
            kernel.deliver_frames(server, frames, nic=nic)  # type: ignore[arg-type]
        assert info.value.thing == thing
    kernel.stop_vm(client)
    with pytest.raises(IllegalTransition, match="deliver frames"):
        kernel.deliver_frames(client, [telnet_in()])
    assert before == (len(kernel.journal) - 1, dict(st.counters), dict(st.inbox))  # only vm.stop


def test_a_failing_inbound_hook_rolls_the_batch_event_back(make: Callable[..., Kernel]) -> None:
    class Refuse:
        @hookimpl(tryfirst=True)
        def vmk_frames_in(self, kernel: Kernel, vm: VM, nic: int, frames: Sequence[bytes]) -> None:
            raise RuntimeError("link down")

    k = make(Refuse())
    _, server = two_vms(k)
    prefilter_plugin.set_service_path(k, server, 0, "in", spi=9)
    with pytest.raises(HookFailed) as info:
        k.deliver_frames(server, [telnet_in()])
    assert info.value.operation == "net.deliver" and info.value.hook == "vmk_frames_in"
    assert batches(k) == []
    assert k.journal.events[-1].kind == "op.failed"
    assert k.journal.events[-1].data["operation"] == "net.deliver"
