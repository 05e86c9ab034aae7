"""Merging adapters into their base weights and taking them out again, as tree maps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora._paths import PyTree, map_with_paths
from jaxlora.config import LoraConfig
from jaxlora.plan import LeafPlan, plan


def delta(pair: dict[str, jax.Array], leaf: LeafPlan) -> jax.Array:
    """The update s·A B of one leaf in float32, shaped like W."""
    a = jnp.asarray(pair["lora_a"], jnp.float32)
    b = jnp.asarray(pair["lora_b"], jnp.float32)
    return leaf.scale * jnp.tensordot(a, b, axes=1)


def _check_finite(path: str, value: jax.Array) -> None:
    if isinstance(value, jax.core.Tracer):
        return  # inside jit the values are unknown; check eagerly with jaxlora.merge outside jit
    if not bool(np.isfinite(np.asarray(value)).all()):
        raise FloatingPointError(
            f"merging the adapter into {path!r} gives NaN or Inf; the adapter (or W) holds non-finite values: "
            "check the learning rate and the loss, and restore the last good adapter checkpoint"
        )


def add_deltas(
    params: PyTree,
    pairs: dict[str, dict[str, jax.Array]],
    leaves: dict[str, LeafPlan],
    sign: float = 1.0,
    check_finite: bool = True,
) -> PyTree:
    """`W + sign·s·A B` for the leaves in the flat `pairs` mapping; every other leaf is passed through."""

    def update(path: str, weight):
        if path not in pairs:
            return weight
        out = jnp.asarray(weight, jnp.float32) + sign * delta(pairs[path], leaves[path])
        if check_finite:
            _check_finite(path, out)
        return out.astype(leaves[path].dtype)

    return map_with_paths(update, params)


def _apply_delta(params: PyTree, adapters: dict, config: LoraConfig, sign: float, check_finite: bool) -> PyTree:
    resolved = plan(params, config)
    return add_deltas(params, resolved.check_adapters(adapters), resolved.leaves, sign, check_finite)


def merge(params: PyTree, adapters: dict, config: LoraConfig, *, check_finite: bool = True) -> PyTree:
    """`W + s·A B` for every adapted leaf (accumulated in float32, cast once to W's dtype).

    Returns a new tree; `params` is not modified. Outside jit a non-finite result raises, naming the path.
    """
    return _apply_delta(params, adapters, config, 1.0, check_finite)


def unmerge(merged: PyTree, adapters: dict, config: LoraConfig, *, check_finite: bool = True) -> PyTree:
    """`W - s·A B` for every adapted leaf: the inverse of `merge` up to float rounding."""
    return _apply_delta(merged, adapters, config, -1.0, check_finite)
