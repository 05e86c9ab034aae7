"""An adapter bank: N adapter sets over one base, stacked, so that one compiled forward serves a mixed batch.

Each adapted path holds A (N, *stack, *in, R) and B (N, *stack, R, *out), with R the largest rank among the
sets at that path (smaller ones zero-padded: the padded columns of A meet zero rows of B, so they add nothing
and receive zero gradient), and the true scale of each set (N,). `apply_bank` runs the model with one adapter
index per example (`BASE_MODEL` = -1: the base model): every served layer computes

    y_b = base(x_b)                                 for rows with index -1 (exactly the base layer's output)
    y_b = base(x_b) + s_{i_b}·(x_b A_{i_b}) B_{i_b}  otherwise

The per-example term is a gather + batched contraction: A_{i_b} and B_{i_b} are gathered per example (B·in·R
and B·R·out elements, under a megabyte for GPT-2 small at r16 and a batch of 8), then contracted with a batched
dot_general whose batch axis is the example. This costs the same FLOPs as one adapter for the whole batch, and is
fastest on every backend here: a one-hot contraction over the N adapters does N times the LoRA FLOPs (it
computes every adapter for every row); `jax.lax.ragged_dot` needs the tokens sorted by adapter and scattered back
(two extra passes over the activations, B·T·d each, far more than the gathered weights), and on CPU and older
GPUs it lowers to a dense loop over the groups. The batched dot_general maps to one batched GEMM on GPU/TPU (and a
batched GEMV when decoding one token), and its transpose under autodiff is a scatter-add into each used slot:
gradients reach only the slots the batch uses, and the frozen base gets none.

Hot-swap: a bank's arrays are its pytree leaves and its plan and slot names its static structure, so replacing
an adapter in a slot (`AdapterBank.replace`, same or smaller rank, targets within the bank's) or changing the
indices never recompiles a function the bank is an argument of.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlora._src.derived_plans import check_same_base, derived_plan
from jaxlora._src.interception import holds, intercepted
from jaxlora._src.merging import masked_b
from jaxlora._src.paths import PyTree
from jaxlora._src.planning import LeafPlan, Plan

BASE_MODEL = -1  # the adapter index of a row that runs the base model alone

Entry = tuple[Mapping, Plan]


def _slot(param: str, name: str) -> str:
    """The params entry that carries a stacked adapter's `name` ("lora_a", ...) next to the kernel `param`."""
    return f"{param}:{name}"


def _with_stacked_adapters(params: PyTree, entries: Mapping[str, Any]) -> PyTree:
    """`params` (nested mappings) with extra leaves at the "/"-joined paths of `entries`, in new dicts."""
    out = dict(params)
    children: dict[str, dict[str, Any]] = {}
    for path, value in entries.items():
        head, _, rest = path.partition("/")
        if rest:
            children.setdefault(head, {})[rest] = value
        else:
            out[head] = value
    for head, sub in children.items():
        out[head] = _with_stacked_adapters(params[head], sub)
    return out


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)  # arrays inside: compared by identity, like any pytree of arrays
class AdapterBank:
    """N adapter sets over one base, stacked per adapted path (build it with `jaxlora.adapter_bank`).

    Attributes:
      a: `{path: A (N, *stack, *in, R)}`.
      b: `{path: B (N, *stack, R, *out)}`.
      scales: `{path: (N,) float32}`, each set's s = alpha / r at that path (0 where a set does not adapt it);
        constants: `apply_bank` passes them no gradient (mask them out of weight decay, e.g. with optax.masked).
      plan: the bank's plan over the base (rank R at each path); static.
      names: the slots' names; static.
    """

    a: dict[str, jax.Array]
    b: dict[str, jax.Array]
    scales: dict[str, jax.Array]
    plan: Plan
    names: tuple[str, ...]

    def tree_flatten(self):
        return (self.a, self.b, self.scales), (self.plan, self.names)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def num_slots(self) -> int:
        return len(self.names)

    @property
    def num_bytes(self) -> int:
        """Bytes the bank's arrays occupy (A, B and scales of every slot, padding included)."""
        return sum(x.size * x.dtype.itemsize for tree in (self.a, self.b, self.scales) for x in tree.values())

    def index(self, slot: int | str | None) -> int:
        """The index of a slot given by name or index; None or `BASE_MODEL` gives `BASE_MODEL`."""
        if slot is None or (isinstance(slot, int) and slot == BASE_MODEL):
            return BASE_MODEL
        if isinstance(slot, str):
            if slot not in self.names:
                raise KeyError(f"the bank has no slot named {slot!r}; its slots are {list(self.names)}")
            return self.names.index(slot)
        if isinstance(slot, bool) or not isinstance(slot, int | np.integer) or not 0 <= slot < self.num_slots:
            raise IndexError(
                f"adapter index {slot!r} is out of range for a bank of {self.num_slots} slots; use 0.."
                f"{self.num_slots - 1}, or {BASE_MODEL} (jaxlora.BASE_MODEL) for the base model"
            )
        return int(slot)

    def ids(self, slots: Sequence[int | str | None]) -> jax.Array:
        """The int32 index array `apply_bank` takes, from slot names, indices or None (the base model)."""
        return jnp.asarray([self.index(s) for s in slots], jnp.int32)

    def replace(self, slot: int | str, adapters: Mapping, plan: Plan) -> AdapterBank:
        """A bank with the adapter in `slot` replaced (hot-swap): same shapes, so nothing recompiles.

        Args:
          slot: the slot's name or index.
          adapters: the new adapter set.
          plan: its plan, over the bank's base; its targets must be among the bank's and its ranks at most the
            bank's (paths it does not adapt get a zero update).

        Returns:
          The new bank (this one is unchanged).

        Raises:
          ValueError: if the adapters were planned for another base, adapt a path the bank has no room for, or
            have a larger rank than the bank at some path.
        """
        index = self.index(slot)
        if index == BASE_MODEL:
            raise ValueError("the base model has no slot to replace; name a slot of the bank")
        flat = _checked_entry(adapters, plan, self.plan, f"AdapterBank.replace({slot!r})")
        a, b, scales = dict(self.a), dict(self.b), dict(self.scales)
        for path, leaf in self.plan.leaves.items():
            new_a, new_b, scale = _padded(flat, plan, path, leaf)
            a[path] = a[path].at[index].set(new_a.astype(a[path].dtype))
            b[path] = b[path].at[index].set(new_b.astype(b[path].dtype))
            scales[path] = scales[path].at[index].set(scale)
        return AdapterBank(a, b, scales, self.plan, self.names)


def _checked_entry(adapters: Mapping, plan: Plan, bank_plan: Plan, what: str) -> dict:
    if not isinstance(plan, Plan):
        raise TypeError(f"{what}: expected a jaxlora.Plan for the adapters, got {type(plan).__name__}")
    check_same_base([bank_plan, plan], what)
    flat = plan.check_adapters(adapters)
    for path, leaf in plan.leaves.items():
        if "magnitude" in flat[path]:
            raise ValueError(f"{what}: DoRA adapters (at {path!r}) cannot be banked yet; bank plain LoRA adapters")
        room = bank_plan.leaves.get(path)
        if room is None:
            raise ValueError(
                f"{what}: the adapters adapt {path!r}, which the bank has no slot for (it adapts "
                f"{sorted(bank_plan.leaves)}); build a new bank with jaxlora.adapter_bank including these adapters"
            )
        if (leaf.fan_in_ndim, leaf.stacked_axes) != (room.fan_in_ndim, room.stacked_axes) or leaf.rank > room.rank:
            raise ValueError(
                f"{what}: the adapter of {path!r} has rank {leaf.rank} (fan_in_ndim {leaf.fan_in_ndim}, stacked_axes "
                f"{leaf.stacked_axes}) but the bank holds rank <= {room.rank} (fan_in_ndim {room.fan_in_ndim}, "
                f"stacked_axes {room.stacked_axes}) there; build a new bank with jaxlora.adapter_bank"
            )
    return flat


def _padded(flat: Mapping, plan: Plan, path: str, room: LeafPlan) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A and (masked) B of one set at `path`, zero-padded to the bank's rank, and its scale (zeros if absent)."""
    k = room.stacked_axes
    if path not in flat:
        return jnp.zeros(room.a_shape), jnp.zeros(room.b_shape), jnp.float32(0.0)
    leaf = plan.leaves[path]
    a, b = jnp.asarray(flat[path]["lora_a"]), masked_b(jnp.asarray(flat[path]["lora_b"]), leaf)
    pad = room.rank - leaf.rank
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
    b = jnp.pad(b, [(0, 0)] * k + [(0, pad)] + [(0, 0)] * (b.ndim - k - 1))
    return a, b, jnp.float32(leaf.scale)


def adapter_bank(entries: Sequence[Entry] | Mapping[str, Entry], names: Sequence[str] | None = None) -> AdapterBank:
    """Stacks N adapter sets over one base into an `AdapterBank` for mixed-adapter batches.

    The sets may differ in rank, alpha and targets: the bank adapts the union of their targets at the largest rank
    per path, pads smaller ranks with zeros and keeps each set's true scale. B is stored masked to each set's
    `layers_to_transform`.

    Args:
      entries: `[(adapters, plan), ...]`, or a mapping `{name: (adapters, plan)}` (e.g. `jaxlora.NamedAdapters`).
      names: the slots' names (default: the mapping's keys, else "0", "1", ...).

    Returns:
      The bank; pass it to `apply_bank` with one slot index per example.

    Raises:
      ValueError: for no entries, names that do not match the entries in number or repeat, sets planned over
        different bases, DoRA adapters, or sets viewing a kernel differently (fan_in_ndim, stacked_axes).

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxlora
      >>> model = nn.Dense(3)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
      >>> plan1 = jaxlora.plan(params, jaxlora.LoraConfig(rank=1))
      >>> plan2 = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
      >>> _, a1 = jaxlora.init(jax.random.key(1), params, plan1)
      >>> _, a2 = jaxlora.init(jax.random.key(2), params, plan2)
      >>> bank = jaxlora.adapter_bank({"one": (a1, plan1), "two": (a2, plan2)})
      >>> bank.a["kernel"].shape, bank.names
      ((2, 4, 2), ('one', 'two'))
    """
    if isinstance(entries, Mapping):
        names = tuple(entries) if names is None else names
        entries = list(entries.values())
    if not entries:
        raise ValueError("adapter_bank needs at least one (adapters, plan) pair")
    names = tuple(str(i) for i in range(len(entries))) if names is None else tuple(names)
    if len(names) != len(entries) or len(set(names)) != len(names):
        raise ValueError(f"adapter_bank: names {list(names)} must be {len(entries)} distinct names, one per entry")
    for i, entry in enumerate(entries):
        if not (isinstance(entry, tuple | list) and len(entry) == 2 and isinstance(entry[1], Plan)):
            raise ValueError(f"adapter_bank: entry {i} must be an (adapters, plan) pair with a jaxlora.Plan")
    plans = [plan for _, plan in entries]
    check_same_base(plans, "adapter_bank")
    leaves: dict[str, LeafPlan] = {}
    ranks: dict[str, int] = {}
    for plan in plans:
        for path, leaf in plan.leaves.items():
            seen = leaves.setdefault(path, leaf)
            if (seen.fan_in_ndim, seen.stacked_axes) != (leaf.fan_in_ndim, leaf.stacked_axes):
                raise ValueError(
                    f"adapter_bank: the sets view {path!r} differently (fan_in_ndim, stacked_axes) "
                    f"{(seen.fan_in_ndim, seen.stacked_axes)} vs {(leaf.fan_in_ndim, leaf.stacked_axes)}; plan "
                    "them with the same fan_in_ndim and stacked_axes"
                )
            ranks[path] = max(ranks.get(path, 0), leaf.rank)
    bank_plan = derived_plan(
        plans[0], leaves, ranks, {p: float(r) for p, r in ranks.items()}, {p: None for p in leaves}
    )
    flats = [_checked_entry(adapters, plan, bank_plan, "adapter_bank") for adapters, plan in entries]
    a, b, scales = {}, {}, {}
    for path, room in bank_plan.leaves.items():
        padded = [_padded(flat, plan, path, room) for flat, plan in zip(flats, plans, strict=True)]
        dtype = jnp.result_type(*[p[0] for p in padded])
        a[path] = jnp.stack([p[0].astype(dtype) for p in padded])
        b[path] = jnp.stack([p[1].astype(dtype) for p in padded])
        scales[path] = jnp.stack([p[2] for p in padded])
    return AdapterBank(a, b, scales, bank_plan, names)


# ---------------------------------------------------------------------------------------------------------------
# Serving: one term function per layer kind. Each gets x, the bank's A and B at the layer (slot axis first),
# the clipped indices (B,) and each row's factor (B,) (the slot's scale, 0 for base rows, NaN for bad indices).


def _batched(x: jax.Array, w: jax.Array, x_axes: tuple[int, ...], w_axes: tuple[int, ...]) -> jax.Array:
    """Per-example contraction: x (B, ...) with w (B, ...) over the given axes, the example axis batched."""
    return lax.dot_general(x, w, ((x_axes, w_axes), ((0,), (0,))))


def _per_row(factor: jax.Array, ndim: int) -> jax.Array:
    return factor.reshape((-1,) + (1,) * (ndim - 1))


def _linear_term(module, method, x, a, b, ids, factor, leaf: LeafPlan):
    """nn.Dense / nn.DenseGeneral over the trailing `fan_in_ndim` axes: s·(x A_i) B_i per example."""
    k = leaf.fan_in_ndim
    if isinstance(module, nn.DenseGeneral):
        axis = module.axis if isinstance(module.axis, tuple | list) else (module.axis,)
        if tuple(ax % x.ndim for ax in axis) != tuple(range(x.ndim - k, x.ndim)):
            return None  # contracts axes other than the trailing ones
    a_rows, b_rows = a[ids].astype(a.dtype), b[ids]
    x = x.astype(a.dtype)
    xa = _batched(x, a_rows, tuple(range(x.ndim - k, x.ndim)), tuple(range(1, k + 1)))  # (B, ..., R)
    xa = xa * _per_row(factor, xa.ndim).astype(xa.dtype)
    return _batched(xa, b_rows, (xa.ndim - 1,), (1,))


def _embed_term(module, method, x, a, b, ids, factor, leaf: LeafPlan):
    """nn.Embed: the looked-up rows of A_i times B_i (`__call__`), or s·(q B_iᵀ) A_iᵀ (`attend`)."""
    b_rows = b[ids]  # (B, R, d)
    if method == "__call__":
        rows = a[ids.reshape((-1,) + (1,) * (x.ndim - 1)), x]  # (B, ..., R): only the looked-up rows
        rows = rows * _per_row(factor, rows.ndim).astype(rows.dtype)
        return _batched(rows, b_rows, (rows.ndim - 1,), (1,))
    q = x.astype(b.dtype)
    qb = _batched(q, b_rows, (q.ndim - 1,), (2,))  # (B, ..., R)
    qb = qb * _per_row(factor, qb.ndim).astype(qb.dtype)
    return _batched(qb, a[ids], (qb.ndim - 1,), (2,))


_BANK_TERMS = {nn.Dense: _linear_term, nn.DenseGeneral: _linear_term, nn.Embed: _embed_term}


class _BankInterceptor:
    def __init__(self, bank: AdapterBank, ids: jax.Array, factors: Mapping[str, jax.Array]):
        self.bank, self.ids, self.factors = bank, ids, factors
        self.served: set[str] = set()

    def _weights(self, module: nn.Module, param: str, path: str, leaf: LeafPlan):
        """The bank's A and B at this layer (slot axis first), or None."""
        k = leaf.stacked_axes
        if not k:
            return (self.bank.a[path], self.bank.b[path]) if holds(module, param, leaf.shape) else None
        if not module.has_variable("params", _slot(param, "bank_a")):
            return None
        a = module.get_variable("params", _slot(param, "bank_a"))
        b = module.get_variable("params", _slot(param, "bank_b"))
        n = self.bank.num_slots
        if a.shape != (n, *leaf.a_shape[k:]) or b.shape != (n, *leaf.b_shape[k:]):
            return None
        return (a, b) if holds(module, param, leaf.layer_shape) else None

    def __call__(self, next_fun, args, kwargs, context):
        module, method = context.module, context.method_name
        found = intercepted(context, args)
        if found is None:
            return next_fun(*args, **kwargs)
        kind, path = found
        leaf = self.bank.plan.leaves.get(path)
        weights = None if leaf is None else self._weights(module, kind.param, path, leaf)
        term_fn = _BANK_TERMS.get(kind.module_type)
        if weights is None or term_fn is None:
            return next_fun(*args, **kwargs)
        if kind.contraction is not None and kind.contraction(module) != leaf.fan_in_ndim:
            return next_fun(*args, **kwargs)
        x = args[0]
        if jnp.ndim(x) < 1 or jnp.shape(x)[0] != self.ids.shape[0]:
            raise ValueError(
                f"apply_bank: the layer at {path!r} is called with an input of shape {jnp.shape(x)}, whose leading "
                f"axis is not the batch of {self.ids.shape[0]} examples the adapter indices name; a bank serves "
                "layers whose inputs keep the example axis first (exclude this layer from the adapters' targets)"
            )
        safe_ids = jnp.clip(self.ids, 0, self.bank.num_slots - 1)
        term = term_fn(module, method, x, *weights, safe_ids, self.factors[path], leaf)
        if term is None:
            return next_fun(*args, **kwargs)
        base = next_fun(*args, **kwargs)
        self.served.add(path)
        base_rows = _per_row(self.ids == BASE_MODEL, base.ndim)
        return jnp.where(base_rows, base, base + term.astype(base.dtype))


def _factors(bank: AdapterBank, ids: jax.Array) -> dict[str, jax.Array]:
    """Each row's factor per path: its slot's scale, 0 for the base model, NaN for an index out of range."""
    valid = (ids >= 0) & (ids < bank.num_slots)
    safe = jnp.clip(ids, 0, bank.num_slots - 1)
    out = {}
    for path, scales in bank.scales.items():
        scales = lax.stop_gradient(scales)  # alpha / r: a constant of each set, never trained
        factor = jnp.where(valid, scales[safe], jnp.float32(jnp.nan))
        out[path] = jnp.where(ids == BASE_MODEL, jnp.float32(0.0), factor)
    return out


def _check_ids(bank: AdapterBank, adapter_ids: Any) -> jax.Array:
    ids = jnp.asarray(adapter_ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"adapter_ids must be a 1-D integer array with one slot index per example, got {ids.dtype} of shape "
            f"{ids.shape}; build it with bank.ids(['name', None, ...])"
        )
    if not isinstance(ids, jax.core.Tracer):
        bad = np.asarray(ids)[(np.asarray(ids) < BASE_MODEL) | (np.asarray(ids) >= bank.num_slots)]
        if bad.size:
            raise IndexError(
                f"adapter index {int(bad[0])} is out of range for a bank of {bank.num_slots} slots "
                f"{list(bank.names)}; use 0..{bank.num_slots - 1}, or {BASE_MODEL} (jaxlora.BASE_MODEL) for the base "
                "model (inside jit, rows with such an index come out NaN)"
            )
    return ids.astype(jnp.int32)


def apply_bank(model: nn.Module, variables: Mapping[str, Any], bank: AdapterBank, adapter_ids: Any, *args, **kwargs):
    """`model.apply(variables, *args, **kwargs)` with each example served by its own adapter from `bank`.

    Row b uses slot `adapter_ids[b]`; `BASE_MODEL` (-1) gives exactly the base model's output for that row.
    Served: `nn.Dense`, `nn.DenseGeneral` contracting its trailing axes, and `nn.Embed` (lookup and `attend`),
    stacked (`nn.scan`) or not; every layer input must keep the example axis first. Differentiable with respect
    to the bank (each slot receives the gradient of the rows that use it, unused slots exactly zero), so several
    adapters train in one step. LoRA dropout is not applied.

    Args:
      model: a flax.linen module.
      variables: `{"params": params, ...}` of the base the bank was built over.
      bank: from `jaxlora.adapter_bank`.
      adapter_ids: int array (batch,) of slot indices (`bank.ids([...])` from names); -1 for the base model.
        Outside jit an index out of range raises; inside jit its row comes out NaN.
      *args: the model's positional arguments.
      **kwargs: the model's keyword arguments and `model.apply`'s own.

    Returns:
      What `model.apply` returns.

    Raises:
      ValueError: if the params are not the bank's base, or some adapted path is not served by a layer the bank
        supports (a bank cannot fall back to merging: each row has its own weights).
      IndexError: for an index out of range (outside jit).

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxlora
      >>> model = nn.Dense(3)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
      >>> _, adapters = jaxlora.init(jax.random.key(1), params, plan)
      >>> bank = jaxlora.adapter_bank([(adapters, plan), (adapters, plan)])
      >>> y = jaxlora.apply_bank(model, {"params": params}, bank, bank.ids([0, None, 1]), jnp.ones((3, 4)))
      >>> y.shape
      (3, 3)
    """
    if not isinstance(bank, AdapterBank):
        raise TypeError(
            f"apply_bank takes a jaxlora.AdapterBank (from jaxlora.adapter_bank), got {type(bank).__name__}"
        )
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables must be a dict with a 'params' collection, as for model.apply({'params': params})")
    params = variables["params"]
    bank.plan.check_params(params)
    ids = _check_ids(bank, adapter_ids)
    entries = {}
    for path, leaf in bank.plan.leaves.items():
        k = leaf.stacked_axes
        if k:  # slot axis after the stack axes, so nn.scan slices each layer's (N, ...) stack of adapters
            entries[_slot(path, "bank_a")] = jnp.moveaxis(bank.a[path], 0, k)
            entries[_slot(path, "bank_b")] = jnp.moveaxis(bank.b[path], 0, k)
    interceptor = _BankInterceptor(bank, ids, _factors(bank, ids))
    with nn.intercept_methods(interceptor):
        out = model.apply({**variables, "params": _with_stacked_adapters(params, entries)}, *args, **kwargs)
    unserved = sorted(set(bank.plan.leaves) - interceptor.served)
    if unserved:
        raise ValueError(
            f"apply_bank: the bank's adapters for {unserved} are not consumed by a layer it serves (nn.Dense, "
            "nn.DenseGeneral over trailing axes, nn.Embed; stacked ones declared in stacked_axes); a bank cannot "
            "merge per example: leave these layers out of the adapters' targets"
        )
    return out
