"""Building Ethernet frames for tests, demos and benchmarks.

Design: one function assembles Ethernet (optional 802.1Q / QinQ tags), IPv4
or IPv6 and a TCP, UDP (optional VXLAN header), SCTP or ICMP header with
correct lengths, so callers state only the fields a rule looks at.  Checksums
are left zero: the pre-filter does not verify them.
"""

from __future__ import annotations

import struct

__all__ = ["build_frame"]

ETHERTYPE_VLAN = 0x8100
ETHERTYPE_QINQ = 0x88A8


def _l4(proto: int, sport: int, dport: int, flags: int, vni: int | None, payload: bytes) -> bytes:
    if proto == 6:
        return (
            struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50 | (flags >> 8 & 1), flags & 0xFF, 65535, 0, 0)
            + payload
        )
    if proto == 17:
        body = payload
        if vni is not None:
            body = struct.pack("!BBHI", 0x08, 0, 0, vni << 8) + payload
        return struct.pack("!HHHH", sport, dport, 8 + len(body), 0) + body
    if proto == 132:
        return struct.pack("!HHII", sport, dport, 0, 0) + payload
    if proto in (1, 58):
        return struct.pack("!BBH", sport & 0xFF, dport & 0xFF, 0) + b"\0\0\0\0" + payload
    return payload


def build_frame(
    src: bytes | str = "10.0.0.1",
    dst: bytes | str = "10.0.0.2",
    *,
    proto: int = 6,
    sport: int = 12345,
    dport: int = 80,
    flags: int = 0x10,
    vlans: tuple[int, ...] = (),
    vni: int | None = None,
    payload: bytes = b"",
) -> bytes:
    """An Ethernet frame; ``src``/``dst`` are 4 or 16 bytes or IP address text."""
    import ipaddress

    s = src if isinstance(src, bytes) else ipaddress.ip_address(src).packed
    d = dst if isinstance(dst, bytes) else ipaddress.ip_address(dst).packed
    if vni is not None and proto == 17 and dport not in (4789, 6081):
        dport = 4789
    l4 = _l4(proto, sport, dport, flags, vni, payload)
    if len(s) == 4:
        ethertype = 0x0800
        l3 = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0, s, d) + l4
    else:
        ethertype = 0x86DD
        l3 = struct.pack("!IHBB16s16s", 0x60000000, len(l4), proto, 64, s, d) + l4
    eth = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01"
    for i, vid in enumerate(vlans):
        tpid = ETHERTYPE_QINQ if i == 0 and len(vlans) > 1 else ETHERTYPE_VLAN
        eth += struct.pack("!HH", tpid, vid & 0x0FFF)
    return eth + struct.pack("!H", ethertype) + l3
