"""Threat rules in: the native rule language and Sigma, compiled to verified programs.

Design: this is the cold path, in Python.  Both front ends build the syntax
trees of :mod:`vmkernel.rules.ir`, which lays out programs in the format of
:mod:`vmkernel.rules.program`; every program is verified before it is
returned.  ``compile`` takes native rule text, ``compile_sigma`` Sigma YAML
(through pySigma, imported only when used).  Run the programs with
``vmkernel.fast.RuleEngine`` (or ``vmkernel.reference.RuleEngine``).
"""

from __future__ import annotations

from typing import Any

from vmkernel.rules.asm import disassemble
from vmkernel.rules.native import compile_native
from vmkernel.rules.native import compile_native as compile

__all__ = ["compile", "compile_native", "compile_sigma", "disassemble"]


def compile_sigma(text: str, pipeline: Any = None, *, source: str = "<string>") -> list[bytes]:
    """Compile Sigma YAML (one or more documents, correlations included) into programs.

    Rules that cannot be translated raise :class:`~vmkernel.errors.RuleCompileError`
    with the reason; use :func:`vmkernel.rules.sigma.compile_collection` to get
    per-rule results instead.
    """
    from vmkernel.rules.sigma import compile_sigma_text

    return compile_sigma_text(text, pipeline, source=source)
