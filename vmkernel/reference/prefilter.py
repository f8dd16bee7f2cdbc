"""Pure-Python reference model of the packet pre-filter for service insertion.

Convention: every fast path exists twice with the same names and identical
APIs, errors included: the Rust one in :mod:`vmkernel.fast` and this readable
model in :mod:`vmkernel.reference`.  The reference defines the behaviour; the
differential tests check that the Rust one matches it.

Design: the parser walks the frame forward with named offsets and turns
anything it cannot fully account for into a *reason* (truncated, malformed,
IPv4 options, unknown IPv6 extension header, routing header in transit,
non-first fragment, walk budget, not IP); such frames, and frames no rule
matches, go to the security component on the default service path: the
pre-filter fails closed.  Rules are searched here by a plain linear scan in
precedence order (priority, then id): that scan *is* the definition which the
Rust tuple-space search must reproduce.  Only the security component programs
the flow cache; replacing the rule table bumps the revision and flushes it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

import numpy as np
import numpy.typing as npt

from vmkernel.errors import BufferLayoutError, CaptureError, InvalidArgument, RuleError

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["Prefilter", "PrefilterDecision"]

# ---------------------------------------------------------------------------
# Frame layout (offsets are relative to the header they belong to).

ETH_TYPE_OFF: Final = 12
VLAN_TAG_LEN: Final = 4
MAX_VLAN_TAGS: Final = 2
VLAN_VID_MASK: Final = 0x0FFF
ETHERTYPE_IPV4: Final = 0x0800
ETHERTYPE_IPV6: Final = 0x86DD
ETHERTYPE_VLAN_TAGS: Final = (0x8100, 0x88A8, 0x9100)
ETHERTYPE_NSH: Final = 0x894F

NSH_MIN_LEN: Final = 8
NSH_LEN_OFF: Final = 1
NSH_NEXT_PROTO_OFF: Final = 3
NSH_SP_OFF: Final = 4
NSH_NP_IPV4: Final = 1
NSH_NP_IPV6: Final = 2
NSH_NP_ETHERNET: Final = 3

IPV4_MIN_HDR: Final = 20
IPV4_TOTAL_LEN_OFF: Final = 2
IPV4_FRAG_OFF: Final = 6
IPV4_PROTO_OFF: Final = 9
IPV4_SRC_OFF: Final = 12
IPV4_DST_OFF: Final = 16
IPV4_FLAG_RESERVED: Final = 0x8000
IPV4_FLAG_MF: Final = 0x2000
IPV4_FRAG_OFFSET_MASK: Final = 0x1FFF

IPV6_HDR_LEN: Final = 40
IPV6_PAYLOAD_LEN_OFF: Final = 4
IPV6_NEXT_HDR_OFF: Final = 6
IPV6_SRC_OFF: Final = 8
IPV6_DST_OFF: Final = 24
MAX_EXT_HEADERS: Final = 8
NH_HOP_BY_HOP: Final = 0
NH_ROUTING: Final = 43
NH_FRAGMENT: Final = 44
NH_AH: Final = 51
NH_DEST_OPTS: Final = 60
NH_WALKED: Final = frozenset({NH_HOP_BY_HOP, NH_ROUTING, NH_FRAGMENT, NH_AH, NH_DEST_OPTS})
NH_UNKNOWN_EXT: Final = frozenset({135, 139, 140, 253, 254})
IPV6_FRAG_HDR_LEN: Final = 8

PROTO_ICMP: Final = 1
PROTO_TCP: Final = 6
PROTO_UDP: Final = 17
PROTO_ICMPV6: Final = 58
PROTO_SCTP: Final = 132
TCP_MIN_HDR: Final = 20
TCP_DOFF_OFF: Final = 12
TCP_FLAGS_MASK: Final = 0x01FF
TCP_FIN: Final = 0x01
TCP_SYN: Final = 0x02
TCP_RST: Final = 0x04
UDP_HDR_LEN: Final = 8
SCTP_HDR_LEN: Final = 12
ICMP_MIN_HDR: Final = 4
VXLAN_PORT: Final = 4789
GENEVE_PORT: Final = 6081
TUNNEL_HDR_LEN: Final = 8
TUNNEL_VNI_OFF: Final = 4
VXLAN_FLAG_I: Final = 0x08

NO_VLAN: Final = 0xFFFF
NO_VNI: Final = 0xFFFF_FFFF
V4_MAPPED: Final = 0xFFFF << 32

BYPASS: Final = 0
REDIRECT: Final = 1
DROP: Final = 2
NO_RULE: Final = 0xFFFF_FFFF

DIR_IN: Final = 1
DIR_OUT: Final = 2
DIR_INOUT: Final = 3
MAX_SPI: Final = 0xFF_FFFF
MAX_VNI: Final = 0xFF_FFFF
MAX_VLAN: Final = 4095
MAX_RULES: Final = 1_000_000
DEFAULT_FLOW_CAPACITY: Final = 65_536
MAX_FLOW_CAPACITY: Final = 1 << 24

REASONS: Final = (
    "truncated",
    "malformed",
    "not-ip",
    "vlan-depth",
    "ipv4-options",
    "non-first-fragment",
    "unknown-extension-header",
    "routing-header",
    "header-budget",
    "nsh-si-zero",
)


class _Fail(Exception):
    """Internal: the frame stops parsing for ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _be16(b: bytes, off: int) -> int:
    if off + 2 > len(b):
        raise _Fail("truncated")
    return (b[off] << 8) | b[off + 1]


def _be32(b: bytes, off: int) -> int:
    if off + 4 > len(b):
        raise _Fail("truncated")
    return int.from_bytes(b[off : off + 4], "big")


@dataclass
class _Key:
    family: int
    proto: int = 0
    src: int = 0
    dst: int = 0
    sport: int = 0
    dport: int = 0
    flags: int = 0
    vlan: int = NO_VLAN
    inner_vlan: int = NO_VLAN
    vni: int = NO_VNI
    first_fragment: bool = False

    def is_handshake(self) -> bool:
        return self.proto == PROTO_TCP and self.flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0

    def flow(self) -> tuple[int, ...]:
        a, b = (self.src, self.sport), (self.dst, self.dport)
        if b < a:
            a, b = b, a
        return (a[0], b[0], self.vni, a[1], b[1], self.vlan, self.family, self.proto)


@dataclass
class _Parsed:
    nsh: tuple[int, int] | None
    key: _Key | None
    reason: str | None


def _parse_frame(frame: bytes) -> _Parsed:
    nsh: list[tuple[int, int]] = []
    try:
        key = _parse_ethernet(frame, True, nsh)
    except _Fail as fail:
        return _Parsed(nsh[0] if nsh else None, None, fail.reason)
    return _Parsed(nsh[0] if nsh else None, key, None)


def _parse_ethernet(frame: bytes, allow_nsh: bool, nsh: list[tuple[int, int]]) -> _Key:
    off = ETH_TYPE_OFF
    ethertype = _be16(frame, off)
    vlans = [NO_VLAN] * MAX_VLAN_TAGS
    tags = 0
    while ethertype in ETHERTYPE_VLAN_TAGS:
        if tags == MAX_VLAN_TAGS:
            raise _Fail("vlan-depth")
        vlans[tags] = _be16(frame, off + 2) & VLAN_VID_MASK
        tags += 1
        off += VLAN_TAG_LEN
        ethertype = _be16(frame, off)
    l3 = frame[off + 2 :]
    if ethertype == ETHERTYPE_IPV4:
        key = _parse_ipv4(l3)
    elif ethertype == ETHERTYPE_IPV6:
        key = _parse_ipv6(l3)
    elif ethertype == ETHERTYPE_NSH and allow_nsh:
        return _parse_nsh(l3, nsh)
    else:
        raise _Fail("not-ip")
    key.vlan, key.inner_vlan = vlans
    return key


def _parse_nsh(b: bytes, nsh: list[tuple[int, int]]) -> _Key:
    sp = _be32(b, NSH_SP_OFF)
    spi, si = sp >> 8, sp & 0xFF
    if si == 0:
        raise _Fail("nsh-si-zero")
    nsh.append((spi, si))
    length = (b[NSH_LEN_OFF] & 0x3F) * 4
    if b[0] >> 6 != 0 or length < NSH_MIN_LEN:
        raise _Fail("malformed")
    if length > len(b):
        raise _Fail("truncated")
    inner = b[length:]
    np_ = b[NSH_NEXT_PROTO_OFF]
    if np_ == NSH_NP_IPV4:
        return _parse_ipv4(inner)
    if np_ == NSH_NP_IPV6:
        return _parse_ipv6(inner)
    if np_ == NSH_NP_ETHERNET:
        return _parse_ethernet(inner, False, [])
    raise _Fail("not-ip")


def _parse_ipv4(b: bytes) -> _Key:
    if len(b) < IPV4_MIN_HDR:
        raise _Fail("truncated")
    if b[0] >> 4 != 4:
        raise _Fail("malformed")
    ihl = (b[0] & 0x0F) * 4
    if ihl < IPV4_MIN_HDR:
        raise _Fail("malformed")
    if ihl > IPV4_MIN_HDR:
        raise _Fail("ipv4-options")
    total = _be16(b, IPV4_TOTAL_LEN_OFF)
    if total < ihl:
        raise _Fail("malformed")
    if total > len(b):
        raise _Fail("truncated")
    frag = _be16(b, IPV4_FRAG_OFF)
    if frag & IPV4_FLAG_RESERVED:
        raise _Fail("malformed")
    if frag & IPV4_FRAG_OFFSET_MASK:
        raise _Fail("non-first-fragment")
    key = _Key(family=4, first_fragment=bool(frag & IPV4_FLAG_MF), proto=b[IPV4_PROTO_OFF])
    key.src = V4_MAPPED | _be32(b, IPV4_SRC_OFF)
    key.dst = V4_MAPPED | _be32(b, IPV4_DST_OFF)
    _parse_l4(b[ihl:total], key)
    return key


def _parse_ipv6(b: bytes) -> _Key:
    if len(b) < IPV6_HDR_LEN:
        raise _Fail("truncated")
    if b[0] >> 4 != 6:
        raise _Fail("malformed")
    end = IPV6_HDR_LEN + _be16(b, IPV6_PAYLOAD_LEN_OFF)
    if end > len(b):
        raise _Fail("truncated")
    key = _Key(family=6)
    key.src = int.from_bytes(b[IPV6_SRC_OFF : IPV6_SRC_OFF + 16], "big")
    key.dst = int.from_bytes(b[IPV6_DST_OFF : IPV6_DST_OFF + 16], "big")
    body = b[IPV6_HDR_LEN:end]
    nh = b[IPV6_NEXT_HDR_OFF]
    off = 0
    walked = 0
    seen_fragment = False
    while True:
        if nh in NH_WALKED:
            if walked == MAX_EXT_HEADERS:
                raise _Fail("header-budget")
            if nh == NH_HOP_BY_HOP and walked != 0:
                raise _Fail("malformed")
            if off + 1 >= len(body):
                raise _Fail("truncated")
            ext_len = body[off + 1]
            if nh == NH_AH:
                length = (ext_len + 2) * 4
            elif nh == NH_FRAGMENT:
                length = IPV6_FRAG_HDR_LEN
            else:
                length = (ext_len + 1) * 8
            if off + length > len(body):
                raise _Fail("truncated")
            if nh == NH_ROUTING and body[off + 3] != 0:
                raise _Fail("routing-header")
            if nh == NH_FRAGMENT:
                if seen_fragment:
                    raise _Fail("malformed")
                seen_fragment = True
                fo = _be16(body, off + 2)
                if fo >> 3:
                    raise _Fail("non-first-fragment")
                key.first_fragment = bool(fo & 1)
        elif nh in NH_UNKNOWN_EXT:
            raise _Fail("unknown-extension-header")
        else:
            break
        nh = body[off]
        off += length
        walked += 1
    key.proto = nh
    _parse_l4(body[off:], key)
    return key


def _parse_l4(l4: bytes, key: _Key) -> None:
    proto = key.proto
    if proto == PROTO_TCP:
        if len(l4) < TCP_MIN_HDR:
            raise _Fail("truncated")
        doff = (l4[TCP_DOFF_OFF] >> 4) * 4
        if doff < TCP_MIN_HDR:
            raise _Fail("malformed")
        if doff > len(l4):
            raise _Fail("truncated")
        key.sport, key.dport = _be16(l4, 0), _be16(l4, 2)
        key.flags = _be16(l4, TCP_DOFF_OFF) & TCP_FLAGS_MASK
    elif proto == PROTO_UDP:
        if len(l4) < UDP_HDR_LEN:
            raise _Fail("truncated")
        key.sport, key.dport = _be16(l4, 0), _be16(l4, 2)
        if key.dport in (VXLAN_PORT, GENEVE_PORT):
            tun = l4[UDP_HDR_LEN:]
            if len(tun) < TUNNEL_HDR_LEN:
                raise _Fail("truncated")
            ok = tun[0] & VXLAN_FLAG_I != 0 if key.dport == VXLAN_PORT else tun[0] >> 6 == 0
            if not ok:
                raise _Fail("malformed")
            key.vni = _be32(tun, TUNNEL_VNI_OFF) >> 8
    elif proto == PROTO_SCTP:
        if len(l4) < SCTP_HDR_LEN:
            raise _Fail("truncated")
        key.sport, key.dport = _be16(l4, 0), _be16(l4, 2)
    elif proto in (PROTO_ICMP, PROTO_ICMPV6) and (proto == PROTO_ICMP) == (key.family == 4):
        if len(l4) < ICMP_MIN_HDR:
            raise _Fail("truncated")
        key.sport, key.dport = l4[0], l4[1]


# ---------------------------------------------------------------------------
# Rules.


@dataclass(frozen=True)
class _Rule:
    id: int
    priority: int
    action: str  # "bypass" | "redirect" | "drop"
    spi: int = 0
    si: int = 0
    direction: int = DIR_INOUT
    family: int = 0
    src: int = 0
    src_len: int = 0
    dst: int = 0
    dst_len: int = 0
    sport: tuple[int, int] = (0, 0xFFFF)
    dport: tuple[int, int] = (0, 0xFFFF)
    proto: tuple[int, int] = (0, 0)
    flags: tuple[int, int] = (0, 0)
    vlan: int | None = None
    vni: int | None = None

    def precedence(self) -> tuple[int, int]:
        return (self.priority, self.id)

    def wide_len(self, length: int) -> int:
        return length + 96 if self.family == 4 else length

    def matches(self, key: _Key, direction: int) -> bool:
        src_mask = _mask128(self.wide_len(self.src_len))
        dst_mask = _mask128(self.wide_len(self.dst_len))
        fmask = self.flags[1] & TCP_FLAGS_MASK
        return (
            self.direction & direction != 0
            and (self.family == 0 or self.family == key.family)
            and key.src & src_mask == self.src & src_mask
            and key.dst & dst_mask == self.dst & dst_mask
            and key.proto & self.proto[1] == self.proto[0]
            and self.sport[0] <= key.sport <= self.sport[1]
            and self.dport[0] <= key.dport <= self.dport[1]
            and key.flags & fmask == self.flags[0] & fmask
            and (self.vlan is None or self.vlan == key.vlan)
            and (self.vni is None or self.vni == key.vni)
        )


def _mask128(length: int) -> int:
    return ((1 << 128) - 1) ^ ((1 << (128 - length)) - 1) if length else 0


_DEC = frozenset("0123456789")
_HEX = frozenset("0123456789abcdefABCDEF")
_U64_MAX: Final = (1 << 64) - 1


def _number(tok: str, maximum: int) -> int | None:
    """Decimal or ``0x`` hexadecimal, no sign, no underscores."""
    if tok[:2] in ("0x", "0X"):
        digits, alphabet, base = tok[2:], _HEX, 16
    else:
        digits, alphabet, base = tok, _DEC, 10
    if not digits or not all(c in alphabet for c in digits):
        return None
    trimmed = digits.lstrip("0")
    if len(trimmed) > 20:
        return None
    value = int(trimmed, base) if trimmed else 0
    if value > _U64_MAX:
        return None
    return value if value <= maximum else None


class _Bad(Exception):
    """Internal: a value was rejected; ``expected`` says what would do."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


_PORT_EXP = "a port 0..65535, a range LO-HI with LO <= HI, or any"
_PROTO_EXP = "tcp, udp, icmp, icmpv6, sctp, a number 0..255, VALUE/MASK or any"
_PREFIX_EXP = "an IPv4 or IPv6 address with an optional /LEN, or any"
_PROTO_NAMES: Final = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "sctp": 132}


def _port_range(tok: str) -> tuple[int, int]:
    if tok == "any":
        return (0, 0xFFFF)
    lo_s, _, hi_s = tok.partition("-") if "-" in tok else (tok, "", tok)
    lo, hi = _number(lo_s, 65535), _number(hi_s, 65535)
    if lo is None or hi is None or lo > hi:
        raise _Bad(_PORT_EXP)
    return (lo, hi)


def _value_mask(tok: str, maximum: int) -> tuple[int, int] | None:
    if "/" not in tok:
        return None
    v_s, _, m_s = tok.partition("/")
    v, m = _number(v_s, maximum), _number(m_s, maximum)
    if v is None or m is None:
        return None
    return (v, m)


def _protocol(tok: str) -> tuple[int, int]:
    if tok == "any":
        return (0, 0)
    if tok in _PROTO_NAMES:
        return (_PROTO_NAMES[tok], 0xFF)
    if "/" in tok:
        vm = _value_mask(tok, 255)
        if vm is None:
            raise _Bad(_PROTO_EXP)
        return (vm[0] & vm[1], vm[1])
    n = _number(tok, 255)
    if n is None:
        raise _Bad(_PROTO_EXP)
    return (n, 0xFF)


def _parse_v4(text: str) -> int | None:
    parts = text.split(".")
    if len(parts) != 4:
        return None
    value = 0
    for part in parts:
        if (
            not part
            or len(part) > 3
            or not all(c in _DEC for c in part)
            or (part[0] == "0" and len(part) > 1)
        ):
            return None
        octet = int(part)
        if octet > 255:
            return None
        value = (value << 8) | octet
    return value


def _parse_v6(text: str) -> int | None:
    def groups(s: str) -> list[int] | None:
        if s == "":
            return []
        out = []
        for g in s.split(":"):
            if not g or len(g) > 4 or not all(c in _HEX for c in g):
                return None
            out.append(int(g, 16))
        return out

    if text.count("::") > 1:
        return None
    if "::" in text:
        head_s, _, tail_s = text.partition("::")
        head, tail = groups(head_s), groups(tail_s)
        if head is None or tail is None or len(head) + len(tail) > 7:
            return None
        full = head + [0] * (8 - len(head) - len(tail)) + tail
    else:
        parsed = groups(text)
        if parsed is None or len(parsed) != 8:
            return None
        full = parsed
    value = 0
    for g in full:
        value = (value << 16) | g
    return value


def _prefix(tok: str) -> tuple[int, int, int]:
    """``(family, address in IPv6 form, prefix length)`` of ``ADDR[/LEN]``."""
    a, sep, length_s = tok.partition("/")
    if ":" not in a:
        v4 = _parse_v4(a)
        if v4 is None:
            raise _Bad(_PREFIX_EXP)
        family, raw, maximum = 4, V4_MAPPED | v4, 32
    else:
        v6 = None if ("%" in a or "." in a) else _parse_v6(a)
        if v6 is None:
            raise _Bad(_PREFIX_EXP)
        family, raw, maximum = 6, v6, 128
    if sep:
        if not all(c in _DEC for c in length_s):
            raise _Bad(_PREFIX_EXP)
        n = _number(length_s, maximum)
        if n is None:
            raise _Bad(_PREFIX_EXP)
        length = n
    else:
        length = maximum
    wide = length + 96 if family == 4 else length
    return family, raw & _mask128(wide), length


_DIRECTIONS: Final = {"in": DIR_IN, "out": DIR_OUT, "inout": DIR_INOUT}
_FIELD_NAMES: Final = (
    "prio", "dir", "proto", "src", "dst", "sport", "dport", "flags", "vlan", "vni", "spi", "si", "action",
)  # fmt: skip
_ACTIONS: Final = ("bypass", "redirect", "drop")


class _Builder:
    def __init__(self, rule_id: int, action: str) -> None:
        self.fields: dict[str, Any] = {"id": rule_id, "priority": rule_id, "action": action}
        self.spi: int | None = None
        self.si: int | None = None
        self.src_family = 0
        self.dst_family = 0
        self.seen: set[str] = set()

    def set(self, name: str, value: str) -> None:
        if name not in _FIELD_NAMES:
            raise _Bad("a field name, one of " + ", ".join(_FIELD_NAMES[:12]))
        if name in self.seen:
            raise _Bad(f"{name} given once")
        self.seen.add(name)
        f = self.fields
        if name == "prio":
            n = _number(value, 0xFFFF_FFFF)
            if n is None:
                raise _Bad("a priority 0..4294967295")
            f["priority"] = n
        elif name == "dir":
            if value not in _DIRECTIONS:
                raise _Bad("in, out or inout")
            f["direction"] = _DIRECTIONS[value]
        elif name == "proto":
            f["proto"] = _protocol(value)
        elif name in ("src", "dst"):
            family, addr, length = (0, 0, 0) if value == "any" else _prefix(value)
            other = self.dst_family if name == "src" else self.src_family
            if family and other and family != other:
                raise _Bad("an address of the same family as the other address")
            if name == "src":
                self.src_family = family
            else:
                self.dst_family = family
            f[name], f[name + "_len"] = addr, length
        elif name in ("sport", "dport"):
            f[name] = _port_range(value)
        elif name == "flags":
            if value == "any":
                f["flags"] = (0, 0)
            else:
                vm = _value_mask(value, 0xFFFF)
                if vm is None:
                    raise _Bad("VALUE/MASK with each 0..0xffff, or any")
                f["flags"] = (vm[0] & vm[1], vm[1])
        elif name == "vlan":
            n = None if value == "any" else _number(value, MAX_VLAN)
            if value != "any" and n is None:
                raise _Bad("a VLAN id 0..4095 or any")
            f["vlan"] = n
        elif name == "vni":
            n = None if value == "any" else _number(value, MAX_VNI)
            if value != "any" and n is None:
                raise _Bad("a VNI 0..16777215 or any")
            f["vni"] = n
        elif name == "spi":
            n = _number(value, MAX_SPI)
            if n is None:
                raise _Bad("an SPI 0..16777215")
            self.spi = n
        elif name == "si":
            n = _number(value, 255)
            if n is None or n < 1:
                raise _Bad("an SI 1..255")
            self.si = n
        else:
            raise _Bad("a field name other than action")

    def finish(self) -> _Rule:
        """The rule; raises ``_FieldBad(field, expected)`` when fields do not fit."""
        f = self.fields
        if f["action"] == "redirect":
            if self.spi is None:
                raise _FieldBad("spi", "spi=N on a redirect rule")
            f["spi"], f["si"] = self.spi, 255 if self.si is None else self.si
        elif self.spi is not None:
            raise _FieldBad("spi", "no spi on a bypass or drop rule")
        elif self.si is not None:
            raise _FieldBad("si", "no si on a bypass or drop rule")
        family = max(self.src_family, self.dst_family)
        f["family"] = family
        if family == 4:
            for side in ("src", "dst"):
                if f.get(side + "_len", 0) == 0:
                    f[side] = f.get(side, 0) | V4_MAPPED
        return _Rule(**f)


class _FieldBad(Exception):
    def __init__(self, field: str, expected: str) -> None:
        super().__init__(expected)
        self.field = field
        self.expected = expected


def _lines(text: str) -> Iterator[tuple[int, str]]:
    for i, line in enumerate(text.split("\n")):
        yield i + 1, line[:-1] if line.endswith("\r") else line


def _tokens(line: str) -> list[tuple[int, str]]:
    """Tokens separated by spaces and tabs, with their 1-based columns."""
    out: list[tuple[int, str]] = []
    start: int | None = None
    for i, ch in enumerate(line):
        if ch in " \t":
            if start is not None:
                out.append((start + 1, line[start:i]))
                start = None
        elif start is None:
            start = i
    if start is not None:
        out.append((start + 1, line[start:]))
    return out


def _text_err(line: int, column: int, value: str, expected: str) -> RuleError:
    return RuleError(f"line {line} column {column}", value, expected, line, column)


def _check_count(n: int) -> int:
    if n >= MAX_RULES:
        raise RuleError("rule count", str(n + 1), f"at most {MAX_RULES} rules")
    return n


def _parse_text(text: str) -> list[_Rule]:
    rules: list[_Rule] = []
    for lineno, raw in _lines(text):
        toks = _tokens(raw.split("#", 1)[0])
        if not toks:
            continue
        rule_id = _check_count(len(rules))
        col, word = toks[0]
        if word not in _ACTIONS:
            raise _text_err(lineno, col, word, "bypass, redirect or drop")
        b = _Builder(rule_id, word)
        given: dict[str, tuple[int, str]] = {}
        for tcol, tok in toks[1:]:
            if "=" not in tok:
                raise _text_err(lineno, tcol, tok, "NAME=VALUE")
            name, _, value = tok.partition("=")
            if name in _FIELD_NAMES:
                given[name] = (tcol, tok)
            try:
                b.set(name, value)
            except _Bad as bad:
                raise _text_err(lineno, tcol, tok, bad.expected) from None
        try:
            rules.append(b.finish())
        except _FieldBad as bad:
            at = given.get(bad.field, (col, word))
            raise _text_err(lineno, at[0], at[1], bad.expected) from None
    return rules


def _parse_classbench(text: str, action: str, spi: int, si: int) -> list[_Rule]:
    rules: list[_Rule] = []
    for lineno, raw in _lines(text):
        toks = _tokens(raw)
        if not toks or toks[0][1].startswith("#"):
            continue
        rule_id = _check_count(len(rules))
        col0, first = toks[0]
        if not first.startswith("@"):
            raise _text_err(lineno, col0, first, "a filter line starting with @")
        fields = iter([(col0 + 1, first[1:]), *toks[1:]])

        def take(
            what: str,
            fields: Iterator[tuple[int, str]] = fields,
            at: tuple[int, int] = (lineno, len(raw) + 1),
        ) -> tuple[int, str]:
            try:
                return next(fields)
            except StopIteration:
                raise _text_err(at[0], at[1], "", what) from None

        f: dict[str, Any] = {"id": rule_id, "priority": rule_id, "action": action, "family": 4}
        if action == "redirect":
            f["spi"], f["si"] = spi, si
        for side in ("src", "dst"):
            c, tok = take("a source and a destination prefix")
            try:
                fam, addr, length = _prefix(tok)
            except _Bad as bad:
                raise _text_err(lineno, c, tok, bad.expected) from None
            if fam != 4 or "/" not in tok:
                raise _text_err(lineno, c, tok, "an IPv4 prefix A.B.C.D/LEN")
            f[side], f[side + "_len"] = addr, length
        for side in ("sport", "dport"):
            c, lo = take("a port range LO : HI")
            if ":" in lo:
                lo_s, _, hi_s = lo.partition(":")
                hc = c
            else:
                cs, sep = take("a port range LO : HI")
                if sep != ":":
                    raise _text_err(lineno, cs, sep, ":")
                hc, hi_s = take("a port range LO : HI")
                lo_s = lo
            lo_v = _number(lo_s, 65535)
            if lo_v is None:
                raise _text_err(lineno, c, lo_s, "a port 0..65535")
            hi_v = _number(hi_s, 65535)
            if hi_v is None:
                raise _text_err(lineno, hc, hi_s, "a port 0..65535")
            if lo_v > hi_v:
                raise _text_err(lineno, hc, hi_s, "a high port >= the low port")
            f[side] = (lo_v, hi_v)
        c, p = take("a protocol VALUE/MASK")
        vm = _value_mask(p, 255)
        if vm is None:
            raise _text_err(lineno, c, p, "a protocol VALUE/MASK, each 0..0xff")
        f["proto"] = (vm[0] & vm[1], vm[1])
        extra = next(fields, None)
        if extra is not None:
            c, flags = extra
            vm = _value_mask(flags, 0xFFFF)
            if vm is None:
                raise _text_err(lineno, c, flags, "a flags VALUE/MASK, each 0..0xffff")
            f["flags"] = (vm[0] & vm[1], vm[1])
            extra = next(fields, None)
            if extra is not None:
                raise _text_err(lineno, extra[0], extra[1], "the end of the filter line")
        for side in ("src", "dst"):
            if f[side + "_len"] == 0:
                f[side] |= V4_MAPPED
        rules.append(_Rule(**f))
    return rules


def _json_text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_json(text: str) -> list[_Rule]:
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise RuleError(
            f"JSON line {exc.lineno} column {exc.colno}", exc.msg, "a JSON document", exc.lineno, exc.colno
        ) from None
    except ValueError as exc:
        raise RuleError("JSON", str(exc), "a JSON document") from None
    if isinstance(doc, list):
        items = doc
    elif isinstance(doc, dict) and list(doc) == ["rules"]:
        if not isinstance(doc["rules"], list):
            raise RuleError("rules", _json_text(doc["rules"]), "a list of rule objects")
        items = doc["rules"]
    else:
        raise RuleError("$", _json_text(doc), 'a list of rule objects or {"rules": [...]}')
    rules: list[_Rule] = []
    for i, item in enumerate(items):
        rule_id = _check_count(i)
        path = f"rules[{i}]"
        if not isinstance(item, dict):
            raise RuleError(path, _json_text(item), "a rule object")
        action = item.get("action")
        if not isinstance(action, str) or action not in _ACTIONS:
            raise RuleError(f"{path}.action", _json_text(action), '"bypass", "redirect" or "drop"')
        b = _Builder(rule_id, action)
        for name in sorted(item):
            if name == "action":
                continue
            v = item[name]
            fpath = f"{path}.{name}"
            if isinstance(v, str):
                value = v
            elif _is_u64(v):
                value = str(v)
            elif name in ("sport", "dport") and isinstance(v, list) and len(v) == 2:
                if not (_is_u64(v[0]) and _is_u64(v[1])):
                    raise RuleError(fpath, _json_text(v), "[LO, HI] with integer ports")
                value = f"{v[0]}-{v[1]}"
            else:
                raise RuleError(fpath, _json_text(v), "a string or a non-negative integer")
            if name not in _FIELD_NAMES:
                raise RuleError(fpath, _json_text(v), "no such field; fields are " + ", ".join(_FIELD_NAMES))
            try:
                b.set(name, value)
            except _Bad as bad:
                raise RuleError(fpath, _json_text(v), bad.expected) from None
        try:
            rules.append(b.finish())
        except _FieldBad as bad:
            raise RuleError(f"{path}.{bad.field}", _json_text(item.get(bad.field)), bad.expected) from None
    return rules


def _is_u64(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _U64_MAX


# ---------------------------------------------------------------------------
# Writers.


def _fmt_v6(addr: int) -> str:
    """RFC 5952 text, always hex groups (never a dotted quad)."""
    groups = [(addr >> (112 - 16 * i)) & 0xFFFF for i in range(8)]
    best_start, best_len = 8, 0
    i = 0
    while i < 8:
        if groups[i] == 0:
            start = i
            while i < 8 and groups[i] == 0:
                i += 1
            if i - start > best_len:
                best_start, best_len = start, i - start
        else:
            i += 1

    def hexs(gs: list[int]) -> str:
        return ":".join(f"{g:x}" for g in gs)

    if best_len < 2:
        return hexs(groups)
    return f"{hexs(groups[:best_start])}::{hexs(groups[best_start + best_len :])}"


def _fmt_addr(family: int, addr: int) -> str:
    if family == 4:
        v = addr & 0xFFFF_FFFF
        return ".".join(str((v >> s) & 0xFF) for s in (24, 16, 8, 0))
    return _fmt_v6(addr)


def _fmt_prefix(family: int, addr: int, length: int) -> str:
    return "any" if family == 0 else f"{_fmt_addr(family, addr)}/{length}"


def _fmt_range(r: tuple[int, int]) -> str:
    if r == (0, 0xFFFF):
        return "any"
    return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"


def _write_text(rules: list[_Rule]) -> str:
    out = []
    for r in rules:
        line = f"redirect spi={r.spi} si={r.si}" if r.action == "redirect" else r.action
        line += f" prio={r.priority}"
        if r.direction != DIR_INOUT:
            line += " dir=in" if r.direction == DIR_IN else " dir=out"
        if r.family:
            src = _fmt_prefix(r.family, r.src, r.src_len)
            line += f" src={src} dst={_fmt_prefix(r.family, r.dst, r.dst_len)}"
        if r.proto[1]:
            line += f" proto={r.proto[0]}/{r.proto[1]}"
        line += f" sport={_fmt_range(r.sport)} dport={_fmt_range(r.dport)}"
        if r.flags[1]:
            line += f" flags=0x{r.flags[0]:x}/0x{r.flags[1]:x}"
        if r.vlan is not None:
            line += f" vlan={r.vlan}"
        if r.vni is not None:
            line += f" vni={r.vni}"
        out.append(line + "\n")
    return "".join(out)


def _write_classbench(rules: list[_Rule]) -> str:
    out = []
    for r in sorted(rules, key=_Rule.precedence):
        if r.family == 6 or r.vlan is not None or r.vni is not None or r.direction != DIR_INOUT:
            raise RuleError(
                f"rule {r.id}",
                _write_text([r]).rstrip(),
                "an IPv4 rule for both directions without vlan or vni (ClassBench has no other fields)",
            )
        out.append(
            f"@{_fmt_addr(4, r.src)}/{r.src_len}\t{_fmt_addr(4, r.dst)}/{r.dst_len}\t"
            f"{r.sport[0]} : {r.sport[1]}\t{r.dport[0]} : {r.dport[1]}\t"
            f"0x{r.proto[0]:02x}/0x{r.proto[1]:02x}\t0x{r.flags[0]:04x}/0x{r.flags[1]:04x}\n"
        )
    return "".join(out)


def _write_json(rules: list[_Rule]) -> str:
    out = '{"rules": ['
    for i, r in enumerate(rules):
        out += "\n  {" if i == 0 else ",\n  {"
        if r.action == "redirect":
            out += f'"action": "redirect", "spi": {r.spi}, "si": {r.si}'
        else:
            out += f'"action": "{r.action}"'
        out += f', "prio": {r.priority}'
        d = {DIR_IN: "in", DIR_OUT: "out"}.get(r.direction, "inout")
        out += f', "dir": "{d}"'
        if r.family:
            src = json.dumps(_fmt_prefix(r.family, r.src, r.src_len))
            dst = json.dumps(_fmt_prefix(r.family, r.dst, r.dst_len))
            out += f', "src": {src}, "dst": {dst}'
        if r.proto[1]:
            out += f', "proto": "{r.proto[0]}/{r.proto[1]}"'
        out += f', "sport": [{r.sport[0]}, {r.sport[1]}], "dport": [{r.dport[0]}, {r.dport[1]}]'
        if r.flags[1]:
            out += f', "flags": "0x{r.flags[0]:x}/0x{r.flags[1]:x}"'
        if r.vlan is not None:
            out += f', "vlan": {r.vlan}'
        if r.vni is not None:
            out += f', "vni": {r.vni}'
        out += "}"
    return out + ("]}\n" if not rules else "\n]}\n")


# ---------------------------------------------------------------------------
# Capture files.

PCAP_MAGIC_US: Final = 0xA1B2C3D4
PCAP_MAGIC_NS: Final = 0xA1B23C4D
PCAP_HDR_LEN: Final = 24
PCAP_LINKTYPE_OFF: Final = 20
PCAP_REC_LEN: Final = 16
PCAPNG_SHB: Final = 0x0A0D0D0A
PCAPNG_BOM: Final = 0x1A2B3C4D
PCAPNG_IDB: Final = 1
PCAPNG_PB: Final = 2
PCAPNG_SPB: Final = 3
PCAPNG_EPB: Final = 6
MAX_FRAME: Final = 262_144
MAX_BLOCK: Final = 16 * 1024 * 1024
_LINK_ETHERNET: Final = 1
_LINK_RAW: Final = frozenset({101, 12, 228, 229})
_LINK_LOOPBACK: Final = frozenset({0, 108})
_LINK_SLL: Final = 113
_LINK_SLL2: Final = 276


class _CapFail(Exception):
    def __init__(self, offset: int, problem: str, expected: str) -> None:
        super().__init__(problem)
        self.offset, self.problem, self.expected = offset, problem, expected


def _u32(b: bytes, off: int, little: bool) -> int | None:
    if off + 4 > len(b):
        return None
    return int.from_bytes(b[off : off + 4], "little" if little else "big")


def _u16(b: bytes, off: int, little: bool) -> int | None:
    if off + 2 > len(b):
        return None
    return int.from_bytes(b[off : off + 2], "little" if little else "big")


class _Frames:
    def __init__(self) -> None:
        self.data = bytearray()
        self.offsets: list[int] = []
        self.lengths: list[int] = []

    def push(self, link: int, frame: bytes, at: int) -> None:
        start = len(self.data)

        def ethertype(body: bytes) -> int:
            version = body[0] >> 4 if body else None
            return 0x0800 if version == 4 else 0x86DD if version == 6 else 0xFFFF

        if link == _LINK_ETHERNET:
            self.data += frame
        else:
            if link in _LINK_RAW:
                et, payload = ethertype(frame), frame
            elif link in _LINK_LOOPBACK:
                payload = frame[4:]
                et = ethertype(payload)
            elif link == _LINK_SLL:
                et, payload = (
                    (int.from_bytes(frame[14:16], "big"), frame[16:]) if len(frame) >= 16 else (0xFFFF, frame)
                )
            elif link == _LINK_SLL2:
                et, payload = (
                    (int.from_bytes(frame[0:2], "big"), frame[20:]) if len(frame) >= 20 else (0xFFFF, frame)
                )
            else:
                et, payload = 0xFFFF, frame
            self.data += bytes(12) + et.to_bytes(2, "big") + payload
        if len(self.data) > 0xFFFF_FFFF:
            raise _CapFail(at, "more than 4 GiB of frames", "a capture whose frames fit in 4 GiB")
        self.offsets.append(start)
        self.lengths.append(len(self.data) - start)


def _read_capture_bytes(file: bytes) -> _Frames:
    magic = _u32(file, 0, True)
    if magic is None:
        raise _CapFail(0, f"{len(file)} bytes", "a pcap or pcapng file (at least 4 bytes of magic)")
    if magic == PCAPNG_SHB:
        return _read_pcapng(file)
    swapped = int.from_bytes(magic.to_bytes(4, "little"), "big")
    if magic in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
        little = True
    elif swapped in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
        little = False
    else:
        raise _CapFail(
            0,
            f"magic 0x{magic:08x}",
            "a pcap magic (a1b2c3d4, a1b23c4d) or the pcapng section header 0a0d0d0a",
        )
    if len(file) < PCAP_HDR_LEN:
        raise _CapFail(len(file), "end of file in the pcap header", "a 24-byte pcap header")
    link = (_u32(file, PCAP_LINKTYPE_OFF, little) or 0) & 0x0FFF_FFFF
    frames = _Frames()
    off = PCAP_HDR_LEN
    while off < len(file):
        caplen = _u32(file, off + 8, little)
        if caplen is None or _u32(file, off + 12, little) is None:
            raise _CapFail(off, "end of file in a record header", "a 16-byte record header")
        if caplen > MAX_FRAME:
            raise _CapFail(off + 8, f"captured length {caplen}", f"at most {MAX_FRAME}")
        start = off + PCAP_REC_LEN
        if start + caplen > len(file):
            raise _CapFail(start, f"end of file inside a {caplen}-byte record", "the whole record")
        frames.push(link, file[start : start + caplen], off)
        off = start + caplen
    return frames


def _read_pcapng(file: bytes) -> _Frames:
    frames = _Frames()
    little = True
    ifaces: list[tuple[int, int]] = []
    off = 0
    while off < len(file):
        if _u32(file, off, True) == PCAPNG_SHB:
            if off + 12 > len(file):
                raise _CapFail(off, "end of file in a section header", "a 12-byte section header start")
            bom = _u32(file, off + 8, True)
            assert bom is not None
            if bom == PCAPNG_BOM:
                little = True
            elif int.from_bytes(bom.to_bytes(4, "little"), "big") == PCAPNG_BOM:
                little = False
            else:
                raise _CapFail(off + 8, f"byte-order magic 0x{bom:08x}", "1a2b3c4d in either byte order")
            major = _u16(file, off + 12, little)
            if major is None:
                raise _CapFail(off, "end of file in a section header", "a section header with a version")
            if major != 1:
                minor = _u16(file, off + 14, little) or 0
                raise _CapFail(off + 12, f"section version {major}.{minor}", "pcapng version 1.x")
            ifaces = []
        btype, blen = _u32(file, off, little), _u32(file, off + 4, little)
        if btype is None or blen is None:
            raise _CapFail(off, "end of file in a block header", "an 8-byte block header")
        if blen < 12 or blen % 4 or blen > MAX_BLOCK:
            raise _CapFail(off + 4, f"block length {blen}", f"a multiple of 4 between 12 and {MAX_BLOCK}")
        if off + blen > len(file):
            raise _CapFail(off, f"end of file inside a {blen}-byte block", "the whole block")
        block = file[off : off + blen]
        if _u32(block, blen - 4, little) != blen:
            raise _CapFail(off + blen - 4, "trailing block length differs", f"{blen} (the leading length)")
        body = block[8 : blen - 4]
        if btype == PCAPNG_IDB:
            link16, snap = _u16(body, 0, little), _u32(body, 4, little)
            if link16 is None or snap is None:
                raise _CapFail(off, "short interface description block", "link type and snap length")
            ifaces.append((link16, snap))
        elif btype in (PCAPNG_EPB, PCAPNG_PB):
            iface = _u32(body, 0, little) if btype == PCAPNG_EPB else _u16(body, 0, little)
            caplen = _u32(body, 12, little)
            if iface is None or caplen is None:
                raise _CapFail(off, "short packet block", "a 20-byte packet block header")
            if iface >= len(ifaces):
                raise _CapFail(
                    off + 8, f"interface {iface}", f"one of the {len(ifaces)} interfaces described"
                )
            if caplen > MAX_FRAME or 20 + caplen > len(body):
                raise _CapFail(off + 20, f"captured length {caplen}", "a length within the block")
            frames.push(ifaces[iface][0], body[20 : 20 + caplen], off)
        elif btype == PCAPNG_SPB:
            orig = _u32(body, 0, little)
            if orig is None:
                raise _CapFail(off, "short simple packet block", "a 4-byte original length")
            if not ifaces:
                raise _CapFail(
                    off, "simple packet block before any interface", "an interface description first"
                )
            link, snap = ifaces[0]
            caplen = orig
            if snap:
                caplen = min(caplen, snap)
            caplen = min(caplen, len(body) - 4)
            frames.push(link, body[4 : 4 + caplen], off)
        off += blen
    return frames


# ---------------------------------------------------------------------------
# Buffers.

_BYTES_LIKE = "a bytes-like object"
_U32_EXPECTED = "a buffer of unsigned 32-bit integers (numpy uint32, array('I'), memoryview cast 'I')"
_NATIVE_ORDER = "<" if sys.byteorder == "little" else ">"
_U32_FORMATS = frozenset(
    {"I", "L", "@I", "@L", "=I", f"{_NATIVE_ORDER}I"} | ({"!I"} if sys.byteorder == "big" else set())
)


def _export(obj: object, thing: str, expected: str) -> memoryview:
    try:
        return memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgument(thing, obj, expected) from None


def _bytes_of(view: memoryview, thing: str) -> bytes:
    if not view.c_contiguous:
        raise BufferLayoutError(f"{thing}.c_contiguous", False, "True (a C-contiguous buffer)")
    return view.tobytes() if view.format != "B" or view.ndim != 1 else bytes(view)


def _u32s_of(view: memoryview, thing: str) -> list[int]:
    if view.ndim != 1:
        raise BufferLayoutError(f"{thing}.ndim", view.ndim, "1")
    if view.itemsize != 4:
        raise BufferLayoutError(f"{thing}.itemsize", view.itemsize, f"4 ({_U32_EXPECTED})")
    if view.format not in _U32_FORMATS:
        raise BufferLayoutError(f"{thing}.format", view.format, f"'I' ({_U32_EXPECTED})")
    if not view.c_contiguous:
        raise BufferLayoutError(f"{thing}.c_contiguous", False, "True (a C-contiguous buffer)")
    return view.cast("B").cast("I").tolist()


def _batch(buffer: Buffer, offsets: Buffer, lengths: Buffer) -> tuple[bytes, list[int], list[int]]:
    data = _bytes_of(_export(buffer, "buffer", _BYTES_LIKE), "buffer")
    offs = _u32s_of(_export(offsets, "offsets", _U32_EXPECTED), "offsets")
    lens = _u32s_of(_export(lengths, "lengths", _U32_EXPECTED), "lengths")
    if len(offs) != len(lens):
        raise BufferLayoutError("len(lengths)", len(lens), f"{len(offs)} (len(offsets))")
    for i, (o, n) in enumerate(zip(offs, lens, strict=True)):
        if o + n > len(data):
            raise BufferLayoutError(
                f"offsets[{i}] + lengths[{i}]", o + n, f"at most {len(data)} (len(buffer))"
            )
    return data, offs, lens


def _frame_bytes(frame: Buffer) -> bytes:
    return _bytes_of(_export(frame, "frame", _BYTES_LIKE), "frame")


def _direction(direction: str) -> int:
    if direction == "in":
        return DIR_IN
    if direction == "out":
        return DIR_OUT
    raise InvalidArgument("direction", direction, "'in' or 'out'")


def _int_in(thing: str, value: int, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(thing, value, f"an integer {lo}..{hi}")
    if not lo <= value <= hi:
        raise InvalidArgument(thing, value, f"an integer {lo}..{hi}")
    return value


# ---------------------------------------------------------------------------
# The public classes.


class PrefilterDecision:
    """The pre-filter's answer for one frame: ``verdict`` (0 BYPASS, 1 REDIRECT,
    2 DROP), ``rule_id`` (``2**32 - 1`` for none), ``spi`` and ``si``."""

    __slots__ = ("rule_id", "si", "spi", "verdict")

    def __init__(self, verdict: int, rule_id: int, spi: int, si: int) -> None:
        self.verdict = verdict
        self.rule_id = rule_id
        self.spi = spi
        self.si = si

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrefilterDecision):
            return NotImplemented
        return (self.verdict, self.rule_id, self.spi, self.si) == (
            other.verdict,
            other.rule_id,
            other.spi,
            other.si,
        )

    def __hash__(self) -> int:
        return hash((self.verdict, self.rule_id, self.spi, self.si))

    def __repr__(self) -> str:
        v, r, p, s = self.verdict, self.rule_id, self.spi, self.si
        return f"PrefilterDecision(verdict={v}, rule_id={r}, spi={p}, si={s})"


_FORMATS: Final = ("text", "json", "classbench")
U8Array = npt.NDArray[np.uint8]
U32Array = npt.NDArray[np.uint32]


class Prefilter:
    """Packet pre-filter for service insertion: rules, revision, flow cache.

    ``Prefilter(rules, format)`` installs ``rules`` (text, JSON or ClassBench);
    ``classify`` / ``classify_batch`` / ``classify_pcap`` decide BYPASS,
    REDIRECT (to the security component on a service path) or DROP.
    """

    BYPASS: ClassVar[int] = BYPASS
    REDIRECT: ClassVar[int] = REDIRECT
    DROP: ClassVar[int] = DROP
    NO_RULE: ClassVar[int] = NO_RULE
    REASONS: ClassVar[tuple[str, ...]] = REASONS

    def __init__(
        self,
        rules: str = "",
        format: str = "text",
        *,
        action: str = "bypass",
        spi: int = 1,
        si: int = 255,
        default_spi: int = 1,
        default_si: int = 255,
        flow_capacity: int = DEFAULT_FLOW_CAPACITY,
    ) -> None:
        self._default_spi = _int_in("default_spi", default_spi, 0, MAX_SPI)
        self._default_si = _int_in("default_si", default_si, 1, 255)
        self._capacity = _int_in("flow_capacity", flow_capacity, 0, MAX_FLOW_CAPACITY)
        self._rules: list[_Rule] = self._parse(rules, format, action, spi, si)
        self._order = sorted(self._rules, key=_Rule.precedence)
        self._revision = 0
        self._flows: dict[tuple[int, ...], int] = {}
        self._cache_on = True

    @staticmethod
    def _parse(rules: str, format: str, action: str, spi: int, si: int) -> list[_Rule]:
        if not isinstance(rules, str):
            raise InvalidArgument("rules", rules, "a str")
        if format not in _FORMATS:
            raise InvalidArgument("format", format, "'text', 'json' or 'classbench'")
        if action not in _ACTIONS:
            raise InvalidArgument("action", action, "'bypass', 'redirect' or 'drop'")
        spi = _int_in("spi", spi, 0, MAX_SPI)
        si = _int_in("si", si, 1, 255)
        if format == "text":
            return _parse_text(rules)
        if format == "json":
            return _parse_json(rules)
        return _parse_classbench(rules, action, spi, si)

    @classmethod
    def from_text(cls, text: str, **options: Any) -> Prefilter:
        """A pre-filter with the rules of the text format."""
        return cls(text, "text", **options)

    @classmethod
    def from_json(cls, text: str, **options: Any) -> Prefilter:
        """A pre-filter with the rules of the JSON format."""
        return cls(text, "json", **options)

    @classmethod
    def from_classbench(cls, text: str, **options: Any) -> Prefilter:
        """A pre-filter with ClassBench filter lines (rule id = line index; first line wins)."""
        return cls(text, "classbench", **options)

    def load(
        self, rules: str, format: str = "text", *, action: str = "bypass", spi: int = 1, si: int = 255
    ) -> int:
        """Replaces the rule table atomically; returns the new revision.

        The new rules are parsed and built completely first: on a
        :class:`RuleError` the old table, revision and flow cache are kept.
        """
        parsed = self._parse(rules, format, action, spi, si)
        self._rules = parsed
        self._order = sorted(parsed, key=_Rule.precedence)
        self._revision += 1
        self._flows.clear()
        return self._revision

    @property
    def revision(self) -> int:
        """Bumped by every successful :meth:`load`."""
        return self._revision

    @property
    def default_path(self) -> tuple[int, int]:
        """``(spi, si)`` of fail-closed redirects."""
        return (self._default_spi, self._default_si)

    def __len__(self) -> int:
        return len(self._rules)

    def to_text(self) -> str:
        """The rules in the text format."""
        return _write_text(self._rules)

    def to_json(self) -> str:
        """The rules as JSON."""
        return _write_json(self._rules)

    def to_classbench(self) -> str:
        """The rules as ClassBench filter lines (IPv4, both directions, no VLAN/VNI only)."""
        return _write_classbench(self._rules)

    # -- classification -------------------------------------------------------

    def _lookup(self, key: _Key, direction: int) -> _Rule | None:
        for rule in self._order:
            if rule.matches(key, direction):
                return rule
        return None

    def _classify(self, frame: bytes, direction: int) -> tuple[int, int, int, int]:
        parsed = _parse_frame(frame)
        if parsed.reason == "nsh-si-zero":
            return (DROP, NO_RULE, 0, 0)
        spi, si = (parsed.nsh[0], parsed.nsh[1] - 1) if parsed.nsh else (self._default_spi, self._default_si)
        key = parsed.key
        if key is None:
            return (REDIRECT, NO_RULE, spi, si)
        rule = self._lookup(key, direction)
        rule_id = NO_RULE if rule is None else rule.id
        if rule is not None and rule.action == "bypass":
            return (BYPASS, rule_id, 0, 0)
        if rule is not None and rule.action == "drop":
            return (DROP, rule_id, 0, 0)
        if rule is not None and parsed.nsh is None:
            spi, si = rule.spi, rule.si
        if self._cache_on and not key.is_handshake():
            cached = self._flows.get(key.flow())
            if cached is not None:
                return (cached, rule_id, 0, 0)
        return (REDIRECT, rule_id, spi, si)

    def classify(self, frame: Buffer, direction: str = "out") -> PrefilterDecision:
        """Classifies one Ethernet frame sent (``out``) or received (``in``) by a VM."""
        d = _direction(direction)
        return PrefilterDecision(*self._classify(_frame_bytes(frame), d))

    def classify_batch(
        self, buffer: Buffer, offsets: Buffer, lengths: Buffer, direction: str = "out"
    ) -> tuple[U8Array, U32Array, U32Array, U8Array]:
        """Classifies ``buffer[offsets[i]:offsets[i] + lengths[i]]`` for each ``i``.

        Returns parallel numpy arrays ``(verdicts u8, rule_ids u32, spis u32, sis u8)``.
        """
        d = _direction(direction)
        data, offs, lens = _batch(buffer, offsets, lengths)
        results = [self._classify(data[o : o + n], d) for o, n in zip(offs, lens, strict=True)]
        return _arrays(results)

    def classify_pcap(
        self, path: str | Path, direction: str = "out"
    ) -> tuple[U8Array, U32Array, U32Array, U8Array]:
        """Classifies every frame of a pcap or pcapng file."""
        d = _direction(direction)
        frames = _read_capture(path)
        data = bytes(frames.data)
        results = [
            self._classify(data[o : o + n], d) for o, n in zip(frames.offsets, frames.lengths, strict=True)
        ]
        return _arrays(results)

    @staticmethod
    def read_capture(path: str | Path) -> tuple[bytes, U32Array, U32Array]:
        """Reads a pcap / pcapng file into ``(buffer, offsets, lengths)`` of Ethernet frames."""
        frames = _read_capture(path)
        return (
            bytes(frames.data),
            np.array(frames.offsets, dtype=np.uint32),
            np.array(frames.lengths, dtype=np.uint32),
        )

    @staticmethod
    def parse(frame: Buffer) -> dict[str, Any]:
        """The parsed key of a frame (``reason`` is None when it parsed fully)."""
        parsed = _parse_frame(_frame_bytes(frame))
        out: dict[str, Any] = {
            "reason": parsed.reason,
            "nsh_spi": parsed.nsh[0] if parsed.nsh else None,
            "nsh_si": parsed.nsh[1] if parsed.nsh else None,
        }
        k = parsed.key
        if k is not None:
            size = 4 if k.family == 4 else 16
            out.update(
                family=k.family,
                proto=k.proto,
                src=(k.src & ((1 << (8 * size)) - 1)).to_bytes(size, "big"),
                dst=(k.dst & ((1 << (8 * size)) - 1)).to_bytes(size, "big"),
                sport=k.sport,
                dport=k.dport,
                flags=k.flags,
                vlan=None if k.vlan == NO_VLAN else k.vlan,
                inner_vlan=None if k.inner_vlan == NO_VLAN else k.inner_vlan,
                vni=None if k.vni == NO_VNI else k.vni,
                first_fragment=k.first_fragment,
            )
        return out

    @staticmethod
    def nsh_encap(frame: Buffer, spi: int, si: int) -> bytes:
        """Wraps an Ethernet frame in Ethernet + NSH (MD type 2) on path ``(spi, si)``."""
        data = _frame_bytes(frame)
        spi = _int_in("spi", spi, 0, MAX_SPI)
        si = _int_in("si", si, 0, 255)
        macs = data[:12].ljust(12, b"\0")
        return (
            macs
            + ETHERTYPE_NSH.to_bytes(2, "big")
            + bytes([0x0F, 0xC2, 0x02, NSH_NP_ETHERNET])
            + ((spi << 8) | si).to_bytes(4, "big")
            + data
        )

    # -- flow cache -------------------------------------------------------------

    @property
    def flow_cache(self) -> bool:
        """Whether programmed flows are consulted (their entries are kept when off)."""
        return self._cache_on

    @flow_cache.setter
    def flow_cache(self, on: bool) -> None:
        self._cache_on = bool(on)

    @property
    def flow_count(self) -> int:
        """Number of programmed flows."""
        return len(self._flows)

    @property
    def flow_capacity(self) -> int:
        """Most flows the cache holds."""
        return self._capacity

    def program_flow(self, frame: Buffer, verdict: int) -> bool:
        """The security component's verdict (BYPASS or DROP) for the frame's whole flow.

        Returns False when the frame does not parse or the cache is full.
        """
        if verdict not in (BYPASS, DROP) or isinstance(verdict, bool):
            raise InvalidArgument("verdict", verdict, "Prefilter.BYPASS (0) or Prefilter.DROP (2)")
        key = _parse_frame(_frame_bytes(frame)).key
        return key is not None and self._insert(key, verdict)

    def _insert(self, key: _Key, verdict: int) -> bool:
        flow = key.flow()
        if len(self._flows) >= self._capacity and flow not in self._flows:
            return False
        self._flows[flow] = verdict
        return True

    def evict_flow(self, frame: Buffer) -> bool:
        """Forgets the frame's flow; True when it was programmed."""
        key = _parse_frame(_frame_bytes(frame)).key
        return key is not None and self._flows.pop(key.flow(), None) is not None

    def flush_flows(self) -> int:
        """Forgets every programmed flow; returns how many there were."""
        n = len(self._flows)
        self._flows.clear()
        return n

    def inspect_batch(self, buffer: Buffer, offsets: Buffer, lengths: Buffer) -> U8Array:
        """The default security component: inspects frames, programs the flow cache.

        Returns one verdict per frame, BYPASS (deliver) or DROP.  A frame that is
        IP but does not parse is dropped; non-IP frames are delivered.  A TCP SYN
        approves its flow (later packets bypass inspection), FIN or RST forgets
        it, and the first packet of any non-TCP flow approves that flow.
        """
        data, offs, lens = _batch(buffer, offsets, lengths)
        out = []
        for o, n in zip(offs, lens, strict=True):
            parsed = _parse_frame(data[o : o + n])
            key = parsed.key
            if key is None:
                out.append(BYPASS if parsed.reason == "not-ip" else DROP)
                continue
            if key.proto == PROTO_TCP:
                if key.flags & (TCP_FIN | TCP_RST):
                    self._flows.pop(key.flow(), None)
                elif key.flags & TCP_SYN:
                    self._insert(key, BYPASS)
            else:
                self._insert(key, BYPASS)
            out.append(BYPASS)
        return np.array(out, dtype=np.uint8)

    def __repr__(self) -> str:
        return f"<Prefilter rules={len(self._rules)} revision={self._revision} flows={len(self._flows)}>"


def _arrays(results: list[tuple[int, int, int, int]]) -> tuple[U8Array, U32Array, U32Array, U8Array]:
    n = len(results)
    verdicts = np.empty(n, dtype=np.uint8)
    rule_ids = np.empty(n, dtype=np.uint32)
    spis = np.empty(n, dtype=np.uint32)
    sis = np.empty(n, dtype=np.uint8)
    for i, (v, r, p, s) in enumerate(results):
        verdicts[i], rule_ids[i], spis[i], sis[i] = v, r, p, s
    return verdicts, rule_ids, spis, sis


def _read_capture(path: str | Path) -> _Frames:
    try:
        file = Path(path).read_bytes()
    except OSError as exc:
        raise CaptureError(str(path), 0, f"cannot be read ({exc.strerror})", "a readable file") from None
    try:
        return _read_capture_bytes(file)
    except _CapFail as fail:
        raise CaptureError(str(path), fail.offset, fail.problem, fail.expected) from None
