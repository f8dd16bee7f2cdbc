"""Annotated listing of a program (what ``vmkernel threat compile`` prints).

Design: the listing is for people: each instruction shows its pc, mnemonic
and operands with the constants, field names, jump targets and verdicts
spelled out, after a header with the rule's tables.  It is produced from the
verified program, so what it shows is what the engine runs.
"""

from __future__ import annotations

from vmkernel.rules import program as P

__all__ = ["disassemble"]


def _const(p: P.Program, ix: int) -> str:
    c = p.consts[ix]
    if c.kind == P.K_LIST:
        items = list(c.value)
        shown = ", ".join(repr(x) for x in items[:6]) + (
            f", ... ({len(items)} items)" if len(items) > 6 else ""
        )
        return f"[{shown}]"
    if c.kind == P.K_REGEX:
        return f"/{c.value}/"
    if c.kind == P.K_CIDR:
        return f"cidr {c.value}"
    return repr(c.value)


def disassemble(data: bytes) -> str:
    """Verify ``data`` and return its annotated listing."""
    p = P.decode(data)
    lines = [
        f"rule {p.name!r}  (format v{p.version}, {len(p.code)} instructions)",
        f"  context: {', '.join(p.context_fields) or '-'}",
        f"  types:   {', '.join(p.types) or 'any'}",
    ]
    flags = [f for f, on in (("silent", p.silent), ("launched", p.launched)) if on]
    if flags:
        lines.append(f"  flags:   {', '.join(flags)}")
    if p.launches:
        lines.append(f"  launch:  {', '.join(p.launches)}")
    if p.tags:
        lines.append(f"  tags:    {', '.join(p.tags)}")
    if p.prefilter:
        shown = ", ".join(f"{p.fields[f]}~{lit!r}" for f, lit in p.prefilter[:8])
        more = f", ... ({len(p.prefilter)} literals)" if len(p.prefilter) > 8 else ""
        lines.append(f"  prefilter: {shown}{more}")
    width = len(str(len(p.code) - 1))
    for pc, ins in enumerate(p.code):
        name = P.OPCODES[ins.op]
        op = ins.op
        if op == P.LOADF:
            text, note = f"{name} r{ins.r}, #{ins.a}", f"field {p.fields[ins.a]!r}"
        elif op in (P.LOADCTX, P.LOADTYPE) or op in (P.EXISTS, P.ISNULL):
            text, note = f"{name} r{ins.r}", ""
        elif op == P.LOADK:
            text, note = f"{name} r{ins.r}, #{ins.a}", _const(p, ins.a)
        elif op == P.CMP:
            text, note = f"{name}.{P.CMP_OPS[ins.x]} r{ins.r}, #{ins.a}", _const(p, ins.a)
        elif P.EQ <= op <= P.ANYOF:
            suffix = ".i" if ins.x else ""
            text, note = f"{name}{suffix} r{ins.r}, #{ins.a}", _const(p, ins.a)
        elif op == P.ISTYPE:
            text, note = f"{name} #{ins.a}", _const(p, ins.a)
        elif op == P.NOT:
            text, note = name, ""
        elif op in (P.JMP, P.JT, P.JF):
            text, note = f"{name} {ins.a}", ""
        elif op == P.WAIT:
            types = "any" if ins.a == P.ANY_TYPES else _const(p, ins.a)
            text, note = f"{name} {ins.imm}ns", f"for {types}; resumes at {pc + 1}"
        elif op == P.LAUNCH:
            text, note = f"{name} #{ins.a}, {ins.imm}ns", f"rule {p.launches[ins.a]!r}"
        elif op == P.COUNT:
            text, note = f"{name} slot {ins.x}, {ins.a}, {ins.imm}ns", f"{ins.a} events within {ins.imm} ns"
        elif op == P.AGG:
            slot, vreg = ins.x & 0xF, (ins.x >> 4) & 0xF
            distinct, deferred = ins.x & P.AGG_DISTINCT, ins.x & P.AGG_DEFERRED
            what = f"distinct r{vreg}" if distinct else "events"
            mode = "window" if deferred else "sliding"
            text = f"{name}.{mode} r{ins.r}, slot {slot}, {what}, cap {ins.a}, {ins.imm}ns"
            note = f"r{ins.r} = {'distinct values' if distinct else 'events'} within {ins.imm} ns"
        elif op == P.WINDOW:
            text, note = (
                f"{name} r{ins.r}, slot {ins.x}",
                f"run ends; resumes at {pc + 1} when the window closes",
            )
        elif op == P.RESET:
            text, note = f"{name} slot {ins.x}", ""
        else:
            text, note = f"{name} {P.HALT_VERDICTS[ins.x]}", ""
        lines.append(f"  {pc:>{width}}  {text:<32}" + (f"; {note}" if note else "").rstrip())
    return "\n".join(line.rstrip() for line in lines)
