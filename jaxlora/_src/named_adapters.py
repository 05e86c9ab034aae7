"""Several named adapter sets over one base: an immutable mapping `name -> (adapters, plan)`.

Each entry keeps its own plan (rank, alpha and targets may differ), so each saves and loads on its own with
`jaxlora.checkpoint.save_adapter` / `jaxlora.peft_format.save_peft` exactly as a single adapter does, and the
mapping feeds the combinations (`weighted_cat(named.entries([...]), ...)`) and `adapter_bank(named)`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from jaxlora._src.derived_plans import check_same_base
from jaxlora._src.planning import Plan

Entry = tuple[Mapping, Plan]


class NamedAdapters(Mapping[str, Entry]):
    """An immutable mapping `name -> (adapters, plan)`, all planned over one base; `add`/`remove` return new ones.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
      >>> _, adapters = jaxlora.init(jax.random.key(0), params, plan)
      >>> named = jaxlora.NamedAdapters().add("sql", adapters, plan).add("chat", adapters, plan)
      >>> list(named), list(named.remove("sql"))
      (['sql', 'chat'], ['chat'])
      >>> adapters, plan = named.select("chat")
    """

    __slots__ = ("_entries",)

    def __init__(self, entries: Mapping[str, Entry] | Iterable[tuple[str, Entry]] = ()):
        checked: dict[str, Entry] = {}
        for name, entry in dict(entries).items():
            checked[_check_name(name)] = _check_entry(name, entry)
        if checked:
            check_same_base([plan for _, plan in checked.values()], f"NamedAdapters {list(checked)}")
        object.__setattr__(self, "_entries", checked)

    def __getitem__(self, name: str) -> Entry:
        return self.select(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("NamedAdapters is immutable: use add / remove, which return a new mapping")

    def __repr__(self) -> str:
        ranks = {name: sorted({leaf.rank for leaf in plan.leaves.values()}) for name, (_, plan) in self.items()}
        return f"NamedAdapters({ranks})"

    def add(self, name: str, adapters: Mapping, plan: Plan) -> NamedAdapters:
        """A new mapping with `name -> (adapters, plan)` added (checked against the plan and the others' base).

        Raises ValueError if `name` is taken (remove it first), the adapters do not fit their plan, or the plan's
        base differs from the other entries'.
        """
        if name in self._entries:
            raise ValueError(f"an adapter named {name!r} exists already; remove it first to replace it")
        return NamedAdapters({**self._entries, name: (adapters, plan)})

    def remove(self, name: str) -> NamedAdapters:
        """A new mapping without `name` (KeyError naming the known names if it is absent)."""
        self.select(name)
        return NamedAdapters({k: v for k, v in self._entries.items() if k != name})

    def select(self, name: str) -> Entry:
        """`(adapters, plan)` of `name`, to pass to `jaxlora.apply`, `merge`, `save_adapter`, ..."""
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"no adapter named {name!r}; the adapters are {list(self._entries)}") from None

    def entries(self, names: Sequence[str] | None = None) -> list[Entry]:
        """`[(adapters, plan), ...]` of `names` (default: all, in order), for the weighted combinations."""
        return [self.select(name) for name in (list(self._entries) if names is None else names)]


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter names must be non-empty strings, got {name!r}")
    return name


def _check_entry(name: str, entry: Any) -> Entry:
    if not (isinstance(entry, tuple | list) and len(entry) == 2 and isinstance(entry[1], Plan)):
        raise ValueError(f"NamedAdapters: {name!r} must map to an (adapters, plan) pair with a jaxlora.Plan")
    adapters, plan = entry
    plan.check_adapters(adapters)
    return (adapters, plan)
