"""The `vmkernel` command line, run as a user would."""

from __future__ import annotations

import subprocess
import sys

import pytest

import vmkernel
from vmkernel.cli import main


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmkernel.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_version(capsys):
    assert main(["--version"]) == 0
    assert vmkernel.__version__ in capsys.readouterr().out


def test_plugins_lists_entry_points():
    out = run_cli("plugins").stdout
    assert "cluster  (entry point of vmkernel-plugins" in out
    assert "vmk_vm_create" in out


def test_plugins_can_be_blocked():
    out = run_cli("--block", "cluster", "plugins").stdout
    assert "cluster" not in out


def test_demo_runs_and_reports(tmp_path):
    result = run_cli("demo", "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 0, result.stderr
    assert "vmkernel demo report" in result.stdout
    assert "result: OK" in result.stdout
    assert "## cluster" in result.stdout
    assert (tmp_path / "data" / "journal.jsonl").exists()
    # a second run reuses its own directory
    assert run_cli("demo", "--data-dir", str(tmp_path / "data")).returncode == 0


def test_demo_is_deterministic(tmp_path):
    a = run_cli("demo", "--data-dir", str(tmp_path / "a"))
    b = run_cli("demo", "--data-dir", str(tmp_path / "b"))
    assert (tmp_path / "a" / "journal.jsonl").read_bytes() == (tmp_path / "b" / "journal.jsonl").read_bytes()
    assert a.returncode == b.returncode == 0


def test_demo_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    result = run_cli("demo", "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert "error: data dir" in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_status_after_demo(tmp_path):
    run_cli("demo", "--data-dir", str(tmp_path / "d"))
    out = run_cli("status", "--data-dir", str(tmp_path / "d")).stdout
    assert "last journal" in out and "vm.create" in out


def test_run_script(tmp_path):
    script = tmp_path / "scenario.py"
    script.write_text(
        "vm = kernel.create_vm('web')\nkernel.launch_vm(vm.id)\nprint('state', vm.state.value)\n"
    )
    journal = tmp_path / "j.jsonl"
    result = run_cli("run", str(script), "--journal", str(journal), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 0, result.stderr
    assert "state running" in result.stdout
    assert '"kind":"vm.launch"' in journal.read_text()


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        ("def broken(:\n", "line 1: syntax error"),
        ("x = 1\nkernel.launch_vm('nope')\n", "line 2: UnknownResource"),
        ("raise RuntimeError('boom')\n", "line 1: RuntimeError: boom"),
        ("import sys\nsys.exit(3)\n", "exited with status 3"),
    ],
)
def test_run_bad_scripts_give_typed_errors(tmp_path, body, expect):
    script = tmp_path / "bad.py"
    script.write_text(body)
    result = run_cli("run", str(script), "--data-dir", str(tmp_path / "d"))
    assert result.returncode == 1
    assert expect in result.stderr
    assert "Traceback" not in result.stderr


def test_run_missing_script(tmp_path):
    result = run_cli("run", str(tmp_path / "nope.py"))
    assert result.returncode == 1 and "no such file" in result.stderr


def test_cluster_simulate():
    result = run_cli("cluster", "simulate", "--hosts", "2", "--vms", "10")
    assert result.returncode == 0, result.stderr
    assert "placed" in result.stdout
