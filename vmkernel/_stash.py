"""Typed per-plugin state on a kernel.

Modelled on pytest's ``Stash``: a plugin creates one module-level
``StashKey[T]()`` (a key, not state) and keeps its per-kernel state under it,
so two kernels in one process never share anything and mypy knows the type of
what comes back.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar, cast

from vmkernel.errors import UnknownResource

__all__ = ["Stash", "StashKey"]

T = TypeVar("T")
D = TypeVar("D")


class StashKey(Generic[T]):
    """A key for a :class:`Stash` value of type ``T``.  Compared by identity."""

    __slots__ = ("name",)

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"StashKey({self.name!r})" if self.name else f"<StashKey at {id(self):#x}>"


class Stash:
    """A mapping from :class:`StashKey` to values, one per kernel."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        self._data: dict[StashKey[Any], object] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._data[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        try:
            return cast(T, self._data[key])
        except KeyError:
            raise UnknownResource("stash key", key, "a key set by the plugin's vmk_configure") from None

    def get(self, key: StashKey[T], default: D) -> T | D:
        return cast(T, self._data[key]) if key in self._data else default

    def setdefault(self, key: StashKey[T], default: T) -> T:
        if key in self._data:
            return cast(T, self._data[key])
        self._data[key] = default
        return default

    def __delitem__(self, key: StashKey[T]) -> None:
        del self._data[key]

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)
