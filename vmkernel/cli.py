"""The ``vmkernel`` command line.

Built on click.  Plugins add their own command groups through
``vmk_cli_commands``; the plugin manager used for that is built once at
start-up, honouring ``--no-autoload``-style environment variables the same
way a kernel does.  Plugin commands get a ready kernel with
:func:`pass_kernel` and show progress with :func:`progress`.

Every vmkernel error ends the command with exit status 1 and one line on
stderr naming what was wrong; a traceback means a bug.
"""

from __future__ import annotations

import functools
import os
import runpy
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

import vmkernel
from vmkernel._journal import Journal
from vmkernel._kernel import Kernel
from vmkernel._plugins import build_plugin_manager, describe_plugins
from vmkernel.errors import ScenarioError, VmkError

__all__ = ["DEFAULT_DATA_DIR", "cli", "main", "pass_kernel", "progress"]

#: Where the embedded default keeps its state unless told otherwise.
DEFAULT_DATA_DIR = "./vmkernel-data"

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def _kernel_from_context(ctx: click.Context, data_dir: str | None = None) -> Kernel:
    obj = ctx.find_root().obj or {}
    return Kernel(
        seed=obj.get("seed", 0),
        data_dir=Path(data_dir or obj.get("data_dir") or DEFAULT_DATA_DIR),
        block=obj.get("block", ()),
    )


def pass_kernel(fn: F) -> F:
    """Decorate a click command so that it receives a kernel built from the global options.

    The kernel uses ``--seed`` and ``--data-dir`` of the ``vmkernel`` group
    and is closed when the command returns.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        with _kernel_from_context(ctx) as kernel:
            return fn(kernel, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def progress(items: Iterable[T], *, length: int | None = None, label: str = "") -> Iterator[T]:
    """Iterate with a progress bar on a terminal (silent when output is redirected)."""
    with click.progressbar(items, length=length, label=label, file=sys.stderr) as bar:
        yield from bar


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(vmkernel.__version__, prog_name="vmkernel")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the kernel.")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    envvar="VMKERNEL_DATA_DIR",
    help=f"Data directory of the embedded default [default: {DEFAULT_DATA_DIR}].",
)
@click.option("--block", "block", multiple=True, help="Do not load this plugin (repeatable).")
@click.pass_context
def cli(ctx: click.Context, seed: int, data_dir: str | None, block: tuple[str, ...]) -> None:
    """vmkernel: a programmable virtualization lab."""
    ctx.obj = {"seed": seed, "data_dir": data_dir, "block": block}


@cli.command()
@click.option("--no-autoload", is_flag=True, help="Only show what would load with autoload off.")
@click.pass_context
def plugins(ctx: click.Context, no_autoload: bool) -> None:
    """List every loaded plugin, where it came from and the hooks it implements."""
    pm = build_plugin_manager(autoload=not no_autoload and None, block=ctx.obj["block"])
    infos = describe_plugins(pm)
    if not infos:
        click.echo("no plugins loaded")
    for info in infos:
        click.echo(f"{info.name}  ({info.source})")
        click.echo("    hooks: " + (", ".join(info.hooks) or "none"))


@cli.command()
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="Data directory to inspect.")
@click.pass_context
def status(ctx: click.Context, data_dir: str | None) -> None:
    """Show the plugins' view of a data directory and its last journal."""
    with _kernel_from_context(ctx, data_dir) as kernel:
        click.echo(f"vmkernel {vmkernel.__version__}, data directory {kernel.data_dir}")
        click.echo("plugins: " + (", ".join(p.name for p in kernel.plugins()) or "none"))
        for section in kernel.report()[1:]:
            click.echo(f"\n## {section.title}")
            for line in section.lines:
                click.echo(f"  {line}")
        journal_path = kernel.data_dir / "journal.jsonl"
        if journal_path.exists():
            with journal_path.open(encoding="utf-8") as fp:
                events = Journal.read_jsonl(fp)
            kinds: dict[str, int] = {}
            for e in events:
                kinds[e.kind] = kinds.get(e.kind, 0) + 1
            click.echo(f"\n## last journal ({journal_path})")
            click.echo(f"  {len(events)} events; " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
        else:
            click.echo("\nno journal yet (run `vmkernel demo` or `vmkernel run SCRIPT --journal FILE`)")


@cli.command()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help=f"Where the demo keeps its data [default: {DEFAULT_DATA_DIR}].",
)
@click.pass_context
def demo(ctx: click.Context, data_dir: str | None) -> None:
    """Run the built-in scenario over every loaded plugin and print a report."""
    from vmkernel.demo import format_report, run_demo

    obj = ctx.find_root().obj
    path = Path(data_dir or obj.get("data_dir") or DEFAULT_DATA_DIR)
    result = run_demo(path, seed=obj["seed"], block=obj["block"])
    click.echo(format_report(result))
    if not result.ok:
        ctx.exit(1)


@cli.command()
@click.argument("script", type=click.Path(dir_okay=False))
@click.option(
    "--data-dir", type=click.Path(file_okay=False), default=None, help="Data directory of the kernel."
)
@click.option(
    "--journal",
    "journal_out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the journal as JSON Lines to this file afterwards.",
)
@click.pass_context
def run(ctx: click.Context, script: str, data_dir: str | None, journal_out: str | None) -> None:
    """Run a Python scenario SCRIPT with a ready kernel bound to the name ``kernel``."""
    path = Path(script)
    if not path.is_file():
        raise ScenarioError(script, "no such file")
    source = path.read_text(encoding="utf-8", errors="replace")
    try:
        compile(source, str(path), "exec")
    except SyntaxError as exc:
        raise ScenarioError(script, f"syntax error: {exc.msg}", exc.lineno) from None
    with _kernel_from_context(ctx, data_dir) as kernel:
        try:
            runpy.run_path(
                str(path), init_globals={"kernel": kernel, "vmkernel": vmkernel}, run_name="__main__"
            )
        except VmkError as exc:
            line = _script_line(exc, path)
            raise ScenarioError(script, f"{type(exc).__name__}: {exc}", line) from exc
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise ScenarioError(script, f"exited with status {exc.code}") from None
        except Exception as exc:
            line = _script_line(exc, path)
            raise ScenarioError(script, f"{type(exc).__name__}: {exc}", line) from exc
        if journal_out:
            with open(journal_out, "w", encoding="utf-8") as fp:
                kernel.journal.write_jsonl(fp)
        click.echo(f"scenario {script}: {len(kernel.journal)} events, digest {kernel.journal.digest()}")


def _script_line(exc: BaseException, path: Path) -> int | None:
    resolved = str(path.resolve())
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename and os.path.abspath(frame.filename) == resolved:
            line = frame.lineno
    return line


def _add_plugin_commands() -> None:
    try:
        pm = build_plugin_manager(
            block=[b for b in os.environ.get("VMKERNEL_BLOCK_PLUGINS", "").split(",") if b]
        )
    except VmkError as exc:
        click.echo(f"warning: plugins not loaded: {exc}", err=True)
        return
    pm.hook.vmk_cli_commands(group=cli)


_plugins_added = False


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vmkernel`` script."""
    global _plugins_added  # the CLI group is module-level, as click expects; add plugin commands once
    if not _plugins_added:
        _add_plugin_commands()
        _plugins_added = True
    try:
        # Non-standalone mode returns the exit code of ctx.exit() instead of raising SystemExit.
        rc = cli.main(args=argv, prog_name="vmkernel", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except VmkError as exc:
        click.echo(f"error: {exc}", err=True)
        return 1
    except click.exceptions.Exit as exc:
        return exc.exit_code
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
