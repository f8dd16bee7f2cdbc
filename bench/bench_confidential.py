"""Confidential-VM figures, measured side by side in one run.

Prints: full attestation (challenge, report, verification, sealed secret,
identity certificate, guest acceptance) per VM in-process and over HTTP on
loopback; a whole confidential launch through the kernel; entropy-device
throughput on both paths; private-page encryption through the engine, in
batches against one call per page; the same engine with its pages in the
processor plugin's guest memory against its own sparse store; and the crypto
primitives underneath.

Run: .venv/bin/python bench/bench_confidential.py [--quick]
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from vmk_confidential import plugin as confidential
from vmk_confidential.authority import HPKE_INFO, HPKE_SUITE
from vmk_confidential.entropy import EntropyDevice
from vmk_confidential.lab import Lab
from vmk_confidential.memory import PAGE_SIZE, DictPageStore, EncryptionMode, MemoryEncryptionEngine
from vmk_confidential.policy import ReferencePolicy
from vmk_confidential.report import AttestationReport, Tcb
from vmk_confidential.service import HttpTransport, ServerThread
from vmk_confidential.verify import verify_evidence

from vmkernel import Kernel

QUICK = "--quick" in sys.argv
DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "confidential"


def rate(fn: Callable[[], object], n: int) -> float:
    fn()  # warm up
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - start)


def line(name: str, value: float, unit: str, note: str = "") -> None:
    print(f"  {name:<52} {value:>11.2f} {unit:<8} {note}")


def attestation() -> None:
    print(
        "attestation (challenge -> report -> verify -> HPKE-sealed secret + X.509 identity -> guest accepts)"
    )
    n = 50 if QUICK else 300
    lab = Lab()
    agents = [lab.launch() for _ in range(2 * n)]
    it = iter(agents)
    t_in = 1000.0 / rate(lambda: next(it).attest(lab.transport, "w"), n - 1)
    with ServerThread(lab.authority) as server:
        http = HttpTransport(server.url)
        t_http = 1000.0 / rate(lambda: next(it).attest(http, "w"), n - 1)
        http.close()
    line(
        "full attestation per VM, in-process", t_in, "ms", f"goal <= 5 ms: {'met' if t_in <= 5 else 'MISSED'}"
    )
    line("full attestation per VM, HTTP on loopback", t_http, "ms", f"({t_http / t_in:.1f}x in-process)")
    with Kernel(seed=1, plugins=[confidential], autoload=False) as k:
        count = [0]

        def launch() -> None:
            count[0] += 1
            vm = k.create_vm(f"vm{count[0]}", confidential=True)
            k.launch_vm(vm.id)

        line("kernel create+launch (measure, encrypt, attest)", 1000.0 / rate(launch, n // 2), "ms")


def entropy() -> None:
    print("entropy device")
    total = (16 if QUICK else 64) << 20
    for mode in EncryptionMode:
        engine = MemoryEncryptionEngine(DictPageStore(), os.urandom(64), mode)
        device = EntropyDevice(engine, np.random.Generator(np.random.PCG64(1)).bytes)
        device.read(1 << 20)
        start = time.perf_counter()
        device.read(total)
        mbs = total / (1 << 20) / (time.perf_counter() - start)
        goal = f"goal >= 100 MB/s: {'met' if mbs >= 100 else 'MISSED'}"
        line(f"throughput, {mode.value} path ({device.path})", mbs, "MB/s", goal)
        small = rate(lambda: device.read(32), 2000 if not QUICK else 500)  # noqa: B023 (used at once)
        line(f"32-byte requests, {mode.value} path", small, "req/s")


def encryption() -> None:
    print("private-page encryption (AES-256-XTS, tweak = GPA)")
    key = os.urandom(64)
    pages = 256
    gpas = [i * PAGE_SIZE for i in range(pages)]
    data = os.urandom(pages * PAGE_SIZE)
    reps = 10 if QUICK else 40

    def per_page() -> None:
        for i, gpa in enumerate(gpas):
            ctx = Cipher(algorithms.AES(key), modes.XTS(gpa.to_bytes(16, "little"))).encryptor()
            ctx.update(data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])

    raw = rate(per_page, reps) * pages
    engine = MemoryEncryptionEngine(DictPageStore(), key, EncryptionMode.SNP)
    engine.mark_private(gpas)

    def engine_per_page() -> None:
        for i, gpa in enumerate(gpas):
            engine.guest_write_pages([gpa], data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE])

    single = rate(engine_per_page, reps) * pages
    batched = rate(lambda: engine.guest_write_pages(gpas, data), reps) * pages
    decrypt = rate(lambda: engine.guest_read_pages(gpas), reps) * pages
    mib = PAGE_SIZE / (1 << 20)
    line("library XTS, one call per page (no engine)", raw * mib, "MB/s", f"{raw:,.0f} pages/s")
    line("engine guest_write_pages, one call per page", single * mib, "MB/s", f"{single:,.0f} pages/s")
    line(
        "engine guest_write_pages, 256-page batches",
        batched * mib,
        "MB/s",
        f"{batched:,.0f} pages/s, {batched / single:.1f}x per-page calls",
    )
    line(
        "engine guest_read_pages (decrypt), 256-page batches",
        decrypt * mib,
        "MB/s",
        f"{decrypt:,.0f} pages/s",
    )


def guest_memory_store() -> None:
    print("where the pages live: the processor's guest memory against the engine's own store")
    from vmk_processor import plugin as processor

    n = 10 if QUICK else 40
    pages = 256
    gpas = [0x20_0000 + i * PAGE_SIZE for i in range(pages)]
    data = os.urandom(pages * PAGE_SIZE)
    mib = pages * PAGE_SIZE / (1 << 20)
    config = {"processor.memory_mib": 1024}
    with (
        Kernel(seed=1, plugins=[confidential], autoload=False) as alone,
        Kernel(seed=1, plugins=[processor, confidential], autoload=False, config=config) as both,
    ):
        engines = {}
        for label, k in (("own store", alone), ("guest memory", both)):
            vm = k.create_vm("cvm", memory_mib=16, confidential=True)
            k.launch_vm(vm.id)
            engines[label] = confidential.engine_of(k, vm.id)
            engines[label].mark_private(gpas)
        for label, engine in engines.items():
            w = rate(lambda e=engine: e.guest_write_pages(gpas, data), n) * mib  # type: ignore[misc]
            r = rate(lambda e=engine: e.guest_read_pages(gpas), n) * mib  # type: ignore[misc]
            line(f"engine 256-page write / read, {label}", w, "MB/s", f"read {r:.0f} MB/s")
        store = engines["guest memory"].store
        raw = rate(lambda: store.write_pages(gpas, data), n) * mib
        line("guest memory write_pages alone, 256-page batches", raw, "MB/s")
        for label, k in (("own store", alone), ("guest memory", both)):
            count = [0]

            def launch(k: Kernel = k, count: list[int] = count) -> None:
                count[0] += 1
                vm = k.create_vm(f"l{count[0]}", memory_mib=16, confidential=True)
                k.launch_vm(vm.id)
                k.destroy_vm(vm.id, force=True)

            line(f"kernel create+launch+destroy, {label}", 1000.0 / rate(launch, n // 2), "ms")
            device = k.entropy(k.vms()[0].id)
            start = time.perf_counter()
            device.read(16 << 20)
            line(f"entropy throughput, {label}", 16 / (time.perf_counter() - start), "MB/s")


def primitives() -> None:
    print("primitives")
    key = ec.generate_private_key(ec.SECP384R1())
    msg = bytes(0x2A0)
    sig = key.sign(msg, ec.ECDSA(hashes.SHA384()))
    n = 200 if QUICK else 1000
    line("ECDSA P-384 sign", rate(lambda: key.sign(msg, ec.ECDSA(hashes.SHA384())), n), "/s")
    line(
        "ECDSA P-384 verify",
        rate(lambda: key.public_key().verify(sig, msg, ec.ECDSA(hashes.SHA384())), n),
        "/s",
    )
    line(
        "HPKE P-384 seal",
        rate(lambda: HPKE_SUITE.encrypt(b"s" * 32, key.public_key(), info=HPKE_INFO), n),
        "/s",
    )
    lab = Lab()
    agent = lab.launch()
    line("X.509 identity issuance", rate(lambda: lab.authority._issue(key.public_key(), "w", 0), n), "/s")
    ev = lab.evidence(agent)
    line(
        "emulated report + chain verification",
        rate(
            lambda: verify_evidence(
                ev.report, ev.vcek, ev.ask, ev.ark, lab.policy, nonce=ev.nonce, public_key_der=ev.public_key
            ),
            n,
        ),
        "/s",
    )
    report = bytes.fromhex((DATA / "report_milan.hex").read_text().strip())
    vcek = (DATA / "vcek_milan.der").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ask, ark = x509.load_pem_x509_certificates((DATA / "cert_chain_milan").read_bytes())
    rep = AttestationReport.parse(report)
    policy = ReferencePolicy(
        allowed_measurements=frozenset({rep.measurement}),
        pinned_roots={"Milan": ark},
        minimum_tcb=Tcb(3, 0, 8, 115),
    )
    der = serialization.Encoding.DER
    line(
        "real Milan report + RSA-PSS chain verification",
        rate(
            lambda: verify_evidence(
                report,
                vcek,
                ask.public_bytes(der),
                ark.public_bytes(der),
                policy,
                expected_report_data=rep.report_data,
            ),
            n // 2,
        ),
        "/s",
    )


if __name__ == "__main__":
    print(f"bench_confidential ({'quick' if QUICK else 'full'}), {os.cpu_count()} cores")
    attestation()
    entropy()
    encryption()
    guest_memory_store()
    primitives()
