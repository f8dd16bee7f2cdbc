"""Entropy assessment: an SP 800-90B-style min-entropy estimate and the `ent` / `dieharder` batteries.

Design: :func:`assess_min_entropy` applies the most-common-value estimate of
SP 800-90B (section 6.3.1) to the byte stream and the restart sanity check
(section 3.1.4.3) to the stream cut into rows, one row per device request.
The MCV estimate alone looks only at the byte histogram, so a stream that
repeats one random page scores like a random one; the restart check looks
down the columns (the same offset across requests), where a replayed page is
constant.  When the sanity check fails the source gets the entropy of its
most frequent row or column value, which is 0.0 bits for a replay.

:func:`run_ent` and :func:`run_dieharder` call the Debian tools on a file and
parse their verdicts; they return ``None`` when the tool is not installed.
The dieharder subset is sized to read 1 MiB without wrapping around its input.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vmkernel.errors import InvalidArgument

__all__ = [
    "DIEHARDER_SUBSET",
    "DieharderResult",
    "EntResult",
    "MinEntropy",
    "assess_min_entropy",
    "mcv_min_entropy",
    "run_dieharder",
    "run_ent",
]

_Z = 2.576  # the 99% upper bound of 800-90B


def mcv_min_entropy(data: bytes) -> float:
    """SP 800-90B 6.3.1 most-common-value min-entropy of 8-bit samples, in bits per byte."""
    n = len(data)
    if n < 2:
        raise InvalidArgument("sample length", n, "at least 2 bytes")
    counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
    p_hat = float(counts.max()) / n
    p_u = min(1.0, p_hat + _Z * math.sqrt(p_hat * (1.0 - p_hat) / (n - 1)))
    return -math.log2(p_u)


def _binomial_upper(n: int, p: float, alpha: float) -> int:
    """The smallest U with P(Binomial(n, p) > U) <= alpha."""
    tail = 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    for k in range(n + 1):
        log_pmf = (
            math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q
        )
        tail -= math.exp(log_pmf)
        if tail <= alpha:
            return k
    return n


@dataclass(frozen=True)
class MinEntropy:
    """Result of :func:`assess_min_entropy` (bits per byte)."""

    mcv: float
    restart_passed: bool
    max_row_frequency: int
    max_column_frequency: int
    row_bound: int
    column_bound: int
    min_entropy: float


def assess_min_entropy(data: bytes, *, row_bytes: int = 4096, claimed: float = 7.0) -> MinEntropy:
    """MCV estimate plus the restart sanity check over rows of ``row_bytes`` (one row per request)."""
    if row_bytes < 1 or len(data) < 2 * row_bytes:
        raise InvalidArgument("data length", len(data), f"at least two rows of {row_bytes} bytes")
    mcv = mcv_min_entropy(data)
    rows = len(data) // row_bytes
    matrix = np.frombuffer(data[: rows * row_bytes], dtype=np.uint8).reshape(rows, row_bytes)

    def max_freq(m: np.ndarray) -> int:
        # the count of the most common value of each row of m, maximised over rows
        offsets = (np.arange(m.shape[0], dtype=np.int64) * 256)[:, None]
        counts = np.bincount((m.astype(np.int64) + offsets).ravel(), minlength=m.shape[0] * 256)
        return int(counts.reshape(m.shape[0], 256).max())

    f_row, f_col = max_freq(matrix), max_freq(matrix.T)
    p = 2.0**-claimed
    alpha = 0.01 / (rows + row_bytes)
    u_row, u_col = _binomial_upper(row_bytes, p, alpha), _binomial_upper(rows, p, alpha)
    passed = f_row <= u_row and f_col <= u_col
    h = mcv if passed else min(mcv, -math.log2(f_row / row_bytes), -math.log2(f_col / rows))
    return MinEntropy(mcv, passed, f_row, f_col, u_row, u_col, max(0.0, h))


@dataclass(frozen=True)
class EntResult:
    entropy: float
    chi_square: float
    chi_square_p: float  # probability that a random stream would exceed the statistic
    serial_correlation: float

    @property
    def passed(self) -> bool:
        return 0.001 < self.chi_square_p < 0.999


def _find(pattern: str, text: str) -> str:
    found = re.search(pattern, text)
    if found is None:
        raise InvalidArgument("ent output", text[:200], f"a line matching {pattern!r}")
    return found.group(1)


def run_ent(path: str | Path, *, timeout_s: float = 60.0) -> EntResult | None:
    """Run Fourmilab ``ent`` on a file; ``None`` if it is not installed."""
    exe = shutil.which("ent")
    if exe is None:
        return None
    out = subprocess.run(
        [exe, str(path)], capture_output=True, text=True, timeout=timeout_s, check=True
    ).stdout
    entropy = float(_find(r"Entropy = ([\d.]+)", out))
    chi = float(_find(r"samples is ([\d.]+)", out))
    pct = re.search(r"(less than |greater than )?([\d.]+) percent of the times", out)
    if pct is None:
        raise InvalidArgument("ent output", out[:200], "a chi-square percentage line")
    p = float(pct.group(2)) / 100.0
    if pct.group(1) == "less than ":
        p /= 10.0  # strictly below the printed bound
    elif pct.group(1) == "greater than ":
        p = 1.0 - (1.0 - p) / 10.0
    serial = float(
        _find(r"Serial correlation coefficient is (-?[\d.]+|undefined)", out).replace("undefined", "nan")
    )
    return EntResult(entropy, chi, p, serial)


# (test number, tsamples, psamples): each reads less than 1 MiB of 32-bit words.
DIEHARDER_SUBSET: tuple[tuple[int, int, int], ...] = (
    (0, 100, 10),  # diehard birthdays
    (2, 100, 50),  # 32x32 binary rank
    (3, 500, 100),  # 6x8 binary rank
    (100, 1000, 100),  # STS monobit
    (101, 1000, 100),  # STS runs
    (102, 1000, 100),  # STS serial, 30 assessments
    (203, 1000, 100),  # RGB lagged sums
    (209, 2000, 100),  # DAB monobit 2
)


@dataclass(frozen=True)
class DieharderResult:
    assessments: tuple[tuple[str, float, str], ...]  # (test name, p-value, PASSED/WEAK/FAILED)

    @property
    def failed(self) -> int:
        return sum(1 for a in self.assessments if a[2] == "FAILED")

    @property
    def total(self) -> int:
        return len(self.assessments)


def run_dieharder(
    path: str | Path, subset: Sequence[tuple[int, int, int]] = DIEHARDER_SUBSET, *, timeout_s: float = 120.0
) -> DieharderResult | None:
    """Run a dieharder subset on a raw binary file; ``None`` if dieharder is not installed."""
    exe = shutil.which("dieharder")
    if exe is None:
        return None
    found: list[tuple[str, float, str]] = []
    for test, t, p in subset:
        cmd = [exe, "-g", "201", "-f", str(path), "-d", str(test), "-t", str(t), "-p", str(p)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=True).stdout
        for line in out.splitlines():
            parts = [x.strip() for x in line.split("|")]
            if len(parts) == 6 and parts[5] in ("PASSED", "WEAK", "FAILED"):
                found.append((f"{parts[0]}[{parts[1]}]", float(parts[4]), parts[5]))
    return DieharderResult(tuple(found))
