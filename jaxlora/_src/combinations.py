"""Weighted combinations of adapters over one base: new adapters (and their plan) from several trained ones.

Three rules, all pure functions of `[(adapters, plan), ...]` and one weight per adapter. With ΔW_i = s_i·A_i B_i
(B masked to the layers the adapter transforms) and weights w_i:

* `weighted_linear` (PEFT's "linear"): same rank r everywhere; A = Σ sign(w_i)·√(|w_i| s_i)·A_i and
  B = Σ √(|w_i| s_i)·B_i with scale 1. The update is (Σ c_i A_i)(Σ d_j B_j): the weighted sum Σ w_i ΔW_i plus the
  cross terms c_i d_j A_i B_j (i ≠ j), so it is exact only for one adapter; cheap, and what PEFT users expect.
* `weighted_cat` (PEFT's "cat"): A = [A_1 … A_N] along the rank axis, B = [w_1 s_1 B_1; …; w_N s_N B_N], scale 1:
  rank Σ r_i and exactly Σ w_i ΔW_i.
* `weighted_svd`: the exact Σ w_i ΔW_i, truncated per layer to a chosen rank by SVD (the best approximation of
  that rank in Frobenius norm); A = U √S and B = √S Vᵀ with scale 1, and the fraction of ‖Σ w_i ΔW_i‖² the
  truncation drops is reported per leaf.

Adapters with different targets are combined only when the caller says how (`targets="union"`: a missing adapter
counts as a zero update; `"intersection"`: only the leaves every adapter adapts).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora._src.derived_plans import check_same_base, derived_plan
from jaxlora._src.merging import masked_b
from jaxlora._src.paths import unflatten_adapters
from jaxlora._src.planning import LeafPlan, Plan

Targets = Literal["same", "union", "intersection"]
Entry = tuple[Mapping, Plan]


def _checked(entries: Sequence[Entry], weights: Sequence[float], what: str) -> tuple[list, list[Plan], list[float]]:
    """The flat adapters, plans and float weights, after checking they fit each other."""
    if isinstance(entries, Mapping) or not isinstance(entries, Sequence) or not entries:
        raise ValueError(
            f"{what} takes a non-empty list of (adapters, plan) pairs, got {type(entries).__name__}; for named "
            "adapters pass named.entries(names)"
        )
    for i, entry in enumerate(entries):
        if not (isinstance(entry, tuple | list) and len(entry) == 2 and isinstance(entry[1], Plan)):
            raise ValueError(f"{what}: entry {i} must be an (adapters, plan) pair with a jaxlora.Plan")
    if isinstance(weights, numbers.Real) or not isinstance(weights, Sequence | np.ndarray | jax.Array):
        raise ValueError(f"{what}: weights must be a list with one number per adapter, got {weights!r}")
    if len(weights) != len(entries):
        raise ValueError(
            f"{what}: {len(weights)} weights for {len(entries)} adapters; give exactly one weight per adapter"
        )
    weights = [float(w) for w in weights]
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"{what}: weights must be finite numbers, got {weights}")
    plans = [plan for _, plan in entries]
    check_same_base(plans, what)
    flats = [plan.check_adapters(adapters) for adapters, plan in entries]
    for i, flat in enumerate(flats):
        dora = [p for p, pair in flat.items() if "magnitude" in pair]
        if dora:
            raise ValueError(
                f"{what}: adapter {i} is a DoRA adapter (at {dora[0]!r}); DoRA's magnitude does not combine "
                "linearly: merge it with jaxlora.merge instead, or combine plain LoRA adapters"
            )
    return flats, plans, weights


def _paths(plans: Sequence[Plan], targets: Targets, what: str) -> list[str]:
    sets = [set(plan.leaves) for plan in plans]
    if targets == "same":
        for i, paths in enumerate(sets[1:], start=1):
            if paths != sets[0]:
                only = sorted(paths ^ sets[0])[0]
                which = 0 if only in sets[0] else i
                raise ValueError(
                    f"{what}: the adapters target different leaves ({only!r} is adapted by adapter {which} only); "
                    "say how to combine them: targets='union' (a missing adapter is a zero update) or "
                    "targets='intersection' (only the leaves every adapter adapts)"
                )
    elif targets not in ("union", "intersection"):
        raise ValueError(f"{what}: targets must be 'same', 'union' or 'intersection', got {targets!r}")
    chosen = set.union(*sets) if targets == "union" else set.intersection(*sets)
    if not chosen:
        raise ValueError(f"{what}: the adapters have no adapted leaf in common; use targets='union'")
    order = [p for plan in plans for p in plan.leaves]
    paths = sorted(chosen, key=order.index)
    for path in paths:
        layouts = {(p.leaves[path].layer_in_axes, p.leaves[path].stacked_axes) for p in plans if path in p.leaves}
        if len(layouts) > 1:
            raise ValueError(
                f"{what}: the adapters of {path!r} view its kernel differently (input axes, stacked_axes) = "
                f"{sorted(layouts)}; plan them with the same in_axes (or fan_in_ndim) and stacked_axes"
            )
    return paths


def _terms(flats, plans, weights, path: str) -> list[tuple[jax.Array, jax.Array, float, LeafPlan]]:
    """(A_i, masked B_i, w_i·s_i, leaf plan) of every adapter that adapts `path`."""
    out = []
    for flat, plan, w in zip(flats, plans, weights, strict=True):
        if path in plan.leaves:
            leaf = plan.leaves[path]
            out.append((jnp.asarray(flat[path]["lora_a"]), masked_b(flat[path]["lora_b"], leaf), w * leaf.scale, leaf))
    return out


def _layers(leaves: Sequence[LeafPlan]) -> tuple[int, ...] | None:
    """The union of the adapters' `layers_to_transform` (None: every layer)."""
    if any(leaf.layers is None for leaf in leaves):
        return None
    return tuple(sorted(set().union(*(leaf.layers for leaf in leaves))))


def _result(plans: Sequence[Plan], flat: dict, leaves: dict, ranks: dict, layers: dict) -> tuple[dict, Plan]:
    combined = derived_plan(plans[0], leaves, ranks, {p: float(r) for p, r in ranks.items()}, layers)
    return unflatten_adapters(flat), combined


def weighted_linear(entries: Sequence[Entry], weights: Sequence[float], *, targets: Targets = "same"):
    """PEFT's "linear" combination: A = Σ sign(w_i)√(|w_i| s_i) A_i, B = Σ √(|w_i| s_i) B_i, scale 1.

    Every adapter must have the same rank at each leaf. The update (Σ c_i A_i)(Σ d_j B_j) is the weighted sum
    Σ w_i s_i A_i B_i plus cross terms between adapters; use `weighted_cat` for the exact weighted sum.

    Args:
      entries: `[(adapters, plan), ...]`, all planned over the same base.
      weights: one number per adapter.
      targets: "same" (refuse adapters with other targets), "union" (a missing adapter adds nothing) or
        "intersection" (keep only the leaves every adapter adapts).

    Returns:
      `(adapters, plan)`: the combined adapters (rank r, scale 1) and their plan.

    Raises:
      ValueError: for weights that do not match the adapters in number, adapters over different bases, different
        targets with targets="same", different ranks at a leaf, or DoRA adapters.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, alpha=4.0))
      >>> _, a1 = jaxlora.init(jax.random.key(1), params, plan)
      >>> adapters, combined = jaxlora.weighted_linear([(a1, plan)], [0.5])
      >>> combined.leaves["dense/kernel"].rank, combined.leaves["dense/kernel"].scale
      (2, 1.0)
    """
    what = "weighted_linear"
    flats, plans, weights = _checked(entries, weights, what)
    flat, leaves, ranks, layers = {}, {}, {}, {}
    for path in _paths(plans, targets, what):
        terms = _terms(flats, plans, weights, path)
        if len({t[3].rank for t in terms}) > 1:
            raise ValueError(
                f"{what}: the adapters of {path!r} have ranks {[t[3].rank for t in terms]}; the linear combination "
                "needs one rank: use weighted_cat (exact, rank = sum of ranks) or weighted_svd (a chosen rank)"
            )
        dtype = terms[0][0].dtype
        a = sum(math.copysign(math.sqrt(abs(ws)), ws) * ai.astype(jnp.float32) for ai, _, ws, _ in terms)
        b = sum(math.sqrt(abs(ws)) * bi.astype(jnp.float32) for _, bi, ws, _ in terms)
        flat[path] = {"lora_a": a.astype(dtype), "lora_b": b.astype(dtype)}
        leaves[path], ranks[path], layers[path] = terms[0][3], terms[0][3].rank, _layers([t[3] for t in terms])
    return _result(plans, flat, leaves, ranks, layers)


def weighted_cat(entries: Sequence[Entry], weights: Sequence[float], *, targets: Targets = "same"):
    """The exact weighted sum Σ w_i s_i A_i B_i as one adapter of rank Σ r_i (PEFT's "cat"), with scale 1.

    A = [A_1 … A_N] concatenated along the rank axis and B = [w_1 s_1 B_1; …; w_N s_N B_N].

    Args:
      entries: `[(adapters, plan), ...]`, all planned over the same base.
      weights: one number per adapter.
      targets: "same", "union" or "intersection" (see `weighted_linear`).

    Returns:
      `(adapters, plan)`: the combined adapters (rank Σ r_i at each leaf, scale 1) and their plan.

    Raises:
      ValueError: for weights that do not match the adapters in number, adapters over different bases, different
        targets with targets="same", or DoRA adapters.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=1))
      >>> _, a1 = jaxlora.init(jax.random.key(1), params, plan)
      >>> _, a2 = jaxlora.init(jax.random.key(2), params, plan)
      >>> adapters, combined = jaxlora.weighted_cat([(a1, plan), (a2, plan)], [1.0, -1.0])
      >>> adapters["dense"]["kernel"]["lora_a"].shape
      (4, 2)
    """
    what = "weighted_cat"
    flats, plans, weights = _checked(entries, weights, what)
    flat, leaves, ranks, layers = {}, {}, {}, {}
    for path in _paths(plans, targets, what):
        terms = _terms(flats, plans, weights, path)
        dtype = terms[0][0].dtype
        flat[path] = {
            "lora_a": jnp.concatenate([ai.astype(dtype) for ai, _, _, _ in terms], axis=-1),
            "lora_b": jnp.concatenate([(ws * bi.astype(jnp.float32)).astype(dtype) for _, bi, ws, _ in terms], -2),
        }
        leaves[path], ranks[path] = terms[0][3], sum(t[3].rank for t in terms)
        layers[path] = _layers([t[3] for t in terms])
    return _result(plans, flat, leaves, ranks, layers)


def dense_update(a: jax.Array, b: jax.Array, scale: float, leaf: LeafPlan) -> jax.Array:
    """s·A B per layer, as (*stack, fan_in, fan_out) in float32."""
    k = leaf.stacked_axes
    a = jnp.asarray(a, jnp.float32).reshape(*leaf.stack_shape, leaf.fan_in, a.shape[-1])
    b = jnp.asarray(b, jnp.float32).reshape(*leaf.stack_shape, b.shape[k], leaf.fan_out)
    return scale * jnp.matmul(a, b)


def weighted_svd(entries: Sequence[Entry], weights: Sequence[float], rank: int, *, targets: Targets = "same"):
    """The exact Σ w_i s_i A_i B_i truncated by SVD to `rank` at each leaf (each stacked layer on its own).

    The truncation is the best rank-`rank` approximation in Frobenius norm (Eckart–Young); A = U √S and
    B = √S Vᵀ with scale 1. The dense update (fan_in × fan_out per layer) is formed once per leaf.

    Args:
      entries: `[(adapters, plan), ...]`, all planned over the same base.
      weights: one number per adapter.
      rank: the rank of the result (at most min(fan_in, fan_out) of every leaf).
      targets: "same", "union" or "intersection" (see `weighted_linear`).

    Returns:
      `(adapters, plan, discarded)`: the adapters, their plan, and `{path: fraction}`, the share of the exact
      update's squared Frobenius norm (Σ σ_k² over the dropped singular values / Σ σ_k², over every layer of
      the leaf) that the truncation drops (0.0 for a zero update).

    Raises:
      ValueError: as `weighted_cat`, and for a rank that is not an int in 1..min(fan_in, fan_out).

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=1))
      >>> _, a1 = jaxlora.init(jax.random.key(1), params, plan)
      >>> adapters, combined, discarded = jaxlora.weighted_svd([(a1, plan)], [1.0], rank=1)
      >>> discarded["dense/kernel"] < 1e-6
      True
    """
    what = "weighted_svd"
    flats, plans, weights = _checked(entries, weights, what)
    flat, leaves, ranks, layers, discarded = {}, {}, {}, {}, {}
    for path in _paths(plans, targets, what):
        terms = _terms(flats, plans, weights, path)
        leaf = terms[0][3]
        limit = min(leaf.fan_in, leaf.fan_out)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
            raise ValueError(
                f"{what}: rank must be an int in 1..{limit} (min(fan_in, fan_out) of {path!r}), got {rank!r}"
            )
        delta = sum(dense_update(ai, bi, ws, leaf) for ai, bi, ws, _ in terms)
        u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
        root = jnp.sqrt(s[..., :rank])
        a = (u[..., :rank] * root[..., None, :]).reshape(*leaf.a_shape[:-1], rank)
        b = (root[..., :, None] * vt[..., :rank, :]).reshape(
            *leaf.stack_shape, rank, *leaf.b_shape[leaf.stacked_axes + 1 :]
        )
        dtype = terms[0][0].dtype
        flat[path] = {"lora_a": a.astype(dtype), "lora_b": b.astype(dtype)}
        energy = jnp.sum(jnp.square(s))
        dropped = jnp.sum(jnp.square(s[..., rank:]))
        discarded[path] = float(dropped / energy) if float(energy) > 0 else 0.0
        leaves[path], ranks[path], layers[path] = leaf, rank, _layers([t[3] for t in terms])
    adapters, combined = _result(plans, flat, leaves, ranks, layers)
    return adapters, combined, discarded
