"""An adapter bank: N adapter sets over one base, stacked, so that one compiled forward serves a mixed batch.

Each adapted path holds A (N, *stack, *in, R) and B (N, *stack, R, *out), with R the largest rank among the
sets at that path (smaller ones zero-padded: the padded columns of A meet zero rows of B, so they add nothing
and receive zero gradient), and the true scale of each set (N,). `apply_bank` runs the model with one adapter
index per example (`BASE_MODEL` = -1: the base model): every served layer computes

    y_b = base(x_b)                                 for rows with index -1 (exactly the base layer's output)
    y_b = base(x_b) + s_{i_b}·(x_b A_{i_b}) B_{i_b}  otherwise

Each adapted kernel is served by the operation that consumes it (`providers`), as `jaxlora.apply` serves one
adapter, so linen and NNX models, scanned stacks and any layer type are served alike (`apply_bank`,
`apply_bank_nnx`). The per-example term is a gather + batched contraction: A_{i_b} and B_{i_b} are gathered per
example (B·in·R and B·R·out elements, under a megabyte for GPT-2 small at r16 and a batch of 8), then contracted
with a batched einsum whose batch axis is the example. This costs the same FLOPs as one adapter for the whole
batch, and is fastest on every backend here: a one-hot contraction over the N adapters does N times the LoRA FLOPs
(it computes every adapter for every row); `jax.lax.ragged_dot` needs the tokens sorted by adapter and scattered
back (two extra passes over the activations, B·T·d each, far more than the gathered weights), and on CPU and older
GPUs it lowers to a dense loop over the groups. The batched contraction maps to one batched GEMM on GPU/TPU (and a
batched GEMV when decoding one token), and its transpose under autodiff is a scatter-add into each used slot:
gradients reach only the slots the batch uses, and the frozen base gets none. A use that has no per-example form
(a convolution, an input whose leading axis is not the example axis) is refused: a bank cannot merge.

Hot-swap: a bank's arrays are its pytree leaves and its plan and slot names its static structure, so replacing
an adapter in a slot (`AdapterBank.replace`, same or smaller rank, targets within the bank's) or changing the
indices never recompiles a function the bank is an argument of.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlora._src.derived_plans import check_same_base, derived_plan
from jaxlora._src.merging import masked_b
from jaxlora._src.model_trace import linen_call, nnx_call
from jaxlora._src.operands import Operand
from jaxlora._src.paths import PyTree
from jaxlora._src.planning import LeafPlan, Plan
from jaxlora._src.quantization import is_quantized
from jaxlora._src.serving import frozen_tag, run_tagged

BASE_MODEL = -1  # the adapter index of a row that runs the base model alone

Entry = tuple[Mapping, Plan]


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
        if (leaf.layer_in_axes, leaf.stacked_axes) != (room.layer_in_axes, room.stacked_axes) or leaf.rank > room.rank:
            raise ValueError(
                f"{what}: the adapter of {path!r} has rank {leaf.rank} (input axes {leaf.layer_in_axes}, stacked_axes "
                f"{leaf.stacked_axes}) but the bank holds rank <= {room.rank} (input axes {room.layer_in_axes}, "
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
        different bases, DoRA adapters, or sets viewing a kernel differently (input axes, stacked_axes).

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
            if (seen.layer_in_axes, seen.stacked_axes) != (leaf.layer_in_axes, leaf.stacked_axes):
                raise ValueError(
                    f"adapter_bank: the sets view {path!r} differently (input axes, stacked_axes) "
                    f"{(seen.layer_in_axes, seen.stacked_axes)} vs {(leaf.layer_in_axes, leaf.stacked_axes)}; plan "
                    "them with the same in_axes (or fan_in_ndim) and stacked_axes"
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
# Serving: the bank's tags, then the model run by the operations that consume them.


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


def _bank_tag(bank: AdapterBank, ids: jax.Array) -> Callable[[str, Any], Operand | None]:
    """`tag(path, value)` for `run_tagged`: each adapted kernel with the bank's A and B at its path (slot axis after
    its stack axes, so that a scan slices the layers) and each example's slot and factor; frozen kernels as usual."""
    factors = _factors(bank, ids)

    def tag(path: str, value: Any) -> Operand | None:
        leaf = bank.plan.leaves.get(path)
        if leaf is None:
            return frozen_tag(path, value, fast=True)
        k = leaf.stacked_axes

        def per_layer(rows: jax.Array) -> jax.Array:  # one copy of the (batch,) rows per stacked layer
            return jnp.broadcast_to(rows, leaf.stack_shape + rows.shape)

        return Operand(
            a=jnp.moveaxis(bank.a[path], 0, k),
            b=jnp.moveaxis(bank.b[path], 0, k),
            quantized=value if is_quantized(value) else None,
            path=path,
            leaf=leaf,
            depth=k,
            slots=per_layer(ids),
            factor=per_layer(factors[path]),
        )

    return tag


def _served(bank: AdapterBank, call: Callable[..., Any], params: PyTree, adapter_ids: Any, args, kwargs) -> Any:
    """`call(params, *args, **kwargs)` with every example served by its own slot of the bank."""
    bank.plan.check_params(params)
    ids = _check_ids(bank, adapter_ids)
    out, record = run_tagged(call, params, args, kwargs, _bank_tag(bank, ids), fast=True)
    unused = sorted(set(bank.plan.leaves) - set(record.served))
    if unused:
        raise ValueError(
            f"apply_bank: the model's call never uses the kernels at {unused}, so the bank's adapters there have no "
            "effect; build the bank from adapters planned for this model's params, or leave these kernels out of "
            "the adapters' targets"
        )
    return out


def _check_bank(bank: Any, what: str) -> None:
    if not isinstance(bank, AdapterBank):
        raise TypeError(f"{what} takes a jaxlora.AdapterBank (from jaxlora.adapter_bank), got {type(bank).__name__}")


def apply_bank(model: nn.Module, variables: Mapping[str, Any], bank: AdapterBank, adapter_ids: Any, *args, **kwargs):
    """`model.apply(variables, *args, **kwargs)` with each example served by its own adapter from `bank`.

    Row b uses slot `adapter_ids[b]`; `BASE_MODEL` (-1) gives the base model's output for that row. Every adapted
    kernel is served by the operation that consumes it, as `jaxlora.apply` serves one adapter: any product
    (`nn.Dense`, `DenseGeneral`, `Einsum`, `jnp.einsum`, `@`, a tied head's `attend`) and embedding lookup, inside
    `nn.scan`, `nn.remat`, `nn.jit` and the other transforms, with quantized bases too. The input of each served
    operation must keep the example axis first. Differentiable with respect to the bank (each slot receives the
    gradient of the rows that use it, unused slots exactly zero), so several adapters train in one step. LoRA
    dropout is not applied.

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
      ValueError: if the params are not the bank's base, or an adapted kernel is used in a way that has no
        per-example form (a convolution, an input without the example axis first, ...): a bank cannot fall back
        to merging, since each row has its own weights.
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
    _check_bank(bank, "apply_bank")
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError("variables must be a dict with a 'params' collection, as for model.apply({'params': params})")
    return _served(bank, linen_call(model, variables), variables["params"], adapter_ids, args, kwargs)


def apply_bank_nnx(module: Any, bank: AdapterBank, adapter_ids: Any, *args, **kwargs):
    """`module(*args, **kwargs)` with each example served by its own adapter from `bank`; the module is unchanged.

    The nnx twin of `apply_bank` (see there): the bank is built from adapters planned on
    `nnx.state(module, nnx.Param)`; `nnx.Linear`, `LinearGeneral`, `Einsum`, `Embed` and any product or lookup of
    an adapted kernel are served, inside `nnx.scan`, `nnx.remat`, `nnx.jit` and `nnx.bridge` layers alike.

    Args:
      module: an nnx module.
      bank: from `jaxlora.adapter_bank`.
      adapter_ids: int array (batch,) of slot indices; -1 for the base model.
      *args: the module's positional arguments.
      **kwargs: its keyword arguments.

    Returns:
      What the module returns.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> from flax import nnx
      >>> layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> params = nnx.state(layer, nnx.Param)
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
      >>> _, adapters = jaxlora.init(jax.random.key(1), params, plan)
      >>> bank = jaxlora.adapter_bank({"a": (adapters, plan), "b": (adapters, plan)})
      >>> jaxlora.apply_bank_nnx(layer, bank, bank.ids(["b", None]), jnp.ones((2, 4))).shape
      (2, 3)
    """
    _check_bank(bank, "apply_bank_nnx")
    call, params = nnx_call(module)
    return _served(bank, call, params, adapter_ids, args, kwargs)
