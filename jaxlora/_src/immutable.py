"""An immutable, hashable mapping: what a frozen config or plan holds instead of a dict."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class FrozenMapping(Mapping[K, V], Generic[K, V]):
    """A read-only mapping that keeps insertion order, hashes by its items and is never a pytree node.

    Order is part of its identity (`rank_pattern` and friends are first-match tables), so two mappings with the
    same items in another order are not equal. It also compares equal to a plain dict with the same items.
    """

    __slots__ = ("_data", "_hash")

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] = ()):
        object.__setattr__(self, "_data", dict(items))
        object.__setattr__(self, "_hash", None)

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            object.__setattr__(self, "_hash", hash(tuple(self._data.items())))
        return self._hash

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, FrozenMapping):
            return tuple(self._data.items()) == tuple(other._data.items())
        if isinstance(other, Mapping):
            return self._data == dict(other)
        return NotImplemented

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"FrozenMapping is immutable; cannot set {name!r}")

    def __repr__(self) -> str:
        return repr(self._data)

    def __reduce__(self):
        return (FrozenMapping, (tuple(self._data.items()),))
