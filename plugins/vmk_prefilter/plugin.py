"""Service insertion with a packet pre-filter as the next hop.

Design: per kernel (under :data:`KEY`) the plugin keeps one
:class:`vmkernel.fast.Prefilter`, a *service table* mapping a VM's NIC and
direction (``in``, ``out`` or ``inout`` for both) to a service path
``(spi, si)``, and counters.  A batch of frames leaving a NIC
(``vmk_frames_out``) or arriving at one (``vmk_frames_in``) that has a
service path for that direction crosses into Rust once: the pre-filter
classifies the whole batch with the direction, so rules with ``dir=in`` or
``dir=out`` see only their traffic; frames it redirects (including
everything it cannot vouch for) go to the security component in one
``vmk_security_inspect`` call, and the rest is delivered or dropped.  Frames
redirected without a rule take the NIC's service path.  Outbound frames are
delivered to the VM owning the destination address (else the uplink),
inbound frames to the receiving VM.  The default security
component (``trylast``, so any user's implementation wins) inspects TCP
handshakes and programs the flow cache so the rest of an approved flow
bypasses it.  If the security component fails, the configured failure
policy decides (``block`` by default: fail closed).  One journal event per
batch carries the counts; nothing is ever emitted per frame.

Configuration (``Kernel(config={"prefilter": {...}})``): ``rules`` and
``format`` (installed at configure time), ``default_spi`` / ``default_si``,
``flow_capacity``, ``failure_policy`` (``block`` or ``allow``).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from vmkernel import VM, Invariant, Kernel, ReportSection, StashKey, hookimpl, implementation
from vmkernel.errors import InvalidArgument, UnknownResource
from vmkernel.fast import Prefilter

__all__ = ["KEY", "PrefilterState", "load_rules", "service_path", "set_service_path", "state"]

BYPASS, REDIRECT, DROP = Prefilter.BYPASS, Prefilter.REDIRECT, Prefilter.DROP
NO_RULE = Prefilter.NO_RULE
#: Directions of traffic: frames a VM receives (``in``) or sends (``out``).
DIRECTIONS = ("in", "out")
#: Directions of a service-table entry: ``inout`` steers both ways.
SERVICE_DIRECTIONS = ("in", "out", "inout")
FAILURE_POLICIES = ("block", "allow")
#: Frames per classify call in the CLI; bigger captures get a progress bar.
CLI_CHUNK = 65536
#: Frames kept per VM inbox for inspection by tests and demos (counts are unbounded).
INBOX_LIMIT = 1024


@dataclass
class PrefilterState:
    """Per-kernel state of the plugin."""

    prefilter: Prefilter
    failure_policy: str = "block"
    #: (vm id, nic, direction) -> (spi, si); direction is ``in``, ``out`` or ``inout``
    services: dict[tuple[str, int, str], tuple[int, int]] = field(default_factory=dict)
    #: totals over both directions
    counters: Counter[str] = field(default_factory=Counter)
    #: the same counters per traffic direction (``in``, ``out``)
    by_direction: dict[str, Counter[str]] = field(
        default_factory=lambda: {direction: Counter() for direction in DIRECTIONS}
    )
    rule_hits: Counter[int] = field(default_factory=Counter)
    inbox: dict[str, list[bytes]] = field(default_factory=dict)


KEY: StashKey[PrefilterState] = StashKey("prefilter")


def state(kernel: Kernel) -> PrefilterState:
    """The plugin's state on ``kernel``."""
    return kernel.stash[KEY]


def _settings(kernel: Kernel) -> Mapping[str, Any]:
    value = kernel.config.get("prefilter", {})
    if not isinstance(value, Mapping):
        raise InvalidArgument("config['prefilter']", value, "a mapping of pre-filter settings")
    return value


def load_rules(kernel: Kernel, rules: str, format: str = "text", **options: Any) -> int:
    """Installs a rule set atomically; returns the new revision (a bad set raises ``RuleError``)."""
    st = state(kernel)
    revision = st.prefilter.load(rules, format, **options)
    kernel.emit("prefilter.rules", "prefilter", revision=revision, rules=len(st.prefilter), format=format)
    return revision


def set_service_path(kernel: Kernel, vm: VM | str, nic: int, direction: str, spi: int, si: int = 255) -> None:
    """Steers ``vm``'s traffic on ``nic`` in ``direction`` through the pre-filter on path ``(spi, si)``.

    ``direction`` is ``in`` (frames delivered to the VM), ``out`` (frames it
    sends) or ``inout`` (both); an ``in`` or ``out`` entry of the same NIC
    takes precedence over an ``inout`` one.
    """
    target = kernel.vm(vm)
    if direction not in SERVICE_DIRECTIONS:
        raise InvalidArgument("direction", direction, "'in', 'out' or 'inout'")
    for thing, value, hi, lo in (("nic", nic, 255, 0), ("spi", spi, 2**24 - 1, 0), ("si", si, 255, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise InvalidArgument(thing, value, f"an integer {lo}..{hi}")
    state(kernel).services[(target.id, nic, direction)] = (spi, si)
    kernel.emit("prefilter.service", f"vm:{target.id}", nic=nic, direction=direction, spi=spi, si=si)


def service_path(kernel: Kernel, vm: VM | str, nic: int, direction: str) -> tuple[int, int] | None:
    """The service path of ``vm``'s ``nic`` for traffic in ``direction`` (through ``vmk_service_path``).

    ``direction`` is the way the traffic flows, ``in`` or ``out``.
    """
    if direction not in DIRECTIONS:
        raise InvalidArgument("direction", direction, "'in' or 'out' (the way the traffic flows)")
    result: tuple[int, int] | None = kernel.hook.vmk_service_path(
        kernel=kernel, vm=kernel.vm(vm), nic=nic, direction=direction
    )
    return result


def _layout(frames: Sequence[bytes]) -> tuple[bytes, memoryview, memoryview]:
    """One buffer plus u32 offset and length views: the batch layout of ``classify_batch``."""
    lengths = np.fromiter((len(f) for f in frames), dtype=np.uint32, count=len(frames))
    offsets = np.zeros(len(frames), dtype=np.uint32)
    if len(frames) > 1:
        np.cumsum(lengths[:-1], out=offsets[1:])
    return b"".join(frames), offsets.data, lengths.data


#: Hands kept frames to their receivers; returns frames per receiver (VM id or ``uplink``).
Deliver = Callable[[Kernel, PrefilterState, list[bytes]], dict[str, int]]


def _deliver(kernel: Kernel, st: PrefilterState, frames: list[bytes]) -> dict[str, int]:
    """Hands frames to the VM owning the destination IPv4/IPv6 address (``ip`` option), else the uplink."""
    owners = {str(v.options.get("ip")): v.id for v in kernel.vms() if v.options.get("ip")}
    per_vm: Counter[str] = Counter()
    for frame in frames:
        parsed = implementation().Prefilter.parse(frame)
        dst = parsed.get("dst")
        address = _address_text(dst) if isinstance(dst, bytes) else None
        owner = owners.get(address or "", "uplink")
        per_vm[owner] += 1
        _to_inbox(st, owner, [frame])
    return dict(per_vm)


def _deliver_to(vm: VM) -> Deliver:
    """Delivery of inbound frames: all of them reach the receiving VM, whatever their address."""

    def deliver(kernel: Kernel, st: PrefilterState, frames: list[bytes]) -> dict[str, int]:
        _to_inbox(st, vm.id, frames)
        return {vm.id: len(frames)} if frames else {}

    return deliver


def _to_inbox(st: PrefilterState, owner: str, frames: list[bytes]) -> None:
    if not frames:
        return
    box = st.inbox.setdefault(owner, [])
    box.extend(frames[: max(0, INBOX_LIMIT - len(box))])


def _address_text(raw: bytes) -> str:
    import ipaddress

    return str(ipaddress.ip_address(raw))


# ---------------------------------------------------------------------------
# Hooks.


@hookimpl
def vmk_configure(kernel: Kernel) -> None:
    cfg = _settings(kernel)
    policy = cfg.get("failure_policy", "block")
    if policy not in FAILURE_POLICIES:
        raise InvalidArgument("config['prefilter']['failure_policy']", policy, "'block' or 'allow'")
    options = {k: cfg[k] for k in ("default_spi", "default_si", "flow_capacity") if k in cfg}
    # The kernel's own instance follows VMKERNEL_IMPL, like every fast path.
    pf = implementation().Prefilter(cfg.get("rules", ""), cfg.get("format", "text"), **options)
    kernel.stash[KEY] = PrefilterState(prefilter=pf, failure_policy=policy)


@hookimpl
def vmk_service_path(kernel: Kernel, vm: VM, nic: int, direction: str) -> tuple[int, int] | None:
    services = state(kernel).services
    found = services.get((vm.id, nic, direction))
    return found if found is not None else services.get((vm.id, nic, "inout"))


@hookimpl
def vmk_vm_destroy(kernel: Kernel, vm: VM) -> None:
    st = state(kernel)
    for key in [k for k in st.services if k[0] == vm.id]:
        del st.services[key]


@hookimpl(trylast=True)
def vmk_security_inspect(kernel: Kernel, vm: VM, frames: Sequence[bytes]) -> Any:
    """The default security component: deliver what parses, approve flows on their handshake."""
    return state(kernel).prefilter.inspect_batch(*_layout(frames))


@hookimpl
def vmk_frames_out(kernel: Kernel, vm: VM, nic: int, frames: Sequence[bytes]) -> dict[str, Any] | None:
    return _steer(kernel, vm, nic, frames, "out", _deliver)


@hookimpl
def vmk_frames_in(kernel: Kernel, vm: VM, nic: int, frames: Sequence[bytes]) -> dict[str, Any] | None:
    return _steer(kernel, vm, nic, frames, "in", _deliver_to(vm))


def _count(st: PrefilterState, direction: str, counts: Mapping[str, int]) -> None:
    st.counters.update(counts)
    st.by_direction[direction].update(counts)


def _steer(
    kernel: Kernel, vm: VM, nic: int, frames: Sequence[bytes], direction: str, deliver: Deliver
) -> dict[str, Any] | None:
    """One batch in one direction: classify, inspect what is redirected, deliver the rest."""
    st = state(kernel)
    n = len(frames)
    path = service_path(kernel, vm, nic, direction)
    subject = f"vm:{vm.id}"
    if path is None or n == 0:
        delivered = deliver(kernel, st, list(frames))
        _count(st, direction, {"frames": n, "unsteered": n, "delivered": n})
        return (
            None if n == 0 else {"frames": n, "steered": False, "delivered": n, "dropped": 0, "to": delivered}
        )
    pf = st.prefilter
    buffer, offsets, lengths = _layout(frames)
    verdicts, rule_ids, spis, sis = pf.classify_batch(buffer, offsets, lengths, direction)
    # Fail-closed redirects (no rule) take this NIC's service path.
    unruled = (verdicts == REDIRECT) & (rule_ids == NO_RULE) & (spis == pf.default_path[0])
    spis[unruled], sis[unruled] = path
    redirected = np.flatnonzero(verdicts == REDIRECT)
    final = verdicts.copy()
    failure = None
    if len(redirected):
        to_inspect = [frames[i] for i in redirected.tolist()]
        try:
            answer = kernel.hook.vmk_security_inspect(kernel=kernel, vm=vm, frames=to_inspect)
            inspected = np.asarray(answer, dtype=np.uint8)
            if answer is None or inspected.shape != (len(to_inspect),):
                raise InvalidArgument(
                    "vmk_security_inspect result", answer, "one verdict per redirected frame"
                )
            if not np.isin(inspected, (BYPASS, DROP)).all():
                raise InvalidArgument(
                    "vmk_security_inspect verdicts", inspected.tolist(), "BYPASS (0) or DROP (2)"
                )
        except Exception as exc:  # the failure policy decides; never a hole
            failure = f"{type(exc).__name__}: {exc}"
            inspected = np.full(len(to_inspect), BYPASS if st.failure_policy == "allow" else DROP, np.uint8)
        final[redirected] = inspected
    keep = [frames[i] for i in np.flatnonzero(final == BYPASS).tolist()]
    to = deliver(kernel, st, keep)
    counts = {
        "frames": n,
        "bypass": int((verdicts == BYPASS).sum()),
        "redirect": len(redirected),
        "drop": int((verdicts == DROP).sum()),
        "security_drop": int((final[redirected] == DROP).sum()) if len(redirected) else 0,
        "delivered": len(keep),
        "dropped": n - len(keep),
    }
    _count(st, direction, counts)
    ids, hits = np.unique(rule_ids, return_counts=True)
    st.rule_hits.update({int(i): int(h) for i, h in zip(ids.tolist(), hits.tolist(), strict=True)})
    kernel.emit(
        "prefilter.batch",
        subject,
        direction=direction,
        nic=nic,
        spi=path[0],
        si=path[1],
        revision=pf.revision,
        flows=pf.flow_count,
        failure=failure,
        **counts,
    )
    return {
        **counts,
        "steered": True,
        "direction": direction,
        "to": to,
        "spis": spis.tolist(),
        "sis": sis.tolist(),
    }


def _counters_add_up(kernel: Kernel) -> str | None:
    c = state(kernel).counters
    steered = c["frames"] - c["unsteered"]
    if c["bypass"] + c["redirect"] + c["drop"] != steered:
        return (
            f"bypass {c['bypass']} + redirect {c['redirect']} + drop {c['drop']} != {steered} steered frames"
        )
    if c["delivered"] + c["dropped"] != c["frames"]:
        return f"delivered {c['delivered']} + dropped {c['dropped']} != {c['frames']} frames"
    if c["dropped"] != c["drop"] + c["security_drop"]:
        return f"dropped {c['dropped']} != pre-filter drops {c['drop']} + security drops {c['security_drop']}"
    split = state(kernel).by_direction
    for name, total in c.items():
        if split["in"][name] + split["out"][name] != total:
            return f"{name}: inbound {split['in'][name]} + outbound {split['out'][name]} != total {total}"
    return None


def _service_table_valid(kernel: Kernel) -> str | None:
    live = {vm.id for vm in kernel.vms()}
    for (vm_id, nic, direction), (spi, si) in state(kernel).services.items():
        if vm_id not in live:
            return f"service path for destroyed vm {vm_id} nic {nic} {direction}"
        if direction not in SERVICE_DIRECTIONS:
            return f"service path of vm {vm_id} nic {nic} has direction {direction!r}"
        if not (0 <= spi < 2**24 and 1 <= si <= 255):
            return f"service path ({spi}, {si}) of vm {vm_id} is not a valid SPI/SI"
    return None


def _flow_cache_bounded(kernel: Kernel) -> str | None:
    pf = state(kernel).prefilter
    if pf.flow_count > pf.flow_capacity:
        return f"{pf.flow_count} flows cached, capacity {pf.flow_capacity}"
    return None


@hookimpl
def vmk_invariants(kernel: Kernel) -> list[Invariant]:
    return [
        Invariant("prefilter.counters-add-up", lambda: _counters_add_up(kernel)),
        Invariant("prefilter.service-table-valid", lambda: _service_table_valid(kernel)),
        Invariant("prefilter.flow-cache-bounded", lambda: _flow_cache_bounded(kernel)),
    ]


@hookimpl
def vmk_report(kernel: Kernel) -> ReportSection:
    st = state(kernel)
    pf, c, inbound = st.prefilter, st.counters, st.by_direction["in"]
    lines = [
        f"rules: {len(pf)} (revision {pf.revision}), flows cached: {pf.flow_count}/{pf.flow_capacity}",
        f"service paths: {len(st.services)}, failure policy: {st.failure_policy}",
        f"frames: {c['frames']} (bypass {c['bypass']}, redirect {c['redirect']}, drop {c['drop']}, "
        f"unsteered {c['unsteered']})",
        f"inbound: {inbound['frames']} frames (bypass {inbound['bypass']}, redirect {inbound['redirect']}, "
        f"drop {inbound['drop']}, unsteered {inbound['unsteered']})",
        f"security component: dropped {c['security_drop']} of {c['redirect']} inspected; "
        f"delivered {c['delivered']}",
    ]
    return ReportSection("prefilter", lines)


DEMO_RULES = """\
# web traffic is inspected by the IDS chain (path 100); DNS bypasses; telnet is dropped
redirect spi=100 si=255 proto=tcp dport=80-443
bypass proto=udp dport=53
drop proto=tcp dport=23
# SSH may leave the VMs but never reaches them from outside
drop dir=in proto=tcp dport=22
"""


@hookimpl
def vmk_demo(kernel: Kernel, demo: Any) -> None:
    from vmk_prefilter.frames import build_frame

    demo.step("two VMs; the client's NIC 0 is steered through the pre-filter on service path 7")
    client = kernel.create_vm("pf-client", memory_mib=256, ip="10.0.0.10")
    server = kernel.create_vm("pf-server", memory_mib=256, ip="10.0.0.20")
    for v in (client, server):
        kernel.launch_vm(v)
    set_service_path(kernel, client, 0, "out", spi=7, si=255)
    load_rules(kernel, DEMO_RULES)
    syn = build_frame("10.0.0.10", "10.0.0.20", dport=443, flags=0x02)
    data = [
        build_frame("10.0.0.10", "10.0.0.20", dport=443, flags=0x18, payload=bytes([i])) for i in range(8)
    ]
    dns = build_frame("10.0.0.10", "10.0.0.20", proto=17, sport=5353, dport=53)
    telnet = build_frame("10.0.0.10", "10.0.0.20", dport=23)
    ssh = build_frame("10.0.0.10", "10.0.0.20", dport=22, flags=0x02)
    first = kernel.send_frames(client, [syn, dns, telnet, ssh])[0]
    demo.step(
        f"handshake batch: {first['redirect']} inspected, {first['bypass']} bypassed, {first['drop']} dropped"
    )
    second = kernel.send_frames(client, data)[0]
    demo.step(
        f"the approved flow's next {len(data)} packets: {second['bypass']} bypass the security component"
    )
    demo.record("flows approved", state(kernel).prefilter.flow_count)
    demo.record("data packets bypassing inspection", second["bypass"])
    demo.record("delivered to pf-server", len(state(kernel).inbox.get(server.id, [])))

    demo.step("inbound: frames from the uplink to pf-server's NIC 0 take service path 9")
    set_service_path(kernel, server, 0, "in", spi=9, si=255)
    outside = "198.51.100.7"
    inbound = kernel.deliver_frames(
        server,
        [
            build_frame(outside, "10.0.0.20", dport=22, flags=0x02),
            build_frame(outside, "10.0.0.20", dport=80, flags=0x02),
            build_frame(outside, "10.0.0.20", proto=17, sport=5353, dport=53),
        ],
    )[0]
    demo.step(
        f"inbound batch: {inbound['drop']} dropped by the inbound-only SSH rule, "
        f"{inbound['redirect']} inspected, {inbound['bypass']} bypassed, {inbound['delivered']} delivered"
    )
    demo.record("inbound frames dropped by dir=in rules", inbound["drop"])


# ---------------------------------------------------------------------------
# Command line.


def _read_rules(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UnknownResource("rules file", str(path), f"a readable file ({exc.strerror})") from None


@hookimpl
def vmk_cli_commands(group: click.Group) -> None:
    @group.group("prefilter")
    def prefilter() -> None:
        """Packet pre-filter of service insertion."""

    @prefilter.command("classify")
    @click.argument("capture", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--rules", "rules_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
    @click.option(
        "--format",
        "fmt",
        type=click.Choice(["text", "json", "classbench"]),
        default=None,
        help="Rule format [default: from the file suffix: .json, .classbench/.cb, else text]",
    )
    @click.option("--direction", type=click.Choice(DIRECTIONS), default="out", show_default=True)
    @click.option("--reference", is_flag=True, help="Use the pure-Python reference implementation.")
    def classify(capture: Path, rules_path: Path, fmt: str | None, direction: str, reference: bool) -> None:
        """Classify every frame of CAPTURE (pcap or pcapng); print per-rule counts and verdict totals."""
        text = _read_rules(rules_path)
        if fmt is None:
            suffix = rules_path.suffix.lower()
            fmt = (
                "json" if suffix == ".json" else "classbench" if suffix in (".classbench", ".cb") else "text"
            )
        import vmkernel.reference

        impl: Any = vmkernel.reference.Prefilter if reference else Prefilter
        pf = impl(text, fmt)
        buffer, offsets, lengths = impl.read_capture(capture)
        total = len(offsets)
        parts = []
        chunks = range(0, total, CLI_CHUNK)
        with click.progressbar(
            chunks, label=f"classifying {total} frames", file=sys.stderr, hidden=total <= CLI_CHUNK
        ) as bar:
            for start in bar:
                end = min(start + CLI_CHUNK, total)
                parts.append(pf.classify_batch(buffer, offsets[start:end], lengths[start:end], direction))
        verdicts = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.uint8)
        rule_ids = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.uint32)
        rule_lines = pf.to_text().splitlines()
        click.echo(f"{capture}: {total} frames, {len(pf)} rules ({fmt})")
        ids, hits = np.unique(rule_ids, return_counts=True)
        for rule_id, count in zip(ids.tolist(), hits.tolist(), strict=True):
            label = (
                "no rule (fail closed)" if rule_id == NO_RULE else f"rule {rule_id}: {rule_lines[rule_id]}"
            )
            click.echo(f"  {count:>10}  {label}")
        names = {BYPASS: "bypass", REDIRECT: "redirect", DROP: "drop"}
        totals = ", ".join(f"{names[v]} {int((verdicts == v).sum())}" for v in (BYPASS, REDIRECT, DROP))
        click.echo(f"verdicts: {totals}")

    @prefilter.command("check")
    @click.argument("rules_path", type=click.Path(dir_okay=False, path_type=Path))
    @click.option("--format", "fmt", type=click.Choice(["text", "json", "classbench"]), default="text")
    def check(rules_path: Path, fmt: str) -> None:
        """Validate a rule file; print the rules as the text format."""
        pf = Prefilter(_read_rules(rules_path), fmt)
        click.echo(pf.to_text(), nl=False)
        click.echo(f"{len(pf)} rules ok", err=True)

    @prefilter.command("generate")
    @click.argument("count", type=click.IntRange(0, 1_000_000))
    @click.option("--seed", type=int, default=1, show_default=True)
    def generate(count: int, seed: int) -> None:
        """Print COUNT ClassBench-style ACL rules (ClassBench filter format)."""
        from vmk_prefilter.classbench import classbench_acl

        click.echo(classbench_acl(count, seed), nl=False)
