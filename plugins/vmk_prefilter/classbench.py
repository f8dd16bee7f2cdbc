"""ClassBench-style ACL rule sets and traffic that exercises them.

Design: ClassBench (Taylor & Turner) generates filter sets from seed
statistics of real rule sets; its ACL seeds are dominated by host and /24
destination prefixes, exact destination ports, a few port ranges
(1024-65535 style) and TCP.  This generator draws from a small hand-made
distribution of that shape (no seed file needed) and writes the standard
ClassBench filter format; :func:`matching_header` draws a packet header that a
given rule matches, which is how ClassBench's trace generator makes traffic.
Everything is seeded, so a rule set is reproducible from ``(n, seed)``.
"""

from __future__ import annotations

import random

__all__ = ["classbench_acl", "matching_header"]

_PORTS = (20, 21, 22, 23, 25, 53, 80, 110, 123, 143, 161, 389, 443, 445, 1433, 1521, 3306, 3389, 8080)
_RANGES = ((1024, 65535), (0, 1023), (6000, 6063), (49152, 65535), (8000, 8999))


def _prefix(
    rng: random.Random, lens: tuple[int, ...], weights: tuple[int, ...], pool: list[int]
) -> tuple[int, int]:
    length = rng.choices(lens, weights)[0]
    base = rng.choice(pool) if pool and rng.random() < 0.7 else rng.getrandbits(32)
    if length < 32:
        base ^= rng.getrandbits(32 - length) if length else 0
    mask = ((1 << 32) - 1) ^ ((1 << (32 - length)) - 1) if length else 0
    return base & mask, length


def _fmt(addr: int, length: int) -> str:
    return f"{addr >> 24 & 255}.{addr >> 16 & 255}.{addr >> 8 & 255}.{addr & 255}/{length}"


def classbench_acl(n: int, seed: int = 1) -> str:
    """``n`` ACL-like rules in the ClassBench filter format (one ``@`` line each)."""
    rng = random.Random(seed)
    # A few "networks" that many rules share, as in real ACLs.
    nets = [rng.getrandbits(32) & 0xFFFFFF00 for _ in range(max(4, n // 40))]
    lines = []
    for _ in range(n):
        src, slen = _prefix(rng, (0, 8, 16, 24, 28, 32), (30, 3, 12, 20, 5, 30), nets)
        dst, dlen = _prefix(rng, (0, 16, 24, 30, 32), (5, 10, 25, 5, 55), nets)
        proto = rng.choices(((6, 0xFF), (17, 0xFF), (1, 0xFF), (0, 0)), (70, 18, 4, 8))[0]
        sport = (0, 65535) if rng.random() < 0.9 else rng.choice(_RANGES)
        roll = rng.random()
        if proto[0] in (6, 17) and roll < 0.65:
            p = rng.choice(_PORTS)
            dport = (p, p)
        elif proto[0] in (6, 17) and roll < 0.85:
            dport = rng.choice(_RANGES)
        else:
            dport = (0, 65535)
        lines.append(
            f"@{_fmt(src, slen)}\t{_fmt(dst, dlen)}\t{sport[0]} : {sport[1]}\t{dport[0]} : {dport[1]}\t"
            f"0x{proto[0]:02x}/0x{proto[1]:02x}\t0x0000/0x0000"
        )
    return "\n".join(lines) + "\n"


def matching_header(line: str, rng: random.Random) -> tuple[str, str, int, int, int]:
    """``(src, dst, proto, sport, dport)`` of a packet that the ClassBench ``line`` matches."""
    fields = line.lstrip("@").replace(" : ", ":").split()
    out_addrs = []
    for field in fields[:2]:
        addr_s, length_s = field.split("/")
        a = [int(x) for x in addr_s.split(".")]
        addr = a[0] << 24 | a[1] << 16 | a[2] << 8 | a[3]
        host_bits = 32 - int(length_s)
        if host_bits:
            addr |= rng.getrandbits(host_bits)
        out_addrs.append(f"{addr >> 24 & 255}.{addr >> 16 & 255}.{addr >> 8 & 255}.{addr & 255}")
    ports = []
    for field in fields[2:4]:
        lo, hi = (int(x) for x in field.split(":"))
        ports.append(rng.randint(lo, hi))
    value, mask = (int(x, 16) for x in fields[4].split("/"))
    proto = value if mask else rng.choice((6, 17, 1))
    return out_addrs[0], out_addrs[1], proto, ports[0], ports[1]
