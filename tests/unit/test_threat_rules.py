"""The native rule language: parsing, compile errors with line and column, the listing."""

from __future__ import annotations

import pytest

from vmkernel import fast
from vmkernel.errors import RuleCompileError
from vmkernel.rules import compile, disassemble
from vmkernel.rules import program as P

TEXT = """
# two rules
rule "watch" {
    context pid
    launched
    when net where dport >= 1024 and not (dst cidr "10.0.0.0/8")
    verdict no-match
}
rule "spawn" {
    context pid
    tag "level:high"
    when proc where name in ["sh", "bash"] nocase or cmd matches "^curl .*\\\\| *sh"
    launch "watch" for 1m
    verdict match
}
"""


def test_rules_compile_and_run() -> None:
    progs = compile(TEXT)
    assert [P.decode(p).name for p in progs] == ["watch", "spawn"]
    eng = fast.RuleEngine(progs)
    got = eng.feed(
        [
            {"type": "proc", "time_ns": 0, "pid": 4, "name": "BASH"},
            {"type": "net", "time_ns": 1, "pid": 4, "dport": 443, "dst": "10.1.1.1"},
            {"type": "net", "time_ns": 2, "pid": 4, "dport": 4444, "dst": "8.8.8.8"},
        ]
    )
    assert [(d.rule, d.verdict, d.events) for d in got] == [
        ("spawn", "match", (0,)),
        ("watch", "no-match", (0, 2)),
    ]


@pytest.mark.parametrize(
    ("text", "line", "column", "fragment"),
    [
        ('rule "x" {\n  when a where f ~ "y"\n}', 2, 18, "token"),
        ('rule "x" {\n  when a where f == \n}', 3, 1, "quoted string"),
        ('rule "x" {\n  then a within 1s\n}', 2, 3, "'when' once"),
        ('rule "x" {\n  when a\n  then b\n}', 4, 1, "'within'"),
        ('rule "x" {\n  when a where f matches "(a+)+"\n}', 2, 26, "nested repetition"),
        ('rule "x" {\n  when a where f cidr "10.0.0.0/99"\n}', 2, 23, "prefix-length"),
        ('rule "x" {\n  frobnicate\n}', 2, 3, "rule item"),
        ('rule "x" {\n  when a count 0 within 1s\n}', 2, 16, "count"),
        ('rule "x" {\n  when a\n', 3, 1, "'}'"),
    ],
)
def test_compile_errors_point_at_the_token(text: str, line: int, column: int, fragment: str) -> None:
    with pytest.raises(RuleCompileError) as info:
        compile(text, "rules.vmkr")
    assert (info.value.line, info.value.column) == (line, column)
    assert fragment in str(info.value)
    assert "rules.vmkr" in str(info.value)


def test_listing_annotates_every_instruction() -> None:
    text = disassemble(compile(TEXT)[1])
    assert "rule 'spawn'" in text
    assert "inset.i" in text and "regex" in text and "launch #0" in text and "halt match" in text
    assert len([ln for ln in text.splitlines() if ln.strip()[:1].isdigit()]) == len(
        P.decode(compile(TEXT)[1]).code
    )
