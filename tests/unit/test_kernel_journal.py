"""The journal: canonical JSON lines, round trips, the hash-chain digest, and emit's checks."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmkernel import VM, Event, Journal, Kernel, hookimpl
from vmkernel.errors import InvalidArgument


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[Kernel]:
    with Kernel(seed=4, data_dir=tmp_path / "k", autoload=False) as k:
        yield k


def busy(k: Kernel) -> None:
    k.add_host("h1", memory_mib=4096, cpus=8)
    vm = k.create_vm("web", memory_mib=128, tier="gold", tags=["a", "b"])
    k.clock.advance(1_000)
    k.launch_vm(vm)
    k.emit("note.text", "kernel", text='héllo \u2603 "quoted"\n', n=-3, ok=True, nothing=None, pi=3.5)
    k.destroy_vm(vm, force=True)


def chain(lines: list[bytes]) -> str:
    head = bytes(32)
    for line in lines:
        head = hashlib.sha256(head + len(line).to_bytes(8, "little") + line).digest()
    return head.hex()


def test_lines_are_canonical_json(kernel: Kernel) -> None:
    busy(kernel)
    for event, line in zip(kernel.journal, kernel.journal.lines(), strict=True):
        obj = json.loads(line)
        assert list(obj) == sorted(obj) == ["data", "kind", "seq", "subject", "time_ns"]
        assert list(obj["data"]) == sorted(obj["data"])
        assert obj == event.to_json()
        # compact: no whitespace outside strings
        assert line == json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert [e.seq for e in kernel.journal] == list(range(len(kernel.journal)))


def test_write_read_round_trip(kernel: Kernel) -> None:
    busy(kernel)
    fp = io.StringIO()
    assert kernel.journal.write_jsonl(fp) == len(kernel.journal)
    text = fp.getvalue()
    assert text == kernel.journal.to_jsonl()
    assert text.endswith("\n") and text.count("\n") == len(kernel.journal)
    events = Journal.read_jsonl(io.StringIO(text))
    assert events == list(kernel.journal.events)


def test_round_trip_through_a_file(kernel: Kernel, tmp_path: Path) -> None:
    busy(kernel)
    path = tmp_path / "journal.jsonl"
    with path.open("w", encoding="utf-8") as fp:
        kernel.journal.write_jsonl(fp)
    with path.open(encoding="utf-8") as fp:
        events = Journal.read_jsonl(fp)
    assert [e.to_json() for e in events] == [e.to_json() for e in kernel.journal]
    lines = [line.encode() for line in path.read_text(encoding="utf-8").splitlines()]
    assert chain(lines) == kernel.journal.digest()


def test_read_skips_blank_lines_and_names_a_bad_one() -> None:
    good = '{"data":{},"kind":"x","seq":0,"subject":"s","time_ns":0}\n'
    assert len(Journal.read_jsonl(io.StringIO(good + "\n  \n" + good))) == 2
    for bad in ["{not json\n", '{"kind":"x"}\n', "[1, 2]\n", "42\n"]:
        with pytest.raises(InvalidArgument, match="journal line 2") as info:
            Journal.read_jsonl(io.StringIO(good + bad))
        assert info.value.thing == "journal line 2"


def test_write_to_a_non_file_is_invalid(kernel: Kernel) -> None:
    with pytest.raises(InvalidArgument, match="fp"):
        kernel.journal.write_jsonl("journal.jsonl")  # type: ignore[arg-type]


def test_digest_changes_with_every_event(kernel: Kernel) -> None:
    digests = [kernel.journal.digest()]
    for i in range(20):
        kernel.emit("tick.note", "kernel", i=i)
        digests.append(kernel.journal.digest())
    assert len(set(digests)) == len(digests)
    assert kernel.journal.digest() == digests[-1]  # asking twice changes nothing


def test_digest_is_the_hash_chain_over_the_lines(kernel: Kernel) -> None:
    assert kernel.journal.digest() == chain(kernel.journal.lines())
    busy(kernel)
    # an empty journal's digest is the genesis, 32 zero bytes
    assert kernel.journal.digest() == chain(kernel.journal.lines())
    assert Journal().digest() == bytes(32).hex()


def test_digest_does_not_depend_on_when_it_is_asked(tmp_path: Path) -> None:
    with (
        Kernel(seed=4, data_dir=tmp_path / "a", autoload=False) as a,
        Kernel(seed=4, data_dir=tmp_path / "b", autoload=False) as b,
    ):
        for k, ask in ((a, True), (b, False)):
            for i in range(5):
                k.emit("n", "kernel", i=i)
                if ask:
                    k.journal.digest()
        assert a.journal.digest() == b.journal.digest()


NOT_JSON: list[Any] = [object(), {1, 2}, b"bytes", {"nested": {1: "int key"}}, 2**64, [object()], 1j]


@pytest.mark.parametrize("value", NOT_JSON, ids=[type(v).__name__ for v in NOT_JSON])
def test_non_json_data_is_refused_at_emit(kernel: Kernel, value: Any) -> None:
    lines = kernel.journal.lines()
    with pytest.raises(InvalidArgument, match=r"data of event plugin\.thing") as info:
        kernel.emit("plugin.thing", "kernel", value=value)
    assert "JSON" in info.value.expected
    assert kernel.journal.lines() == lines


def test_non_json_data_inside_an_operation_rolls_it_back(tmp_path: Path) -> None:
    class Sloppy:
        @hookimpl
        def vmk_vm_create(self, kernel: Kernel, vm: VM) -> None:
            kernel.emit("sloppy.create", f"vm:{vm.id}", handle=object())

    with Kernel(plugins=[Sloppy()], autoload=False, data_dir=tmp_path / "k") as k:
        with pytest.raises(InvalidArgument, match=r"sloppy\.create"):
            k.create_vm("web")
        assert k.vms() == []
        assert [e.kind for e in k.journal][-1] == "op.failed"
        k.check_invariants()


@pytest.mark.parametrize(("kind", "subject"), [("", "s"), (None, "s"), (3, "s"), ("k", None), ("k", 3)])
def test_bad_kind_or_subject_is_refused(kernel: Kernel, kind: Any, subject: Any) -> None:
    with pytest.raises(InvalidArgument):
        kernel.emit(kind, subject)


def test_events_are_immutable_records(kernel: Kernel) -> None:
    busy(kernel)
    snapshot = kernel.journal.events
    assert isinstance(snapshot, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot[0].kind = "forged"  # type: ignore[misc]
    kernel.emit("later", "kernel")
    assert len(snapshot) == len(kernel.journal) - 1  # a snapshot does not grow


def test_event_data_is_a_snapshot_of_what_was_emitted(kernel: Kernel) -> None:
    vm = kernel.create_vm("web", tags=["a"])
    tags = ["x"]
    kernel.emit("note.tags", "kernel", tags=tags)
    vm.options["tags"].append("b")  # the VM's options change later
    tags.append("y")
    create = kernel.journal.of_kind("vm.create")[0]
    assert create.data["options"] == {"tags": ["a"]}
    assert kernel.journal[-1].data == {"tags": ["x"]}
    assert Journal.read_jsonl(io.StringIO(kernel.journal.to_jsonl())) == list(kernel.journal.events)


def test_of_kind_matches_whole_dotted_prefixes(kernel: Kernel) -> None:
    kernel.emit("vm", "a")
    kernel.emit("vm.create.extra", "b")
    kernel.emit("vmx.create", "c")
    assert [e.subject for e in kernel.journal.of_kind("vm")] == ["a", "b"]
    assert [e.subject for e in kernel.journal.of_kind("vm.create")] == ["b"]


def test_events_outside_operations_commit_at_once(kernel: Kernel) -> None:
    n = len(kernel.journal)
    kernel.emit("plugin.note", "kernel", x=1)
    assert len(kernel.journal) == n + 1
    event = kernel.journal[-1]
    assert isinstance(event, Event)
    assert (event.seq, event.kind, event.subject, dict(event.data)) == (n, "plugin.note", "kernel", {"x": 1})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)


@settings()
@given(
    batch=st.lists(
        st.tuples(st.text(min_size=1, max_size=12), st.text(max_size=12), json_values), max_size=12
    )
)
def test_any_json_data_round_trips_and_chains(
    tmp_path_factory: Any, batch: list[tuple[str, str, Any]]
) -> None:
    with Kernel(seed=1, data_dir=tmp_path_factory.mktemp("k"), autoload=False) as k:
        for kind, subject, value in batch:
            k.emit(kind, subject, value=value)
        assert Journal.read_jsonl(io.StringIO(k.journal.to_jsonl())) == list(k.journal.events)
        assert k.journal.digest() == chain(k.journal.lines())
