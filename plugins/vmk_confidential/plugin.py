"""The confidential-VM plugin: measured launch, attestation, identity and entropy in a kernel.

Design: every host that joins gets an emulated security module (its own chip
id and VCEK from the kernel's emulated CPU vendor).  ``create_vm(...,
confidential=True)`` (or a dict of options) marks a VM confidential; its
launch goes through the security module: a fresh memory key, the launch image
encrypted into private pages and measured, a report bound to a key the guest
generates, verification by the trust authority, and on VERIFIED the sealed
secret and an identity certificate.  Any failure vetoes the launch, so the
kernel rolls it back and nothing is released.

Memory: with a processor plugin loaded, ``kernel.guest_memory(vm)`` is a page
store and the engine keeps the VM's pages there, so the host reads ciphertext
through the processor and the storage plugin saves that ciphertext; the
entropy device's aperture above guest RAM stays in a small store of its own.
Without one, the engine has a private sparse store.  Keys live as long as a
launch: a restored VM is confidential again, but its next launch has a new
key, so pages encrypted under the old one no longer decrypt.

The trust authority is in-process by default; ``config={"confidential":
{"trust_authority": "http"}}`` serves it over HTTP on a loopback port for the
kernel's lifetime, and a URL uses an external one.  Journal events carry
verdicts, reason codes and measurements, never nonces, keys or secrets, so a
seed gives the same journal whatever keys OS entropy produced
(``deterministic_keys`` derives the keys from the seed as well).
"""

from __future__ import annotations

import base64
import io
import logging
import random
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
from cryptography import x509

from vmkernel import VM, Host, Invariant, Kernel, ReportSection, StashKey, VMState, hookimpl
from vmkernel.errors import (
    AttestationError,
    FeatureUnavailable,
    IllegalTransition,
    InvalidArgument,
    VmkError,
)

from .authority import TrustAuthority
from .certs import Vendor
from .entropy import ENTROPY_APERTURE, EntropyDevice
from .memory import (
    PAGE_SIZE,
    DictPageStore,
    EncryptionMode,
    MemoryEncryptionEngine,
    PageStore,
    SplitPageStore,
)
from .policy import ReferencePolicy
from .provision import GuestAgent
from .psp import DEFAULT_TCB, DELIVERY_GPA, LaunchImage, SecurityModule, guest_policy
from .report import AttestationReport, Tcb
from .service import HttpTransport, InProcessTransport, ServerThread, Transport
from .verify import MANDATORY_CHECKS

__all__ = [
    "KEY",
    "ConfidentialOptions",
    "ConfidentialState",
    "attest",
    "default_policy",
    "engine_of",
    "state_of",
]

log = logging.getLogger("vmkernel.confidential")

KEY: StashKey[ConfidentialState] = StashKey("vmk_confidential")
EMBEDDED_HOST = "embedded"
GENERATIONS = ("Milan", "Genoa")
_MAX_DEFAULT_VCPUS = 64


@dataclass(frozen=True)
class ConfidentialOptions:
    """The ``confidential`` option of ``create_vm``: ``True`` or a dict of these fields."""

    mode: EncryptionMode = EncryptionMode.SNP
    debug: bool = False
    migrate_ma: bool = False
    vmpl: int = 0
    host_data: bytes = bytes(32)
    workload: str | None = None

    @classmethod
    def parse(cls, value: Any) -> ConfidentialOptions | None:
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if not isinstance(value, Mapping):
            raise InvalidArgument("confidential", value, "True, False or a dict of confidential options")
        known = {"mode", "debug", "migrate_ma", "vmpl", "host_data", "workload"}
        unknown = set(value) - known
        if unknown:
            raise InvalidArgument("confidential options", sorted(unknown), f"only {sorted(known)}")
        try:
            mode = EncryptionMode(value.get("mode", "snp"))
        except ValueError:
            raise InvalidArgument("confidential.mode", value.get("mode"), "'sev' or 'snp'") from None
        vmpl = value.get("vmpl", 0)
        if not isinstance(vmpl, int) or not 0 <= vmpl <= 3:
            raise InvalidArgument("confidential.vmpl", vmpl, "an int 0..3")
        host_hex = value.get("host_data", "00" * 32)
        try:
            host_data = bytes.fromhex(str(host_hex))
        except ValueError:
            host_data = b""
        if len(host_data) != 32:
            raise InvalidArgument("confidential.host_data", host_hex, "64 hex digits (32 bytes)")
        workload = value.get("workload")
        if workload is not None and (not isinstance(workload, str) or not workload):
            raise InvalidArgument("confidential.workload", workload, "a non-empty str")
        return cls(mode, bool(value.get("debug")), bool(value.get("migrate_ma")), vmpl, host_data, workload)


@dataclass
class VmRecord:
    vm_id: str
    name: str
    options: ConfidentialOptions
    host: str = EMBEDDED_HOST
    agent: GuestAgent | None = None
    certificate: x509.Certificate | None = None
    entropy: EntropyDevice | None = None
    measurement: bytes | None = None
    verdict: str = "pending"
    codes: list[str] = field(default_factory=list)

    @property
    def workload(self) -> str:
        return self.options.workload or self.name


@dataclass
class ConfidentialState:
    """Per-kernel state of the plugin (under :data:`KEY`)."""

    vendor: Vendor
    policy: ReferencePolicy
    authority: TrustAuthority | None
    transport: Transport
    deterministic: bool
    config: Mapping[str, Any]
    server: ServerThread | None = None
    modules: dict[str, SecurityModule] = field(default_factory=dict)
    vms: dict[str, VmRecord] = field(default_factory=dict)
    graveyard: dict[str, VmRecord] = field(default_factory=dict)
    logs: list[str] = field(default_factory=list)
    denials: int = 0

    def note(self, message: str) -> None:
        """Log a host-visible line (kept so the no-secret invariant can check the logs too)."""
        self.logs.append(message)
        log.info(message)


def state_of(kernel: Kernel) -> ConfidentialState:
    return kernel.stash[KEY]


def _rng(kernel: Kernel, deterministic: bool, name: str) -> random.Random | None:
    """A seeded stream for key generation when keys must be deterministic, else OS entropy (None)."""
    return kernel.rng_for(f"vmk_confidential.{name}") if deterministic else None


def default_policy(vendor: Vendor, *, max_vcpus: int = _MAX_DEFAULT_VCPUS) -> ReferencePolicy:
    """Reference values for the built-in launch image (1..max_vcpus vCPUs) and the vendor's roots."""
    measurements = frozenset(LaunchImage().reference_measurements(max_vcpus))
    return ReferencePolicy(
        allowed_measurements=measurements,
        pinned_roots={gen: vendor.roots(gen).ark for gen in GENERATIONS},
        minimum_tcb=DEFAULT_TCB,
    )


def _settings(kernel: Kernel) -> dict[str, Any]:
    cfg = kernel.config.get("confidential", {})
    if not isinstance(cfg, Mapping):
        raise InvalidArgument("config['confidential']", cfg, "a dict of confidential-VM settings")
    return dict(cfg)


# ---------------------------------------------------------------------------
# plugin life


@hookimpl
def vmk_configure(kernel: Kernel) -> None:
    cfg = _settings(kernel)
    deterministic = bool(cfg.get("deterministic_keys", False))
    vendor = Vendor(rng=_rng(kernel, deterministic, "vendor"))
    policy_file = cfg.get("policy")
    policy = ReferencePolicy.load(policy_file) if policy_file else default_policy(vendor)
    ta_setting = cfg.get("trust_authority", "in-process")
    authority: TrustAuthority | None = None
    server = None
    transport: Transport
    if ta_setting in ("in-process", "http"):
        authority = TrustAuthority(
            policy, clock=lambda: kernel.clock.now_ns, rng=_rng(kernel, deterministic, "authority")
        )
        if ta_setting == "http":
            server = ServerThread(authority).start()
            transport = HttpTransport(server.url)
        else:
            transport = InProcessTransport(authority)
    elif isinstance(ta_setting, str) and ta_setting.startswith(("http://", "https://")):
        transport = HttpTransport(ta_setting)
    else:
        raise InvalidArgument(
            "config['confidential']['trust_authority']", ta_setting, "'in-process', 'http' or an http(s) URL"
        )
    kernel.stash[KEY] = ConfidentialState(
        vendor=vendor,
        policy=policy,
        authority=authority,
        transport=transport,
        deterministic=deterministic,
        config=cfg,
        server=server,
    )


@hookimpl
def vmk_unconfigure(kernel: Kernel) -> None:
    st = kernel.stash.get(KEY, None)
    if st is None:
        return
    if isinstance(st.transport, HttpTransport):
        st.transport.close()
    if st.server is not None:
        st.server.stop()
        st.server = None
    for module in st.modules.values():
        for vm in list(module.guests):
            module.destroy(vm)


def _module(kernel: Kernel, st: ConfidentialState, host_id: str) -> SecurityModule:
    if host_id not in st.modules:
        gens = st.config.get("host_generations", {})
        generation = str(gens.get(host_id, st.config.get("generation", "Milan")))
        tcb_cfg = st.config.get("tcb")
        tcb = Tcb(**tcb_cfg) if isinstance(tcb_cfg, Mapping) else DEFAULT_TCB
        chip_id = kernel.rng_for(f"vmk_confidential.chip:{host_id}").randbytes(64)  # journaled: always seeded
        st.modules[host_id] = SecurityModule(
            host_id,
            st.vendor,
            generation=generation,
            tcb=tcb,
            chip_id=chip_id,
            rng=_rng(kernel, st.deterministic, f"psp:{host_id}"),
        )
    return st.modules[host_id]


@hookimpl
def vmk_host_join(kernel: Kernel, host: Host) -> None:
    st = state_of(kernel)
    module = _module(kernel, st, host.id)
    kernel.emit(
        "confidential.host",
        f"host:{host.id}",
        generation=module.generation,
        chip_id=module.chip_id.hex()[:16],
        tcb=module.tcb.as_dict(),
    )


# ---------------------------------------------------------------------------
# VM life


@hookimpl
def vmk_vm_create(kernel: Kernel, vm: VM, options: Mapping[str, Any]) -> None:
    opts = ConfidentialOptions.parse(options.get("confidential"))
    if opts is None:
        return
    st = state_of(kernel)
    st.vms[vm.id] = VmRecord(vm.id, vm.name, opts)
    kernel.emit("confidential.create", f"vm:{vm.id}", mode=opts.mode.value, workload=opts.workload or vm.name)


def _page_store(kernel: Kernel, vm: VM, image: LaunchImage) -> PageStore:
    """Where the engine keeps the VM's pages: its guest memory if that is a page store, else its own.

    Guest memory holds the VM's RAM; the entropy aperture (GPAs from 2**40, far
    above any RAM the processor maps) goes to a sparse store beside it.
    """
    try:
        memory = kernel.guest_memory(vm)
    except FeatureUnavailable:
        return DictPageStore()
    if not isinstance(memory, PageStore):
        return DictPageStore()
    size = getattr(memory, "size", None)
    end = max(image.firmware_gpas()[-1], DELIVERY_GPA) + PAGE_SIZE
    if isinstance(size, int) and size < end:
        raise InvalidArgument(
            f"memory_mib of confidential vm {vm.name}",
            vm.memory_mib,
            f"at least {-(-end // (1 << 20))} MiB: the launch image and the secret page reach "
            f"guest-physical {end:#x}",
        )
    return SplitPageStore(memory, DictPageStore(), ENTROPY_APERTURE)


def _teardown(st: ConfidentialState, rec: VmRecord) -> None:
    if rec.agent is not None:
        st.modules[rec.host].destroy(rec.vm_id)
    rec.agent = None
    rec.certificate = None
    rec.entropy = None
    rec.measurement = None


# Default order is enough: the processor's launch is tryfirst, so the VM's guest memory is
# mapped (and owned by this launch, released if it is vetoed) before the image is loaded.
@hookimpl
def vmk_vm_launch(kernel: Kernel, vm: VM) -> None:
    st = state_of(kernel)
    rec = st.vms.get(vm.id)
    if rec is None:
        return
    _teardown(st, rec)  # a relaunch is a new launch: new key, new measurement, new attestation
    rec.host = vm.host_id or EMBEDDED_HOST
    module = _module(kernel, st, rec.host)
    opts = rec.options
    image = LaunchImage(vcpus=vm.vcpus)
    ctx = module.launch_start(
        vm.id,
        policy=guest_policy(debug=opts.debug, migrate_ma=opts.migrate_ma),
        mode=opts.mode,
        store=_page_store(kernel, vm, image),
        host_data=opts.host_data,
    )
    rec.agent = GuestAgent(ctx, module, rng=_rng(kernel, st.deterministic, f"guest:{vm.id}"))
    rec.measurement = module.launch_image(ctx, image)
    kernel.emit("confidential.measured", f"vm:{vm.id}", measurement=rec.measurement.hex(), host=rec.host)
    kernel.hook.vmk_launch_measure(kernel=kernel, vm=vm, measurement=rec.measurement)
    try:
        provisioned = rec.agent.attest(st.transport, rec.workload, vmpl=opts.vmpl)
    except AttestationError as exc:
        rec.verdict, rec.codes = "REJECTED", list(exc.codes)
        st.note(f"attestation of vm {vm.name} rejected: {', '.join(exc.codes)}")
        raise
    rec.verdict, rec.codes = "VERIFIED", []
    rec.certificate = provisioned.certificate
    seed = kernel.rng_for(f"vmk_confidential.entropy:{vm.id}").getrandbits(64)
    source = np.random.Generator(np.random.PCG64(seed)).bytes
    rec.entropy = EntropyDevice(ctx.engine, source, vm=vm.name, on_deny=_denial_logger(kernel, st, vm))
    kernel.emit(
        "confidential.attested",
        f"vm:{vm.id}",
        verdict="VERIFIED",
        workload=rec.workload,
        measurement=rec.measurement.hex(),
        checks=len(provisioned.outcome.result.get("checks", [])),
        identity=provisioned.certificate.subject.rfc4514_string(),
    )
    st.note(f"vm {vm.name} attested; identity {provisioned.certificate.subject.rfc4514_string()}")


def _denial_logger(kernel: Kernel, st: ConfidentialState, vm: VM) -> Callable[[str, str], None]:
    def on_deny(check: str, value: str) -> None:
        st.denials += 1
        st.note(f"entropy device of vm {vm.name} denied hypervisor data: repeated {check} {value}")
        kernel.emit("confidential.entropy_denied", f"vm:{vm.id}", check=check)

    return on_deny


@hookimpl
def vmk_vm_restore(kernel: Kernel, vm: VM, unit: Any) -> None:
    """A restored VM that was created confidential is confidential again (launches are measured)."""
    opts = ConfidentialOptions.parse(vm.options.get("confidential"))
    if opts is None:
        return
    st = state_of(kernel)
    st.vms[vm.id] = VmRecord(vm.id, vm.name, opts)
    kernel.emit(
        "confidential.restore", f"vm:{vm.id}", mode=opts.mode.value, workload=opts.workload or vm.name
    )


# The key is scrubbed when the destroy commits (vmk_event); the processor zeroes the
# ciphertext in its trylast destroy, after any plugin that could veto.
@hookimpl
def vmk_vm_destroy(kernel: Kernel, vm: VM) -> None:
    st = state_of(kernel)
    rec = st.vms.pop(vm.id, None)
    if rec is not None:
        st.graveyard[vm.id] = rec  # scrubbed once the destroy commits


@hookimpl
def vmk_event(kernel: Kernel, event: Any) -> None:
    if event.kind != "vm.destroy":
        return
    st = kernel.stash.get(KEY, None)
    if st is None:
        return
    rec = st.graveyard.pop(event.subject.removeprefix("vm:"), None)
    if rec is not None:
        _teardown(st, rec)


@hookimpl
def vmk_rollback(kernel: Kernel, operation: str, subject: str, error: BaseException) -> None:
    st = kernel.stash.get(KEY, None)
    if st is None:
        return
    ident = subject.split(":", 1)[-1]
    if operation in ("vm.create", "vm.restore"):
        st.vms.pop(ident, None)
    elif operation == "vm.launch" and ident in st.vms:
        rec = st.vms[ident]
        codes = rec.codes
        if isinstance(error, AttestationError):  # the launch's own events were dropped: record the verdict
            kernel.emit(
                "confidential.rejected",
                subject,
                verdict="REJECTED",
                codes=list(error.codes),
                measurement=rec.measurement.hex() if rec.measurement is not None else "",
            )
        _teardown(st, rec)
        if rec.verdict == "VERIFIED":
            rec.verdict = "rolled back"
        rec.codes = codes
    elif operation == "vm.destroy" and ident in st.graveyard:
        st.vms[ident] = st.graveyard.pop(ident)
    elif operation == "host.join":
        module = st.modules.pop(ident, None)
        if module is not None:
            for vm in list(module.guests):
                module.destroy(vm)


@hookimpl
def vmk_tick(kernel: Kernel, now_ns: int) -> None:
    st = kernel.stash.get(KEY, None)
    if st is not None and st.authority is not None:
        st.authority.tick(now_ns)


# ---------------------------------------------------------------------------
# features


def _record(kernel: Kernel, vm: VM) -> VmRecord | None:
    return state_of(kernel).vms.get(vm.id)


@hookimpl
def vmk_vm_identity(kernel: Kernel, vm: VM) -> x509.Certificate | None:
    rec = _record(kernel, vm)
    if rec is None:
        return None
    if rec.certificate is None:
        raise IllegalTransition(
            "vm", vm.id, vm.state.value, "identity", ["running after a VERIFIED attestation"]
        )
    return rec.certificate


@hookimpl
def vmk_entropy_device(kernel: Kernel, vm: VM) -> EntropyDevice | None:
    rec = _record(kernel, vm)
    if rec is None:
        return None
    if rec.entropy is None or vm.state is not VMState.RUNNING:
        raise IllegalTransition("vm", vm.id, vm.state.value, "entropy device", ["running (attested)"])
    return rec.entropy


@hookimpl
def vmk_hypervisor_write(kernel: Kernel, vm: VM, gpa: int, data: bytes) -> bool | None:
    rec = _record(kernel, vm)
    if rec is None or rec.agent is None:
        return None
    rec.agent.ctx.engine.hypervisor_write(gpa, data)
    return True


def engine_of(kernel: Kernel, ref: VM | str) -> MemoryEncryptionEngine:
    """The memory-encryption engine of a launched confidential VM."""
    vm = kernel.vm(ref)
    rec = _record(kernel, vm)
    if rec is None or rec.agent is None:
        raise IllegalTransition("vm", vm.id, vm.state.value, "memory encryption", ["launched confidential"])
    return rec.agent.ctx.engine


def attest(kernel: Kernel, ref: VM | str) -> tuple[AttestationReport, dict[str, Any]]:
    """Attest a running confidential VM again: a fresh challenge, report and signed result.

    Returns the decoded report and the authority's result; the verdict and
    codes go to the journal.  The VM keeps its provisioned identity.
    """
    vm = kernel.vm(ref)
    st = state_of(kernel)
    rec = _record(kernel, vm)
    if rec is None or rec.agent is None:
        raise IllegalTransition("vm", vm.id, vm.state.value, "attest", ["launched confidential"])
    challenge = st.transport.request(rec.workload)
    evidence = rec.agent.evidence(challenge, vmpl=rec.options.vmpl)
    outcome = st.transport.submit(evidence)
    result = dict(outcome.result)
    kernel.emit(
        "confidential.attestation",
        f"vm:{vm.id}",
        verdict=outcome.verdict,
        codes=outcome.codes,
        measurement=str((result.get("report") or {}).get("measurement", "")),
    )
    return AttestationReport.parse(evidence.report), result


# ---------------------------------------------------------------------------
# invariants, report, demo


def _secret_forms(secret: bytes) -> list[bytes]:
    return [secret, secret.hex().encode(), base64.b64encode(secret)]


def _no_secret_in_host_state(kernel: Kernel) -> str | None:
    st = state_of(kernel)
    secrets = st.authority.known_secrets() if st.authority is not None else []
    secrets += [
        s for rec in st.vms.values() if rec.agent is not None and (s := rec.agent.secret()) is not None
    ]
    if not secrets:
        return None
    journal = io.StringIO()
    kernel.journal.write_jsonl(journal)
    visible = [("journal", journal.getvalue().encode()), ("logs", "\n".join(st.logs).encode())]
    for rec in st.vms.values():
        if rec.agent is not None:
            engine = rec.agent.ctx.engine
            pages = sorted(engine.store.pages())
            visible.append((f"host view of vm {rec.name} memory", engine.host_read_pages(pages)))
    for secret in secrets:
        for where, blob in visible:
            if any(form in blob for form in _secret_forms(secret)):
                return f"a released secret appears in the {where}"
    return None


def _release_requires_pass(kernel: Kernel) -> str | None:
    st = state_of(kernel)
    if st.authority is not None:
        for r in st.authority.records:
            if r.released and (
                r.verdict != "VERIFIED"
                or r.codes
                or not all(c in r.checks for c in (*MANDATORY_CHECKS, "nonce_fresh"))
            ):
                return f"released to {r.workload} with verdict {r.verdict}, failures {list(r.codes)}"
        if any(not r.released and r.verdict == "VERIFIED" for r in st.authority.records):
            return "a VERIFIED result came without its release"
    for rec in st.vms.values():
        has = rec.certificate is not None or (rec.agent is not None and rec.agent.provisioned is not None)
        if has and rec.verdict != "VERIFIED":
            return f"vm {rec.name} holds an identity or secret with verdict {rec.verdict}"
    return None


def _private_memory_encrypted(kernel: Kernel) -> str | None:
    st = state_of(kernel)
    firmware = LaunchImage().firmware[:4096]
    for rec in st.vms.values():
        if rec.agent is not None:
            engine = rec.agent.ctx.engine
            gpa = LaunchImage().firmware_gpas()[0]
            if engine.host_read_pages([gpa]) == firmware:
                return f"vm {rec.name}: the host reads plaintext firmware at {gpa:#x}"
            if engine.guest_read_pages([gpa]) != firmware:
                return f"vm {rec.name}: the guest does not read back its firmware at {gpa:#x}"
    return None


@hookimpl
def vmk_invariants(kernel: Kernel) -> list[Invariant]:
    return [
        Invariant("confidential.no-secret-in-host-state", lambda: _no_secret_in_host_state(kernel)),
        Invariant("confidential.release-requires-pass", lambda: _release_requires_pass(kernel)),
        Invariant("confidential.private-memory-encrypted", lambda: _private_memory_encrypted(kernel)),
    ]


@hookimpl
def vmk_report(kernel: Kernel) -> ReportSection:
    st = state_of(kernel)
    present = {h.id for h in kernel.hosts()} | {EMBEDDED_HOST}
    lines = [
        f"host {h}: {m.generation}, chip {m.chip_id.hex()[:16]}…, TCB {m.tcb.as_dict()}"
        for h, m in sorted(st.modules.items())
        if h in present
    ]
    for rec in sorted(st.vms.values(), key=lambda r: r.name):
        served = rec.entropy.stats.bytes if rec.entropy is not None else 0
        codes = f" ({', '.join(rec.codes)})" if rec.codes else ""
        lines.append(
            f"vm {rec.name}: {rec.options.mode.value}, {rec.verdict}{codes}, entropy served {served} bytes"
        )
    if st.authority is not None:
        s = st.authority.stats
        lines.append(
            f"trust authority ({st.transport.endpoint}): {s.challenges} challenges, "
            f"{s.verified} verified, {s.rejected} rejected {dict(sorted(s.by_code.items()))}"
        )
    lines.append(f"entropy denials: {st.denials}")
    return ReportSection("confidential VMs", lines)


@hookimpl
def vmk_demo(kernel: Kernel, demo: Any) -> None:
    from .quality import assess_min_entropy

    demo.step("launch a confidential VM: measured, attested, identity certificate issued")
    vm = kernel.create_vm("cvm-demo", memory_mib=64, confidential=True)
    kernel.launch_vm(vm.id)
    cert = kernel.identity(vm.id)
    demo.record("identity", cert.subject.rfc4514_string())
    measurement = state_of(kernel).vms[vm.id].measurement or b""
    demo.record("measurement", measurement.hex()[:24] + "…")
    engine = engine_of(kernel, vm)
    if isinstance(engine.store, SplitPageStore):
        demo.step("the host reads the VM's first firmware page through guest memory: ciphertext")
        gpa = LaunchImage().firmware_gpas()[0]
        host = kernel.guest_memory(vm.id).read(gpa, PAGE_SIZE)
        demo.record("pages in", "the processor's guest memory")
        demo.record("host view differs from guest view", host != engine.guest_read_pages([gpa]))
    else:
        demo.record("pages in", "the engine's own store (no processor plugin)")
    demo.step("read 1 MiB from its entropy device and estimate min-entropy")
    sample = kernel.entropy(vm.id).read(1 << 20)
    est = assess_min_entropy(sample)
    demo.record("entropy min-entropy bits/byte", round(est.min_entropy, 3))
    demo.step("a hypervisor replaying an entropy page is denied")
    device = kernel.entropy(vm.id)
    try:
        device.serve([device._next - 4096], bytes(4096))
    except VmkError as exc:
        demo.record("replay", type(exc).__name__)
    demo.step("a VM launched with DEBUG=1 is refused with its reason")
    bad = kernel.create_vm("cvm-debug", memory_mib=64, confidential={"debug": True})
    try:
        kernel.launch_vm(bad.id)
    except VmkError as exc:
        codes = getattr(exc, "codes", None) or getattr(exc.__cause__, "codes", None) or [type(exc).__name__]
        demo.record("debug VM", ", ".join(codes))


# ---------------------------------------------------------------------------
# command line


def _kernel_for_cli(ctx: click.Context, *, url: str | None, policy: str | None) -> Kernel:
    obj = ctx.find_root().obj or {}
    config: dict[str, Any] = {"deterministic_keys": True}
    if url:
        config["trust_authority"] = url
    if policy:
        config["policy"] = policy
    data_dir = Path(obj.get("data_dir") or "./vmkernel-data")
    settings = {"seed": obj.get("seed", 0), "data_dir": data_dir, "block": obj.get("block", ())}
    kernel = Kernel(**settings, config={"confidential": config})
    if KEY in kernel.stash:
        return kernel
    kernel.close()  # not installed as an entry point (a source checkout): register it explicitly
    return Kernel(**settings, plugins=[sys.modules[__name__]], config={"confidential": config})


def _cvm(kernel: Kernel, name: str, options: Any) -> VM:
    found = [vm for vm in kernel.vms() if vm.name == name]
    vm = found[0] if found else kernel.create_vm(name, memory_mib=64, confidential=options)
    if vm.state is not VMState.RUNNING:
        kernel.launch_vm(vm.id)
    return vm


@hookimpl
def vmk_cli_commands(group: click.Group) -> None:
    @group.command("attest")
    @click.argument("vm")
    @click.option("--url", default=None, help="Trust authority URL (default: in-process).")
    @click.option(
        "--policy", type=click.Path(dir_okay=False), default=None, help="Reference-value policy file."
    )
    @click.option("--debug", "debug", is_flag=True, help="Launch the VM with DEBUG=1 (it must be refused).")
    @click.option("--mode", type=click.Choice(["sev", "snp"]), default="snp", show_default=True)
    @click.pass_context
    def attest_cmd(
        ctx: click.Context, vm: str, url: str | None, policy: str | None, debug: bool, mode: str
    ) -> None:
        """Launch confidential VM VM if needed, attest it, print the report and the verdict."""
        with _kernel_for_cli(ctx, url=url, policy=policy) as kernel:
            try:
                handle = _cvm(kernel, vm, {"debug": debug, "mode": mode})
            except VmkError as exc:
                cause = exc.__cause__ if isinstance(exc.__cause__, AttestationError) else exc
                click.echo("verdict: REJECTED")
                for code, detail in getattr(cause, "reasons", [(type(cause).__name__, str(cause))]):
                    click.echo(f"  {code}: {detail}")
                ctx.exit(1)
            report, result = attest(kernel, handle)
            for key, value in report.summary().items():
                click.echo(f"{key:>13}: {value}")
            click.echo(f"verdict: {result['verdict']} ({len(result['checks'])} checks)")
            for failure in result["failures"]:
                click.echo(f"  {failure['code']}: {failure['detail']}")
            click.echo(f"identity: {kernel.identity(handle).subject.rfc4514_string()}")
            if result["verdict"] != "VERIFIED":
                ctx.exit(1)

    @group.command("entropy")
    @click.argument("vm")
    @click.option("--bytes", "nbytes", type=click.IntRange(1, 1 << 30), default=1 << 20, show_default=True)
    @click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), required=True)
    @click.option("--mode", type=click.Choice(["sev", "snp"]), default="snp", show_default=True)
    @click.pass_context
    def entropy_cmd(ctx: click.Context, vm: str, nbytes: int, output: str, mode: str) -> None:
        """Write NBYTES from confidential VM VM's entropy device to a file (for ent, dieharder …)."""
        from .quality import assess_min_entropy

        with _kernel_for_cli(ctx, url=None, policy=None) as kernel:
            handle = _cvm(kernel, vm, {"mode": mode})
            data = kernel.entropy(handle).read(nbytes)
            Path(output).write_bytes(data)
            msg = f"wrote {nbytes} bytes to {output}"
            if nbytes >= 8192:
                msg += f"; min-entropy {assess_min_entropy(data).min_entropy:.3f} bits/byte"
            click.echo(msg)

    @group.group("trust-authority")
    def trust_authority() -> None:
        """The attestation trust authority as an HTTP service."""

    @trust_authority.command("serve")
    @click.option("--host", default="127.0.0.1", show_default=True)
    @click.option("--port", type=click.IntRange(0, 65535), default=8640, show_default=True)
    @click.option("--policy", type=click.Path(dir_okay=False, exists=True), default=None)
    @click.pass_context
    def serve(ctx: click.Context, host: str, port: int, policy: str | None) -> None:
        """Serve the trust authority (default policy: the seed's emulated vendor roots)."""
        import time

        from .service import serve as serve_app

        seed = (ctx.find_root().obj or {}).get("seed", 0)
        ref = ReferencePolicy.load(policy) if policy else _seed_policy(seed)
        authority = TrustAuthority(ref, clock=time.monotonic_ns)
        click.echo(f"trust authority on http://{host}:{port} ({len(ref.allowed_measurements)} measurements)")
        serve_app(authority, host, port)

    @trust_authority.command("policy")
    @click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), required=True)
    @click.pass_context
    def policy_cmd(ctx: click.Context, output: str) -> None:
        """Write the default reference-value policy for the seed's emulated vendor."""
        seed = (ctx.find_root().obj or {}).get("seed", 0)
        _seed_policy(seed).dump(output)
        click.echo(f"wrote {output}")


def _seed_policy(seed: int) -> ReferencePolicy:
    """The default policy of a kernel with this seed and ``deterministic_keys``."""
    with Kernel(
        seed=seed,
        autoload=False,
        plugins=[sys.modules[__name__]],
        config={"confidential": {"deterministic_keys": True}},
    ) as kernel:
        return state_of(kernel).policy
