"""The threat-rule program format: encoding, decoding and verification.

Design: a program is one self-contained, versioned byte string (so rules can
be stored, hashed and shipped), decoded and verified in one pass.  The Rust
loader (``rust_core/vmk-core/src/rulevm/program.rs``) mirrors this module
check for check, in the same order, so both reject the same bytes with the
same ``(code, pc)``.  Layout (little-endian)::

    "VMKR"  u16 version  u16 flags
    str name            u32 n, n x u32 context (group-by) field index
    u32 n, n x const    (u8 tag; str / i64 / regex str / cidr str / u32 k, k x str)
    u32 n, n x str      field names
    u32 n, n x str      event types the rule listens to (empty = every type)
    u32 n, n x str      names of rules it may launch
    u32 n, n x str      tags (free text: "level:high", "action:stop-vm")
    u32 n, n x (u32 field, str literal)   pre-filter literals
    u32 n, n x 16-byte instruction (u8 op, u8 r, u16 x, u32 a, u64 imm)

where ``str`` is ``u32 length`` + UTF-8.  The verifier accepts a program only
if every jump is strictly forward and inside the code, the last instruction
is HALT (so every path ends in HALT or WAIT), every register is written on
every path before it is read, constants have the kind their instruction
needs and stay within the caps below, regexes compile and have no nested
unbounded repetition, and timeouts are in ``1..=MAX_TIMEOUT_NS``.  Forward
jumps bound each run between WAITs by ``len(code)`` steps: fuel is counted in
instructions, never in wall-clock time.

Aggregates (format version 2): ``AGG`` adds the event to a per-context
counter slot (events, or distinct text values of a register) over a time
window and writes the count, saturated at the instruction's cap, to a
register; ``RESET`` clears a sliding slot; a deferred slot is a window that
opens at its first event, and ``WINDOW`` ends the run and resumes it at the
next instruction when the window closes, with the final count in a register.
Every instruction naming a slot must agree on its kind, cap and window (the
verifier checks this in pc order), so a slot's state has one shape and at
most ``cap`` entries.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from vmkernel.errors import VerifyError, VersionMismatch

__all__ = [
    "AGG_DEFERRED",
    "AGG_DISTINCT",
    "ANY_TYPES",
    "HALT_VERDICTS",
    "MAGIC",
    "MAX_AGG_CAP",
    "MAX_CODE",
    "MAX_GROUP",
    "MAX_TIMEOUT_NS",
    "OPCODES",
    "VERSION",
    "Const",
    "Instr",
    "Program",
    "catastrophic_regex",
    "decode",
    "encode",
    "parse_cidr",
    "verify",
]

MAGIC = b"VMKR"
VERSION = 2
FLAG_SILENT = 1
FLAG_LAUNCHED = 2
NO_INDEX = 0xFFFFFFFF
ANY_TYPES = NO_INDEX

# Caps (the Rust loader uses the same numbers).
MAX_CODE = 4096
MAX_CONSTS = 65536
MAX_STR = 65536
MAX_LIST = 65536
MAX_REGEX = 4096
MAX_FIELDS = 4096
MAX_TYPES = 1024
MAX_LAUNCH = 256
MAX_TAGS = 256
MAX_PREFILTER = 65536
MAX_COUNT = 4096
MAX_SLOTS = 16
MAX_AGG_CAP = MAX_COUNT + 1  # enough to decide any comparison with a threshold up to MAX_COUNT
MAX_GROUP = 16  # context (group-by) fields
NREGS = 16
MAX_TIMEOUT_NS = 1 << 62

K_STR, K_INT, K_REGEX, K_CIDR, K_LIST = 1, 2, 3, 4, 5
KIND_NAMES = {K_STR: "str", K_INT: "int", K_REGEX: "regex", K_CIDR: "cidr", K_LIST: "list"}

# Opcodes.
LOADF, LOADCTX, LOADTYPE, LOADK = 0x01, 0x02, 0x03, 0x04
EQ, PREFIX, SUFFIX, CONTAINS, GLOB, REGEX, CMP, CIDR = 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17
EXISTS, ISNULL, INSET, ANYOF, ISTYPE = 0x18, 0x19, 0x1A, 0x1B, 0x1C
NOT, JMP, JT, JF = 0x20, 0x21, 0x22, 0x23
WAIT, LAUNCH, COUNT, HALT = 0x30, 0x31, 0x32, 0x3F
AGG, WINDOW, RESET = 0x33, 0x34, 0x35
# AGG's x operand: bits 0-3 slot, bits 4-7 value register, then these flags.
AGG_DISTINCT = 0x100  # count distinct text values of the value register (else: events)
AGG_DEFERRED = 0x200  # a window opened by its first event, decided when it closes (else: sliding)

OPCODES: dict[int, str] = {
    LOADF: "loadf",
    LOADCTX: "loadctx",
    LOADTYPE: "loadtype",
    LOADK: "loadk",
    EQ: "eq",
    PREFIX: "prefix",
    SUFFIX: "suffix",
    CONTAINS: "contains",
    GLOB: "glob",
    REGEX: "regex",
    CMP: "cmp",
    CIDR: "cidr",
    EXISTS: "exists",
    ISNULL: "isnull",
    INSET: "inset",
    ANYOF: "anyof",
    ISTYPE: "istype",
    NOT: "not",
    JMP: "jmp",
    JT: "jt",
    JF: "jf",
    WAIT: "wait",
    LAUNCH: "launch",
    COUNT: "count",
    AGG: "agg",
    WINDOW: "window",
    RESET: "reset",
    HALT: "halt",
}
MONITOR, MATCH, NO_MATCH = 0, 1, 2
HALT_VERDICTS = ("monitor", "match", "no-match")
CMP_OPS = ("lt", "le", "gt", "ge")

FLAG_BIT = 1 << NREGS  # the test flag, tracked like a register by the verifier
_INSTR = struct.Struct("<BBHIQ")
INSTR_SIZE = _INSTR.size


@dataclass(frozen=True, slots=True)
class Const:
    """A constant-pool entry: ``kind`` is one of K_STR, K_INT, K_REGEX, K_CIDR, K_LIST."""

    kind: int
    value: Any  # str | int | tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Instr:
    op: int
    r: int = 0
    x: int = 0
    a: int = 0
    imm: int = 0


@dataclass(slots=True)
class Program:
    """A decoded (and, from :func:`decode`, verified) program."""

    name: str
    code: list[Instr]
    consts: list[Const] = field(default_factory=list)
    fields: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    launches: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    prefilter: list[tuple[int, str]] = field(default_factory=list)
    context: list[int] = field(default_factory=list)  # group-by field indices (empty: none)
    silent: bool = False
    launched: bool = False
    version: int = VERSION

    @property
    def context_fields(self) -> list[str]:
        return [self.fields[i] for i in self.context]


# --------------------------------------------------------------------------- encoding


def _str(out: bytearray, s: str) -> None:
    raw = s.encode("utf-8", "surrogatepass")
    out += struct.pack("<I", len(raw))
    out += raw


def encode(p: Program) -> bytes:
    """The bytes of ``p`` (not verified: :func:`decode` the result to check it)."""
    out = bytearray(MAGIC)
    out += struct.pack(
        "<HH", p.version, (FLAG_SILENT if p.silent else 0) | (FLAG_LAUNCHED if p.launched else 0)
    )
    _str(out, p.name)
    out += struct.pack("<I", len(p.context))
    for fid in p.context:
        out += struct.pack("<I", fid)
    out += struct.pack("<I", len(p.consts))
    for c in p.consts:
        out.append(c.kind)
        if c.kind == K_INT:
            out += struct.pack("<q", c.value)
        elif c.kind == K_LIST:
            out += struct.pack("<I", len(c.value))
            for item in c.value:
                _str(out, item)
        else:
            _str(out, c.value)
    for table in (p.fields, p.types, p.launches, p.tags):
        out += struct.pack("<I", len(table))
        for s in table:
            _str(out, s)
    out += struct.pack("<I", len(p.prefilter))
    for fid, lit in p.prefilter:
        out += struct.pack("<I", fid)
        _str(out, lit)
    out += struct.pack("<I", len(p.code))
    for ins in p.code:
        out += _INSTR.pack(ins.op, ins.r, ins.x, ins.a, ins.imm)
    return bytes(out)


# --------------------------------------------------------------------------- decoding


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise VerifyError(
                "truncated",
                -1,
                f"{what} needs {n} bytes at offset {self.pos}, only {len(self.data) - self.pos} left",
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "little")

    def u32(self, what: str) -> int:
        return int.from_bytes(self.take(4, what), "little")

    def i64(self, what: str) -> int:
        return int.from_bytes(self.take(8, what), "little", signed=True)

    def count(self, what: str, cap: int) -> int:
        n = self.u32(what)
        if n > cap:
            raise VerifyError("too-large", -1, f"{what} is {n}, expected at most {cap}")
        return n

    def str(self, what: str, cap: int = MAX_STR) -> str:
        n = self.u32(f"length of {what}")
        if n > cap:
            raise VerifyError("too-large", -1, f"length of {what} is {n}, expected at most {cap}")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise VerifyError("bad-utf8", -1, f"{what} is not valid UTF-8") from None


def _bound(digits: str) -> int:
    """A repetition bound; absurdly long ones just count as large."""
    return int(digits) if 0 < len(digits) <= 9 else (0 if digits == "" else 10**9)


def catastrophic_regex(pattern: str) -> bool:
    """True when a repeated group contains a repetition (``(a+)+``): exponential in backtracking engines.

    A repetition is ``*``, ``+`` or ``{m,n}`` with an upper bound above 1 (or none).
    """
    stack: list[bool] = [False]  # per open group: does it contain a repetition?
    i, n = 0, len(pattern)

    def repeat_at(j: int) -> tuple[bool, int]:
        """Whether a quantifier at j repeats, and where it ends."""
        if j >= n:
            return False, j
        c = pattern[j]
        if c in "*+":
            return True, j + 1
        if c == "?":
            return False, j + 1
        if c == "{":
            k = j + 1
            while k < n and pattern[k] in "0123456789,":
                k += 1
            if k < n and pattern[k] == "}" and k > j + 1 and pattern[j + 1 : k].count(",") <= 1:
                low, comma, high = pattern[j + 1 : k].partition(",")
                if not comma:
                    return _bound(low) > 1, k + 1
                if high == "":
                    return low != "", k + 1
                return _bound(high) > 1, k + 1
        return False, j

    while i < n:
        c = pattern[i]
        if c == "\\":
            i += 2
            rep, i = repeat_at(i)
            if rep:
                stack[-1] = True
            continue
        if c == "[":
            i += 1
            if i < n and pattern[i] == "^":
                i += 1
            if i < n and pattern[i] == "]":
                i += 1
            while i < n and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
            i += 1
            rep, i = repeat_at(i)
            if rep:
                stack[-1] = True
            continue
        if c == "(":
            stack.append(False)
            i += 1
            continue
        if c == ")":
            inner = stack.pop() if len(stack) > 1 else False
            rep, i = repeat_at(i + 1)
            if rep and inner:
                return True
            if rep or inner:
                stack[-1] = True
            continue
        rep, j = repeat_at(i)
        if j != i:  # a quantifier (possibly lazy '?') following the previous atom
            if rep:
                stack[-1] = True
            i = j
            continue
        i += 1
        rep, i = repeat_at(i)
        if rep:
            stack[-1] = True
    return False


def check_regex(pattern: str) -> str | None:
    """Why ``pattern`` is refused, or None."""
    if len(pattern) > MAX_REGEX:
        return f"regex of {len(pattern)} characters, expected at most {MAX_REGEX}"
    if catastrophic_regex(pattern):
        return f"regex {pattern!r} repeats a group that itself repeats, expected no nested repetition"
    return None


def parse_cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """``addr/prefix`` with a plain prefix length; host bits are ignored.  None if malformed."""
    addr, sep, prefix = text.partition("/")
    if not sep or "/" in prefix or "%" in addr or not prefix.isascii() or not prefix.isdigit():
        return None
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    bits = int(prefix) if len(prefix) <= 3 else 999
    if bits > ip.max_prefixlen:
        return None
    return ipaddress.ip_network(f"{ip}/{bits}", strict=False)


def decode(data: bytes) -> Program:
    """Decode and verify one program; raises :class:`VerifyError` (or :class:`VersionMismatch`)."""
    rd = _Reader(bytes(data))
    if len(rd.data) < 4:
        raise VerifyError("truncated", -1, f"{len(rd.data)} bytes, expected at least the 4-byte magic")
    if rd.take(4, "magic") != MAGIC:
        raise VerifyError("bad-magic", -1, f"magic {rd.data[:4]!r}, expected {MAGIC!r}")
    version = rd.u16("version")
    if version != VERSION:
        raise VersionMismatch("version", -1, f"program version {version}, expected {VERSION}")
    flags = rd.u16("flags")
    if flags & ~(FLAG_SILENT | FLAG_LAUNCHED):
        raise VerifyError(
            "bad-flags", -1, f"flags {flags:#x}, expected only bits 0x1 (silent) and 0x2 (launched)"
        )
    name = rd.str("rule name", 1024)
    context = [rd.u32(f"context field {j}") for j in range(rd.count("context field count", MAX_GROUP))]
    consts: list[Const] = []
    for i in range(rd.count("constant count", MAX_CONSTS)):
        tag = rd.u8(f"tag of constant {i}")
        if tag == K_STR:
            consts.append(Const(K_STR, rd.str(f"constant {i}")))
        elif tag == K_INT:
            consts.append(Const(K_INT, rd.i64(f"constant {i}")))
        elif tag == K_REGEX:
            pat = rd.str(f"constant {i}")
            why = check_regex(pat)
            if why is not None:
                err = "regex-too-large" if len(pat) > MAX_REGEX else "regex-catastrophic"
                raise VerifyError(err, -1, f"constant {i}: {why}")
            try:
                re.compile(pat)
            except (re.error, OverflowError, RecursionError) as exc:
                raise VerifyError(
                    "regex-invalid", -1, f"constant {i}: regex {pat!r} does not compile ({exc})"
                ) from None
            consts.append(Const(K_REGEX, pat))
        elif tag == K_CIDR:
            text = rd.str(f"constant {i}")
            if parse_cidr(text) is None:
                raise VerifyError("bad-cidr", -1, f"constant {i}: {text!r}, expected address/prefix-length")
            consts.append(Const(K_CIDR, text))
        elif tag == K_LIST:
            k = rd.count(f"length of constant {i}", MAX_LIST)
            consts.append(Const(K_LIST, tuple(rd.str(f"item {j} of constant {i}") for j in range(k))))
        else:
            raise VerifyError("bad-const", -1, f"constant {i} has tag {tag}, expected 1..5")
    tables: list[list[str]] = []
    for what, cap in (("field", MAX_FIELDS), ("type", MAX_TYPES), ("launch", MAX_LAUNCH), ("tag", MAX_TAGS)):
        n = rd.count(f"{what} count", cap)
        tables.append([rd.str(f"{what} {j}", 1024 if what != "tag" else MAX_STR) for j in range(n)])
    fields, types, launches, tags = tables
    prefilter: list[tuple[int, str]] = []
    for j in range(rd.count("pre-filter count", MAX_PREFILTER)):
        fid = rd.u32(f"field of pre-filter {j}")
        if fid >= len(fields):
            raise VerifyError(
                "bad-field", -1, f"pre-filter {j} names field {fid}, expected below {len(fields)}"
            )
        prefilter.append((fid, rd.str(f"pre-filter {j}")))
    n_code = rd.u32("code length")
    if n_code == 0:
        raise VerifyError("empty-code", 0, "a program without instructions, expected at least a HALT")
    if n_code > MAX_CODE:
        raise VerifyError("too-large", -1, f"{n_code} instructions, expected at most {MAX_CODE}")
    raw = rd.take(n_code * INSTR_SIZE, "code")
    if rd.pos != len(rd.data):
        raise VerifyError(
            "trailing-bytes", -1, f"{len(rd.data) - rd.pos} bytes after the code, expected none"
        )
    for j, fid in enumerate(context):
        if fid >= len(fields):
            raise VerifyError("bad-field", -1, f"context field {j} is {fid}, expected below {len(fields)}")
    code = [Instr(*_INSTR.unpack_from(raw, pc * INSTR_SIZE)) for pc in range(n_code)]
    prog = Program(
        name=name,
        code=code,
        consts=consts,
        fields=fields,
        types=types,
        launches=launches,
        tags=tags,
        prefilter=prefilter,
        context=context,
        silent=bool(flags & FLAG_SILENT),
        launched=bool(flags & FLAG_LAUNCHED),
    )
    verify_code(prog)
    return prog


def verify(data: bytes) -> Program:
    """Decode with this loader and load with the Rust one too (its regex engine has its own size
    limits), so a program that leaves a compiler loads in both engines."""
    prog = decode(data)
    try:
        from vmkernel.fast import RuleEngine
    except ImportError:  # the extension is not built: this loader decided
        return prog
    try:
        RuleEngine([data])
    except VerifyError as exc:
        if exc.code not in _SET_LEVEL:  # launch targets are checked when the rule set is loaded
            raise
    return prog


_SET_LEVEL = ("unknown-launch-target", "launch-target", "launch-cycle")


def _fail(code: str, pc: int, reason: str) -> VerifyError:
    return VerifyError(code, pc, reason)


def verify_code(p: Program) -> None:
    """The code checks (see the module note); raises the first failure in pc order."""
    code, n = p.code, len(p.code)
    incoming: list[int | None] = [None] * (n + 1)
    incoming[0] = 0
    all_defined = (1 << (NREGS + 1)) - 1

    def merge(target: int, mask: int) -> None:
        cur = incoming[target]
        incoming[target] = mask if cur is None else cur & mask

    def const_of(pc: int, ins: Instr, kinds: tuple[int, ...]) -> Const:
        if ins.a >= len(p.consts):
            raise _fail("const-missing", pc, f"constant {ins.a}, expected below {len(p.consts)}")
        c = p.consts[ins.a]
        if c.kind not in kinds:
            want = " or ".join(KIND_NAMES[k] for k in kinds)
            raise _fail("const-type", pc, f"constant {ins.a} is a {KIND_NAMES[c.kind]}, expected a {want}")
        return c

    def timeout(pc: int, value: int) -> None:
        if not 1 <= value <= MAX_TIMEOUT_NS:
            raise _fail("bad-timeout", pc, f"timeout {value} ns, expected 1..={MAX_TIMEOUT_NS}")

    # slot -> (kind, flags, cap, window) of the first instruction that names it (0 count, 1 agg)
    slots: dict[int, tuple[int, int, int, int]] = {}

    def slot_use(pc: int, slot: int, sig: tuple[int, int, int, int]) -> None:
        have = slots.setdefault(slot, sig)
        if have != sig:
            raise _fail(
                "bad-counter",
                pc,
                f"slot {slot} was used with another kind, cap or window before, expected one per slot",
            )

    def slot_of(pc: int, slot: int) -> tuple[int, int, int, int] | None:
        if slot >= MAX_SLOTS:
            raise _fail("bad-counter", pc, f"counter slot {slot}, expected below {MAX_SLOTS}")
        return slots.get(slot)

    for pc, ins in enumerate(code):
        op = ins.op
        if op not in OPCODES:
            raise _fail(
                "bad-opcode", pc, f"opcode {op:#04x}, expected one of the {len(OPCODES)} known opcodes"
            )
        mask = incoming[pc]
        if mask is None:
            mask = all_defined  # unreachable: never runs
        uses = 0
        defs = 0
        if op in (LOADF, LOADCTX, LOADTYPE):
            if ins.r >= NREGS:
                raise _fail("bad-register", pc, f"register {ins.r}, expected below {NREGS}")
            if op == LOADF and ins.a >= len(p.fields):
                raise _fail("bad-field", pc, f"field {ins.a}, expected below {len(p.fields)}")
            if ins.x or ins.imm or (op != LOADF and ins.a):
                raise _fail("bad-operand", pc, "unused operands set, expected zero")
            defs = 1 << ins.r
        elif op == LOADK:
            if ins.r >= NREGS:
                raise _fail("bad-register", pc, f"register {ins.r}, expected below {NREGS}")
            const_of(pc, ins, (K_STR, K_INT))
            if ins.x or ins.imm:
                raise _fail("bad-operand", pc, "unused operands set, expected zero")
            defs = 1 << ins.r
        elif EQ <= op <= ISNULL or op in (INSET, ANYOF):
            if ins.r >= NREGS:
                raise _fail("bad-register", pc, f"register {ins.r}, expected below {NREGS}")
            max_x = 0
            if op == EQ:
                c = const_of(pc, ins, (K_STR, K_INT))
                max_x = 1 if c.kind == K_STR else 0
            elif op in (PREFIX, SUFFIX, CONTAINS, GLOB):
                const_of(pc, ins, (K_STR,))
                max_x = 1
            elif op == REGEX:
                const_of(pc, ins, (K_REGEX,))
            elif op == CMP:
                const_of(pc, ins, (K_INT,))
                max_x = 3
            elif op == CIDR:
                const_of(pc, ins, (K_CIDR,))
            elif op in (INSET, ANYOF):
                const_of(pc, ins, (K_LIST,))
                max_x = 1
            elif ins.a:
                raise _fail("bad-operand", pc, "unused operands set, expected zero")
            if ins.x > max_x or ins.imm:
                raise _fail("bad-operand", pc, f"flags {ins.x}, expected at most {max_x} and imm 0")
            uses = 1 << ins.r
            defs = FLAG_BIT
        elif op == ISTYPE:
            const_of(pc, ins, (K_LIST,))
            if ins.r or ins.x or ins.imm:
                raise _fail("bad-operand", pc, "unused operands set, expected zero")
            defs = FLAG_BIT
        elif op == NOT:
            if ins.r or ins.x or ins.a or ins.imm:
                raise _fail("bad-operand", pc, "unused operands set, expected zero")
            uses = defs = FLAG_BIT
        elif op in (JMP, JT, JF):
            if ins.r or ins.x or ins.imm:
                raise _fail("bad-operand", pc, "unused operands set, expected zero")
            uses = FLAG_BIT if op != JMP else 0
        elif op == WAIT:
            if ins.a != ANY_TYPES:
                const_of(pc, ins, (K_LIST,))
            if ins.r or ins.x:
                raise _fail("bad-operand", pc, "unused operands set, expected zero")
            timeout(pc, ins.imm)
        elif op == LAUNCH:
            if ins.a >= len(p.launches):
                raise _fail("bad-launch", pc, f"launch entry {ins.a}, expected below {len(p.launches)}")
            if ins.r or ins.x:
                raise _fail("bad-operand", pc, "unused operands set, expected zero")
            timeout(pc, ins.imm)
        elif op == COUNT:
            if ins.x >= MAX_SLOTS:
                raise _fail("bad-counter", pc, f"counter slot {ins.x}, expected below {MAX_SLOTS}")
            if not 1 <= ins.a <= MAX_COUNT:
                raise _fail("bad-counter", pc, f"threshold {ins.a}, expected 1..={MAX_COUNT}")
            if ins.r:
                raise _fail("bad-operand", pc, "unused operands set, expected zero")
            timeout(pc, ins.imm)
            slot_use(pc, ins.x, (0, 0, ins.a, ins.imm))
            defs = FLAG_BIT
        elif op == AGG:
            if ins.r >= NREGS:
                raise _fail("bad-register", pc, f"register {ins.r}, expected below {NREGS}")
            distinct = bool(ins.x & AGG_DISTINCT)
            if ins.x & ~(0xFF | AGG_DISTINCT | AGG_DEFERRED) or (not distinct and ins.x & 0xF0):
                raise _fail(
                    "bad-operand",
                    pc,
                    f"agg operand {ins.x:#x}, expected a slot, a value register (distinct only) "
                    "and flags 0x100 (distinct), 0x200 (deferred)",
                )
            if not 1 <= ins.a <= MAX_AGG_CAP:
                raise _fail("bad-counter", pc, f"cap {ins.a}, expected 1..={MAX_AGG_CAP}")
            timeout(pc, ins.imm)
            slot_use(pc, ins.x & 0xF, (1, ins.x >> 8, ins.a, ins.imm))
            if distinct:
                uses = 1 << ((ins.x >> 4) & 0xF)
            defs = 1 << ins.r
        elif op in (WINDOW, RESET):
            if op == WINDOW and ins.r >= NREGS:
                raise _fail("bad-register", pc, f"register {ins.r}, expected below {NREGS}")
            sig = slot_of(pc, ins.x)
            if ins.a or ins.imm or (op == RESET and ins.r):
                raise _fail("bad-operand", pc, "unused operands set, expected zero")
            if op == WINDOW and (sig is None or sig[0] != 1 or not sig[1] & (AGG_DEFERRED >> 8)):
                raise _fail(
                    "bad-counter", pc, f"window on slot {ins.x}, expected a slot of an earlier deferred agg"
                )
            if op == RESET and (sig is None or (sig[0] == 1 and sig[1] & (AGG_DEFERRED >> 8))):
                raise _fail(
                    "bad-counter",
                    pc,
                    f"reset of slot {ins.x}, expected a slot of an earlier count or sliding agg",
                )
        elif op == HALT:
            if ins.x > NO_MATCH:
                raise _fail(
                    "bad-verdict", pc, f"verdict {ins.x}, expected 0 (monitor), 1 (match) or 2 (no-match)"
                )
            if ins.r or ins.a or ins.imm:
                raise _fail("bad-operand", pc, "unused operands set, expected zero")
        if uses & ~mask:
            reg = (ins.x >> 4) & 0xF if op == AGG else ins.r
            what = "the test flag" if uses & ~mask & FLAG_BIT else f"register {reg}"
            raise _fail("undefined-register", pc, f"{what} is read before it is written on some path")
        out = mask | defs
        if op in (JMP, JT, JF):
            if ins.a <= pc:
                raise _fail("backward-jump", pc, f"jump to {ins.a}, expected a target after {pc}")
            if ins.a >= n:
                raise _fail("jump-out-of-range", pc, f"jump to {ins.a}, expected below {n}")
            merge(ins.a, out)
            if op != JMP:
                merge(pc + 1, out)
        elif op == WAIT:
            merge(pc + 1, 0)
        elif op == WINDOW:
            merge(pc + 1, 1 << ins.r)  # the run ends here; it resumes at the close with the count
        elif op != HALT:
            merge(pc + 1, out)
    if code[-1].op != HALT:
        raise _fail("no-final-halt", n - 1, f"last instruction is {OPCODES[code[-1].op]}, expected halt")
