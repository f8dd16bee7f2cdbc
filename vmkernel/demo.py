"""``vmkernel demo``: the built-in scenario that exercises every loaded plugin.

The kernel sets up a small cluster (hosts, a principal, a few VMs through
their whole lifecycle), then hands the kernel to every plugin's ``vmk_demo``
hook in registration order, then checks every invariant and prints one
report: the kernel's summary, each plugin's report section and the figures
each plugin recorded.  The journal is written next to the data so that
``vmkernel status`` can show it later.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from vmkernel._kernel import Kernel
from vmkernel._plugins import call_impl
from vmkernel._results import ReportSection
from vmkernel.errors import InvalidArgument, VmkError

__all__ = ["DEMO_MARKER", "DemoContext", "DemoResult", "run_demo"]

#: A file the demo leaves in its data directory, so a rerun knows it may start afresh.
DEMO_MARKER = ".vmkernel-demo"


@dataclass
class DemoContext:
    """What a plugin's ``vmk_demo`` hook gets besides the kernel."""

    out: IO[str]
    plugin: str = "kernel"
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    _step: int = 0

    def step(self, text: str) -> None:
        """Show progress: one line per step of the scenario."""
        self._step += 1
        print(f"  [{self.plugin}] {text}", file=self.out, flush=True)

    def record(self, key: str, value: Any) -> None:
        """Keep a figure for the report (shown under the plugin's name)."""
        self.records.setdefault(self.plugin, {})[key] = value


@dataclass
class DemoResult:
    """What ``run_demo`` returns: the report sections and the invariant outcome."""

    sections: list[ReportSection]
    records: dict[str, dict[str, Any]]
    invariants: dict[str, str | None]
    journal_path: Path
    digest: str
    errors: dict[str, str]

    @property
    def ok(self) -> bool:
        return not self.errors and all(v is None for v in self.invariants.values())


def prepare_data_dir(data_dir: Path) -> None:
    """Use ``data_dir`` for the demo: create it, or wipe a previous demo run there.

    A non-empty directory that is not a previous demo is refused rather than
    overwritten.
    """
    if data_dir.exists() and not data_dir.is_dir():
        raise InvalidArgument("data dir", str(data_dir), "a directory")
    if data_dir.exists() and any(data_dir.iterdir()):
        if not (data_dir / DEMO_MARKER).exists():
            raise InvalidArgument(
                "data dir",
                str(data_dir),
                "an empty directory or one a previous demo used (it has other files)",
            )
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / DEMO_MARKER).write_text(
        "written by vmkernel demo; the next demo run may remove this directory\n"
    )


def run_demo(
    data_dir: Path,
    *,
    seed: int = 0,
    out: IO[str] | None = None,
    kernel_factory: Callable[..., Kernel] = Kernel,
    **kernel_kwargs: Any,
) -> DemoResult:
    """Run the scenario on the embedded default in ``data_dir`` and collect the report."""
    out = out or sys.stderr
    prepare_data_dir(data_dir)
    ctx = DemoContext(out=out)
    errors: dict[str, str] = {}
    with kernel_factory(seed=seed, data_dir=data_dir, **kernel_kwargs) as k:
        names = [p.name for p in k.plugins()]
        print(
            f"vmkernel demo: seed {seed}, data in {data_dir}, "
            f"{len(names)} plugins: {', '.join(names) or 'none'}",
            file=out,
            flush=True,
        )
        ctx.step("cluster: 2 hosts, principal alice, VMs web and db")
        k.add_host("host-a", memory_mib=65536, cpus=32)
        k.add_host("host-b", memory_mib=32768, cpus=16)
        k.add_principal("alice", roles=["developer"])
        web = k.create_vm("web", memory_mib=64, principal="alice")
        db = k.create_vm("db", memory_mib=128, vcpus=2)
        k.launch_vm(web)
        k.launch_vm(db)
        k.clock.advance(1_000_000)
        k.stop_vm(db)
        ctx.record("vms", f"web={web.state.value} db={db.state.value}")

        impls = {impl.plugin_name: impl for impl in k.hook.vmk_demo.get_hookimpls()}
        ordered = [n for n in names if n in impls]
        for index, name in enumerate(ordered, start=1):
            ctx.plugin = name
            print(f"[{index}/{len(ordered)}] {name}", file=out, flush=True)
            started = time.perf_counter()  # for the progress line only; never enters the kernel
            try:
                call_impl(impls[name], kernel=k, demo=ctx)
            except VmkError as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
            except Exception as exc:
                errors[name] = f"unexpected {type(exc).__name__}: {exc}"
            print(f"      done in {time.perf_counter() - started:.2f} s", file=out, flush=True)
        ctx.plugin = "kernel"

        invariants: dict[str, str | None] = {}
        for inv in k.invariants():
            try:
                invariants[inv.name] = inv.check()
            except Exception as exc:
                invariants[inv.name] = f"check raised {type(exc).__name__}: {exc}"
        sections = k.report()
        journal_path = data_dir / "journal.jsonl"
        with journal_path.open("w", encoding="utf-8") as fp:
            k.journal.write_jsonl(fp)
        digest = k.journal.digest()
    return DemoResult(sections, ctx.records, invariants, journal_path, digest, errors)


def format_report(result: DemoResult) -> str:
    """The human-readable demo report."""
    lines = ["", "=" * 72, "vmkernel demo report", "=" * 72]
    for section in result.sections:
        lines.append(f"\n## {section.title}")
        lines.extend(f"  {line}" for line in section.lines)
    if result.records:
        lines.append("\n## demo figures")
        for plugin, figures in result.records.items():
            for key, value in figures.items():
                lines.append(f"  {plugin}: {key} = {value}")
    lines.append("\n## invariants")
    for name, problem in result.invariants.items():
        lines.append(
            f"  {'ok  ' if problem is None else 'FAIL'} {name}" + ("" if problem is None else f": {problem}")
        )
    if result.errors:
        lines.append("\n## plugin errors")
        lines.extend(f"  {name}: {err}" for name, err in result.errors.items())
    lines.append(f"\njournal: {result.journal_path} (digest {result.digest})")
    lines.append("result: " + ("OK" if result.ok else "PROBLEMS FOUND"))
    return "\n".join(lines)
