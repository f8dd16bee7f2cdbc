"""The pre-filter API, run against the Rust class and the pure-Python reference alike."""

from __future__ import annotations

import array
import json
import struct
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from vmk_prefilter import build_frame

import vmkernel.fast
import vmkernel.reference
from vmkernel.errors import BufferLayoutError, CaptureError, InvalidArgument, RuleError

NO_RULE = 2**32 - 1
BYPASS, REDIRECT, DROP = 0, 1, 2


@pytest.fixture(params=[vmkernel.fast, vmkernel.reference], ids=["fast", "reference"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    module: ModuleType = request.param
    return module


def decision(pf: Any, frame: bytes, direction: str = "out") -> tuple[int, int, int, int]:
    d = pf.classify(frame, direction)
    return (d.verdict, d.rule_id, d.spi, d.si)


def layout(frames: list[bytes]) -> tuple[bytes, np.ndarray, np.ndarray]:
    lengths = np.array([len(f) for f in frames], dtype=np.uint32)
    offsets = np.zeros(len(frames), dtype=np.uint32)
    if frames:
        offsets[1:] = np.cumsum(lengths[:-1])
    return b"".join(frames), offsets, lengths


CLASSBENCH = (
    "@10.1.0.0/16\t0.0.0.0/0\t0 : 65535\t80 : 80\t0x06/0xFF\t0x0000/0x0000\n"
    "@10.1.2.0/24\t192.168.0.0/16\t1024 : 65535\t0 : 65535\t0x11/0xFF\t0x0000/0x0000\n"
    "@0.0.0.0/0\t0.0.0.0/0\t0 : 65535\t0 : 65535\t0x00/0x00\t0x0000/0x0000\n"
)


# ---------------------------------------------------------------------------
# The contract: from_classbench, classify, classify_batch.


def test_classbench_contract(impl: ModuleType) -> None:
    pf = impl.Prefilter.from_classbench(CLASSBENCH)
    assert len(pf) == 3
    web = build_frame("10.1.9.9", "8.8.8.8", proto=6, dport=80)
    udp = build_frame("10.1.2.3", "192.168.4.4", proto=17, sport=5000, dport=53)
    other = build_frame("172.16.0.1", "8.8.8.8", proto=6, dport=443)
    v6 = build_frame("2001:db8::1", "2001:db8::2", proto=6, dport=80)
    assert decision(pf, web) == (BYPASS, 0, 0, 0)
    assert decision(pf, udp) == (BYPASS, 1, 0, 0)
    assert decision(pf, other) == (BYPASS, 2, 0, 0)
    # IPv4 ClassBench rules never match IPv6: fail closed on the default path.
    assert decision(pf, v6) == (REDIRECT, NO_RULE, 1, 255)
    verdicts, rule_ids, spis, sis = pf.classify_batch(*layout([web, udp, other, v6, web[:20]]))
    assert verdicts.dtype == np.uint8 and rule_ids.dtype == np.uint32
    assert spis.dtype == np.uint32 and sis.dtype == np.uint8
    assert verdicts.tolist() == [BYPASS, BYPASS, BYPASS, REDIRECT, REDIRECT]
    assert rule_ids.tolist() == [0, 1, 2, NO_RULE, NO_RULE]
    assert spis.tolist() == [0, 0, 0, 1, 1]
    assert sis.tolist() == [0, 0, 0, 255, 255]


def test_first_line_wins_and_redirect_action(impl: ModuleType) -> None:
    pf = impl.Prefilter.from_classbench(CLASSBENCH, action="redirect", spi=77, si=9)
    d = pf.classify(build_frame("10.1.9.9", "8.8.8.8", proto=6, dport=80))
    assert (d.verdict, d.rule_id, d.spi, d.si) == (REDIRECT, 0, 77, 9)
    assert impl.Prefilter.BYPASS == 0 and impl.Prefilter.REDIRECT == 1 and impl.Prefilter.DROP == 2
    assert impl.Prefilter.NO_RULE == NO_RULE


def test_batch_accepts_array_and_memoryview(impl: ModuleType) -> None:
    pf = impl.Prefilter.from_classbench(CLASSBENCH)
    frames = [build_frame("10.1.9.9", "8.8.8.8", dport=80)] * 3
    data, offs, lens = layout(frames)
    out = pf.classify_batch(
        memoryview(data), array.array("I", offs.tolist()), array.array("I", lens.tolist())
    )
    assert out[1].tolist() == [0, 0, 0]
    empty = pf.classify_batch(b"", np.zeros(0, np.uint32), np.zeros(0, np.uint32))
    assert [len(a) for a in empty] == [0, 0, 0, 0]


@pytest.mark.parametrize(
    ("offsets", "lengths", "thing"),
    [
        (np.array([0, 1], np.uint32), np.array([1], np.uint32), "len(lengths)"),
        (np.array([0], np.uint32), np.array([999], np.uint32), "offsets[0] + lengths[0]"),
        (np.array([0], np.uint64), np.array([1], np.uint32), "offsets.itemsize"),
        (np.array([[0]], np.uint32), np.array([1], np.uint32), "offsets.ndim"),
        (np.array([0], np.uint32), np.array([1], np.int32), "lengths.format"),
    ],
)
def test_batch_layout_errors(impl: ModuleType, offsets: Any, lengths: Any, thing: str) -> None:
    pf = impl.Prefilter()
    with pytest.raises(BufferLayoutError) as info:
        pf.classify_batch(b"x" * 64, offsets, lengths)
    assert info.value.thing == thing


def test_argument_errors(impl: ModuleType) -> None:
    pf = impl.Prefilter()
    frame = build_frame()
    for call, thing in [
        (lambda: pf.classify(frame, "sideways"), "direction"),
        (lambda: impl.Prefilter("", "yaml"), "format"),
        (lambda: impl.Prefilter("", action="allow"), "action"),
        (lambda: impl.Prefilter(default_spi=2**24), "default_spi"),
        (lambda: impl.Prefilter(default_si=0), "default_si"),
        (lambda: impl.Prefilter(flow_capacity=-1), "flow_capacity"),
        (lambda: pf.program_flow(frame, 1), "verdict"),
        (lambda: pf.program_flow(frame, True), "verdict"),
        (lambda: pf.classify(12345), "frame"),
        (lambda: impl.Prefilter(42), "rules"),
    ]:
        with pytest.raises(InvalidArgument) as info:
            call()
        assert info.value.thing == thing


# ---------------------------------------------------------------------------
# Rule formats.

TEXT = """\
# web servers get the inspection chain, except the health checker
bypass    dir=out src=10.0.0.7 dport=80 proto=tcp
redirect  spi=100 si=254 dir=out dst=10.0.0.0/8 dport=80-443 proto=tcp
redirect  spi=200 proto=tcp flags=0x02/0x12         # any SYN without ACK
drop      src=2001:db8:bad::/48
bypass    vlan=30 vni=5000
bypass    prio=99 proto=udp dport=53
"""


def test_text_rules_round_trip_and_match(impl: ModuleType) -> None:
    pf = impl.Prefilter.from_text(TEXT)
    assert len(pf) == 6
    assert decision(pf, build_frame("10.0.0.7", "10.9.9.9", dport=80)) == (BYPASS, 0, 0, 0)
    assert decision(pf, build_frame("10.0.0.8", "10.9.9.9", dport=443)) == (REDIRECT, 1, 100, 254)
    # Direction: rules 0 and 1 are outbound only; the SYN rule covers both.
    assert decision(pf, build_frame("10.0.0.8", "10.9.9.9", dport=443), "in")[1] == NO_RULE
    assert decision(pf, build_frame("1.1.1.1", "2.2.2.2", dport=22, flags=0x02), "in") == (
        REDIRECT,
        2,
        200,
        255,
    )
    assert decision(pf, build_frame("1.1.1.1", "2.2.2.2", dport=22, flags=0x12), "in")[1] == NO_RULE
    assert decision(pf, build_frame("2001:db8:bad::5", "2001:db8::1", dport=22)) == (DROP, 3, 0, 0)
    tunneled = build_frame("1.1.1.1", "2.2.2.2", proto=17, vni=5000, vlans=(30,))
    assert decision(pf, tunneled) == (BYPASS, 4, 0, 0)
    for writer, fmt in [(pf.to_text, "text"), (pf.to_json, "json")]:
        again = impl.Prefilter(writer(), fmt)
        assert again.to_text() == pf.to_text()
    assert json.loads(pf.to_json())["rules"][1]["spi"] == 100


def test_json_rules(impl: ModuleType) -> None:
    doc = {
        "rules": [
            {"action": "redirect", "spi": 5, "dst": "10.0.0.0/8", "dport": [80, 90], "proto": "tcp"},
            {"action": "bypass", "dport": 53, "proto": 17, "dir": "inout"},
        ]
    }
    pf = impl.Prefilter.from_json(json.dumps(doc))
    assert decision(pf, build_frame("1.1.1.1", "10.1.1.1", dport=85)) == (REDIRECT, 0, 5, 255)
    assert decision(pf, build_frame("1.1.1.1", "10.1.1.1", proto=17, dport=53)) == (BYPASS, 1, 0, 0)


def test_classbench_writer_round_trip(impl: ModuleType) -> None:
    pf = impl.Prefilter.from_classbench(CLASSBENCH)
    text = pf.to_classbench()
    assert impl.Prefilter.from_classbench(text).to_classbench() == text
    assert text.splitlines()[0] == "@10.1.0.0/16\t0.0.0.0/0\t0 : 65535\t80 : 80\t0x06/0xff\t0x0000/0x0000"
    with pytest.raises(RuleError):
        impl.Prefilter.from_text("bypass src=2001:db8::/32").to_classbench()


@pytest.mark.parametrize(
    ("text", "fmt", "line", "column"),
    [
        ("bypass\nbypass dport=80-70\n", "text", 2, 8),
        ("redirect src=10.0.0.1\n", "text", 1, 1),
        ("bypass spi=4\n", "text", 1, 8),
        ("bypass src=10.0.0.0/33\n", "text", 1, 8),
        ("bypass src=10.0.0.0/8 dst=2001:db8::/32\n", "text", 1, 23),
        ("bypass\tvlan=4096", "text", 1, 8),
        ("bypass vni=16777216", "text", 1, 8),
        ("bypass dport=80 dport=81", "text", 1, 17),
        ("allow", "text", 1, 1),
        ("bypass port=80", "text", 1, 8),
        ("bypass dport", "text", 1, 8),
        ("@1.2.3.4/33 0.0.0.0/0 0 : 1 0 : 1 0x06/0xff", "classbench", 1, 2),
        ("@1.2.3.4/32 0.0.0.0/0 9 : 1 0 : 1 0x06/0xff", "classbench", 1, 27),
        ("@1.2.3.4/32 0.0.0.0/0 0 : 1 0 : 1", "classbench", 1, 34),
        ("1.2.3.4/32 0.0.0.0/0 0 : 1 0 : 1 0x06/0xff", "classbench", 1, 1),
        ("@1.2.3.4/32 0.0.0.0/0 0 : 1 0 : 1 0x06/0xff 0x0/0x0 extra", "classbench", 1, 53),
    ],
)
def test_rule_errors_locate_the_token(impl: ModuleType, text: str, fmt: str, line: int, column: int) -> None:
    with pytest.raises(RuleError) as info:
        impl.Prefilter(text, fmt)
    assert (info.value.line, info.value.column) == (line, column)


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        ('[{"action": "allow"}]', "rules[0].action"),
        ('[{"action": "bypass", "dport": -1}]', "rules[0].dport"),
        ('[{"action": "bypass", "port": 1}]', "rules[0].port"),
        ('[{"action": "redirect"}]', "rules[0].spi"),
        ('{"rules": 3}', "rules"),
        ("[1]", "rules[0]"),
    ],
)
def test_json_rule_errors(impl: ModuleType, doc: str, where: str) -> None:
    with pytest.raises(RuleError) as info:
        impl.Prefilter.from_json(doc)
    assert info.value.where == where


def test_json_syntax_error_has_a_position(impl: ModuleType) -> None:
    with pytest.raises(RuleError) as info:
        impl.Prefilter.from_json('[{"action": }]')
    assert info.value.line == 1 and info.value.column is not None


def test_rejected_update_keeps_table_revision_and_cache(impl: ModuleType) -> None:
    pf = impl.Prefilter.from_text("bypass dport=80")
    frame = build_frame(dport=80)
    other = build_frame(dport=8080)
    assert pf.program_flow(other, BYPASS)
    assert pf.revision == 0
    with pytest.raises(RuleError):
        pf.load("bypass dport=80\nbypass dport=99999")
    assert pf.revision == 0 and len(pf) == 1 and pf.flow_count == 1
    assert decision(pf, frame) == (BYPASS, 0, 0, 0)
    assert pf.load("drop dport=80") == 1
    assert decision(pf, frame) == (DROP, 0, 0, 0)
    assert pf.flow_count == 0  # verdicts made under old rules are forgotten


def test_overlapping_rules_priority_decides(impl: ModuleType) -> None:
    text = (
        "bypass prio=5 dst=10.0.0.0/8 dport=1-1000\n"
        "drop prio=3 dst=10.1.0.0/16 dport=500-2000\n"
        "redirect spi=1 prio=3\n"
    )
    pf = impl.Prefilter.from_text(text)
    assert decision(pf, build_frame(dst="10.1.1.1", dport=700))[:2] == (DROP, 1)
    assert decision(pf, build_frame(dst="10.2.1.1", dport=700))[:2] == (REDIRECT, 2)  # tie: lower id


# ---------------------------------------------------------------------------
# Fail closed: every bad input of the spec goes to the security component or is dropped.

CATCH_ALL = "bypass\n"


def eth(ethertype: int, payload: bytes, tags: tuple[tuple[int, int], ...] = ()) -> bytes:
    head = b"\x02" * 12
    for tpid, vid in tags:
        head += struct.pack("!HH", tpid, vid)
    return head + struct.pack("!H", ethertype) + payload


def ipv4(proto: int, l4: bytes, *, ihl: int = 5, frag: int = 0, total: int | None = None) -> bytes:
    options = b"\x01" * (max(ihl, 5) * 4 - 20)
    length = 20 + len(options) + len(l4) if total is None else total
    head = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        length,
        0,
        frag,
        64,
        proto,
        0,
        bytes([10, 0, 0, 1]),
        bytes([10, 0, 0, 2]),
    )
    return head + options + l4


def ipv6(next_header: int, body: bytes, payload_len: int | None = None) -> bytes:
    n = len(body) if payload_len is None else payload_len
    return (
        struct.pack(
            "!IHBB16s16s",
            0x60000000,
            n,
            next_header,
            64,
            b"\x20\x01\x0d\xb8" + bytes(11) + b"\x01",
            b"\x20\x01\x0d\xb8" + bytes(11) + b"\x02",
        )
        + body
    )


def ext(next_header: int, length_units: int = 0, fill: bytes = b"") -> bytes:
    body = fill.ljust((length_units + 1) * 8 - 2, b"\x01")
    return bytes([next_header, length_units]) + body


def udp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(sport: int, dport: int, flags: int = 0x10) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 0x50, flags, 0, 0, 0)


BAD_INPUTS: dict[str, bytes] = {
    "ipv4 ihl 4": eth(0x0800, ipv4(17, udp(1, 53), ihl=4)),
    "ipv4 ihl 6 (options)": eth(0x0800, ipv4(17, udp(1, 53), ihl=6)),
    "ipv4 total length beyond capture": eth(0x0800, ipv4(17, udp(1, 53), total=200)),
    "ipv4 total length below header": eth(0x0800, ipv4(17, udp(1, 53), total=12)),
    "ipv4 non-first fragment looking like udp/53": eth(0x0800, ipv4(17, udp(1, 53), frag=0x0010)),
    "ipv4 reserved flag": eth(0x0800, ipv4(17, udp(1, 53), frag=0x8000)),
    "ipv4 tiny first fragment": eth(0x0800, ipv4(6, tcp(1, 80)[:8], frag=0x2000)),
    "ipv6 non-first fragment looking like udp/53": eth(
        0x86DD, ipv6(44, bytes([17, 0]) + struct.pack("!HI", 0x0008, 1) + udp(1, 53))
    ),
    "ipv6 hop-by-hop after destination options": eth(0x86DD, ipv6(60, ext(0) + ext(17) + udp(1, 53))),
    "ipv6 routing header with segments left": eth(
        0x86DD, ipv6(43, bytes([17, 2, 0, 1]) + bytes(20) + udp(1, 53))
    ),
    "ipv6 chain beyond the walk budget": eth(
        0x86DD, ipv6(60, b"".join(ext(60) for _ in range(8)) + ext(17) + udp(1, 53))
    ),
    "ipv6 extension length past the end": eth(0x86DD, ipv6(0, bytes([17, 9]) + bytes(6) + udp(1, 53))),
    "ipv6 AH length past the end": eth(0x86DD, ipv6(51, bytes([17, 200]) + bytes(10))),
    "ipv6 unknown extension header (mobility)": eth(0x86DD, ipv6(135, ext(17) + udp(1, 53))),
    "ipv6 unknown extension header (253)": eth(0x86DD, ipv6(253, ext(17) + udp(1, 53))),
    "ipv6 payload length beyond capture": eth(0x86DD, ipv6(17, udp(1, 53), payload_len=500)),
    "ipv6 two fragment headers": eth(
        0x86DD, ipv6(44, bytes([44, 0, 0, 0, 0, 0, 0, 1]) + bytes([17, 0, 0, 0, 0, 0, 0, 1]) + udp(1, 53))
    ),
    "sctp header truncated (next header 132)": eth(0x86DD, ipv6(132, bytes(8))),
    "tcp data offset below 5": eth(0x0800, ipv4(6, tcp(1, 80)[:12] + b"\x40" + tcp(1, 80)[13:])),
    "tcp header truncated": eth(0x0800, ipv4(6, tcp(1, 80)[:15])),
    "udp header truncated": eth(0x0800, ipv4(17, udp(1, 53)[:6])),
    "vxlan header truncated": eth(0x0800, ipv4(17, udp(1, 4789, b"\x08\x00"))),
    "vxlan without the VNI flag": eth(0x0800, ipv4(17, udp(1, 4789, bytes(8)))),
    "three vlan tags": eth(0x0800, ipv4(17, udp(1, 53)), ((0x88A8, 1), (0x8100, 2), (0x8100, 3))),
    "vlan tag truncated": b"\x02" * 12 + b"\x81\x00\x00",
    "not ip (arp)": eth(0x0806, bytes(28)),
    "empty frame": b"",
    "ethernet header only": eth(0x0800, b""),
    "ip version mismatch": eth(0x0800, b"\x65" + ipv4(17, udp(1, 53))[1:]),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_is_never_bypassed(impl: ModuleType, name: str) -> None:
    pf = impl.Prefilter.from_text(CATCH_ALL)
    frame = BAD_INPUTS[name]
    assert decision(pf, frame) == (REDIRECT, NO_RULE, 1, 255), name
    assert impl.Prefilter.parse(frame)["reason"] is not None
    # Programming a bypass for the "flow" is impossible: there is no flow.
    assert not pf.program_flow(frame, BYPASS)
    assert decision(pf, frame)[0] == REDIRECT


def test_forged_extension_headers_do_not_fool_port_rules(impl: ModuleType) -> None:
    # A parser reading the ports at a fixed offset after the IPv6 header would
    # see dport 80 in the hop-by-hop options; the real TCP header says 22.
    rules = "bypass src=::/0 dport=80\nredirect spi=5 src=::/0\n"
    pf = impl.Prefilter.from_text(rules)
    hbh = bytes([60, 0]) + struct.pack("!HH", 1, 80) + b"\x01\x00"
    chain = hbh + ext(51, 0) + bytes([6, 1]) + bytes(10) + tcp(1, 22)  # HBH, DestOpts, AH
    frame = eth(0x86DD, ipv6(0, chain))
    assert impl.Prefilter.parse(frame)["dport"] == 22
    assert decision(pf, frame) == (REDIRECT, 1, 5, 255)


def test_sctp_ports_are_not_tcp_ports(impl: ModuleType) -> None:
    pf = impl.Prefilter.from_text(
        "bypass proto=tcp dport=80\nbypass proto=udp dport=80\nredirect spi=3 proto=sctp dport=80"
    )
    sctp = eth(0x86DD, ipv6(132, struct.pack("!HHII", 1, 80, 0, 0)))
    assert decision(pf, sctp) == (REDIRECT, 2, 3, 255)
    sctp4 = eth(0x0800, ipv4(132, struct.pack("!HHII", 1, 81, 0, 0)))
    assert decision(pf, sctp4) == (REDIRECT, NO_RULE, 1, 255)


def test_vlan_and_qinq(impl: ModuleType) -> None:
    pf = impl.Prefilter.from_text("redirect spi=3 vlan=100\nbypass")
    one = build_frame(vlans=(100,))
    two = build_frame(vlans=(100, 7))
    inner = build_frame(vlans=(7, 100))
    assert decision(pf, one) == (REDIRECT, 0, 3, 255)
    assert decision(pf, two) == (REDIRECT, 0, 3, 255)
    assert decision(pf, inner) == (BYPASS, 1, 0, 0)
    parsed = impl.Prefilter.parse(two)
    assert (parsed["vlan"], parsed["inner_vlan"], parsed["dport"]) == (100, 7, 80)
    # A VLAN-specific bypass does not open untagged traffic.
    pf = impl.Prefilter.from_text("bypass vlan=0")
    assert decision(pf, build_frame())[0] == REDIRECT
    assert decision(pf, build_frame(vlans=(0,)))[0] == BYPASS


def test_truncations_of_a_bypassed_frame_fail_closed(impl: ModuleType) -> None:
    pf = impl.Prefilter.from_text(CATCH_ALL)
    for frame in [build_frame(dport=80), build_frame("2001:db8::1", "2001:db8::2", proto=17, dport=53)]:
        assert decision(pf, frame)[0] == BYPASS
        for n in range(len(frame)):
            assert decision(pf, frame[:n]) == (REDIRECT, NO_RULE, 1, 255), n


def test_nsh_si_counts_down_one_per_hop_and_zero_drops(impl: ModuleType) -> None:
    pf = impl.Prefilter.from_text("redirect spi=9 si=200 dport=80")
    frame = build_frame(dport=80)
    assert decision(pf, frame) == (REDIRECT, 0, 9, 200)
    spi, si = 42, 4
    for _ in range(4):
        d = pf.classify(impl.Prefilter.nsh_encap(frame, spi, si))
        assert (d.verdict, d.spi, d.si) == (REDIRECT, spi, si - 1)
        si = d.si
    assert si == 0
    assert decision(pf, impl.Prefilter.nsh_encap(frame, spi, 0)) == (DROP, NO_RULE, 0, 0)
    assert impl.Prefilter.parse(impl.Prefilter.nsh_encap(frame, spi, 3))["nsh_si"] == 3


def test_flow_cache_programmed_only_by_the_security_component(impl: ModuleType) -> None:
    pf = impl.Prefilter.from_text("redirect spi=4 dport=80")
    syn = build_frame(dport=80, flags=0x02)
    data = build_frame(dport=80, flags=0x18)
    reply = build_frame("10.0.0.2", "10.0.0.1", sport=80, dport=12345, flags=0x18)
    assert decision(pf, data) == (REDIRECT, 0, 4, 255)
    assert pf.program_flow(syn, BYPASS)
    assert decision(pf, data) == (BYPASS, 0, 0, 0)
    assert decision(pf, reply) == (BYPASS, NO_RULE, 0, 0)  # the same flow, other direction
    assert decision(pf, syn) == (REDIRECT, 0, 4, 255)  # handshakes always go to inspection
    pf.flow_cache = False
    assert decision(pf, data)[0] == REDIRECT
    pf.flow_cache = True
    assert pf.evict_flow(reply) and not pf.evict_flow(reply)
    assert decision(pf, data)[0] == REDIRECT
    assert pf.program_flow(data, DROP) and decision(pf, data) == (DROP, 0, 0, 0)
    assert pf.flush_flows() == 1 and pf.flow_count == 0


def test_flow_cache_is_bounded(impl: ModuleType) -> None:
    pf = impl.Prefilter(flow_capacity=2)
    frames = [build_frame(sport=1000 + i) for i in range(3)]
    assert [pf.program_flow(f, BYPASS) for f in frames] == [True, True, False]
    assert pf.flow_count == 2 and pf.flow_capacity == 2
    assert decision(pf, frames[2])[0] == REDIRECT


def test_default_security_component(impl: ModuleType) -> None:
    pf = impl.Prefilter()
    syn = build_frame(dport=443, flags=0x02)
    data = build_frame(dport=443, flags=0x18)
    fin = build_frame(dport=443, flags=0x11)
    dns = build_frame(proto=17, dport=53)
    arp = eth(0x0806, bytes(28))
    broken = BAD_INPUTS["tcp header truncated"]
    verdicts = pf.inspect_batch(*layout([data, syn, dns, arp, broken]))
    assert verdicts.tolist() == [BYPASS, BYPASS, BYPASS, BYPASS, DROP]
    assert pf.flow_count == 2
    assert decision(pf, data)[0] == BYPASS
    pf.inspect_batch(*layout([fin]))
    assert pf.flow_count == 1 and decision(pf, data)[0] == REDIRECT


# ---------------------------------------------------------------------------
# Captures.

DATA = Path(__file__).resolve().parents[1] / "data" / "prefilter"


def test_read_capture_normalises_link_types(impl: ModuleType) -> None:
    buf, offs, lens = impl.Prefilter.read_capture(DATA / "test_loopback.pcap")
    assert len(offs) == len(lens) > 0
    first = buf[offs[0] : offs[0] + lens[0]]
    assert first[12:14] in (b"\x08\x00", b"\x86\xdd")


@pytest.mark.parametrize(
    ("content", "offset"),
    [
        (b"", 0),
        (b"\x00\x01\x02\x03" * 8, 0),
        (
            struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1) + struct.pack("<IIII", 0, 0, 10**6, 10),
            32,
        ),
        (
            struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
            + struct.pack("<IIII", 0, 0, 10, 10)
            + b"abc",
            40,
        ),
        (struct.pack("<IIIHHq", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1) + struct.pack("<I", 32), 24),
        (struct.pack("<IIIHHqI", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1, 28) + struct.pack("<II", 6, 7), 32),
    ],
    ids=["empty", "bad-magic", "huge-record", "short-record", "trailer-mismatch", "block-cut"],
)
def test_bad_captures_raise_capture_error(
    impl: ModuleType, tmp_path: Path, content: bytes, offset: int
) -> None:
    path = tmp_path / "bad.pcap"
    path.write_bytes(content)
    with pytest.raises(CaptureError) as info:
        impl.Prefilter.read_capture(path)
    assert info.value.offset == offset
    with pytest.raises(CaptureError):
        impl.Prefilter().classify_pcap(tmp_path / "missing.pcap")
