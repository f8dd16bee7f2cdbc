"""Hypothesis strategies for kernel inputs, for vmkernel's tests and plugin authors'.

Valid-input strategies produce what the public API accepts; ``bad_*``
strategies produce what it must reject with a typed error.
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

__all__ = [
    "bad_memory_mib",
    "bad_names",
    "event_data",
    "memory_mib",
    "names",
    "seeds",
    "time_deltas",
    "vcpus",
]

_NAME_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"


def names() -> st.SearchStrategy[str]:
    """Resource names the kernel accepts (1-63 chars, starting alphanumeric)."""
    return st.builds(
        lambda first, rest: first + rest,
        st.sampled_from(_NAME_ALPHABET[:62]),
        st.text(alphabet=_NAME_ALPHABET, max_size=20),
    )


def bad_names() -> st.SearchStrategy[Any]:
    """Values the kernel must reject as a resource name."""
    return st.one_of(
        st.just(""),
        st.text(min_size=64, max_size=80, alphabet="a"),
        st.text(min_size=1).filter(lambda s: not s[:1].isalnum() or not s.isascii() or " " in s or "/" in s),
        st.integers(),
        st.none(),
        st.binary(min_size=1, max_size=8),
    )


def memory_mib() -> st.SearchStrategy[int]:
    """Guest memory sizes in MiB, small enough for emulated guests."""
    return st.sampled_from([1, 2, 4, 16, 64, 128, 256, 1024])


def bad_memory_mib() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.integers(max_value=0), st.integers(min_value=(1 << 24) + 1), st.floats(), st.booleans(), st.text()
    )


def vcpus() -> st.SearchStrategy[int]:
    return st.integers(min_value=1, max_value=16)


def seeds() -> st.SearchStrategy[int]:
    return st.integers(min_value=0, max_value=2**64 - 1)


def time_deltas() -> st.SearchStrategy[int]:
    """Clock advances from a nanosecond to an hour."""
    return st.one_of(st.integers(0, 1_000), st.integers(0, 3_600 * 10**9))


_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.text(max_size=20),
    st.floats(allow_nan=False, allow_infinity=False),
)


def event_data() -> st.SearchStrategy[dict[str, Any]]:
    """JSON-serialisable event payloads."""
    values = st.recursive(
        _json_leaf,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=10,
    )
    return st.dictionaries(st.text(min_size=1, max_size=10), values, max_size=5)
