"""Merging adapters into their base weights and taking them out again, as tree maps."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlora._src.config import LoraConfig
from jaxlora._src.dora import leaf_norms, merged_weight
from jaxlora._src.paths import PyTree, leaves_with_paths, map_with_paths
from jaxlora._src.planning import LeafPlan, Plan, resolve
from jaxlora._src.quantization import check_mergeable, dequantize

# Up to this rank, s·A B is summed as rank-one outer products inside one element-wise loop that XLA fuses
# with the add: W is read and written once, on every core, and A B never exists on its own. A GEMM with an
# inner dimension this thin is slower than that loop (GPT-2 small's 48 kernels at r=16, CPU: 0.22 s vs
# 0.066 s); above it the loop's r multiply-adds per element cost more than the GEMM's extra pass.
# Measured on CPU only: GPU and TPU run thin GEMMs well and fuse the add, so there A B stays one GEMM
# (`lax.platform_dependent` picks per platform at lowering time).
_OUTER_PRODUCT_MAX_RANK = 16


def _summed_outer_products(a: jax.Array, b: jax.Array) -> jax.Array:
    product = a[:, :1] * b[:1]
    for k in range(1, a.shape[1]):
        product = product + a[:, k : k + 1] * b[k : k + 1]
    return product


@jax.custom_vjp
def _matrix_product(a: jax.Array, b: jax.Array) -> jax.Array:
    """A B for A (m, r) and B (r, n): on CPU summed outer products at low rank, else a GEMM."""
    if a.shape[1] > _OUTER_PRODUCT_MAX_RANK:
        return a @ b
    return lax.platform_dependent(a, b, cpu=_summed_outer_products, default=jnp.matmul)


def _matrix_product_fwd(a, b):
    return _matrix_product(a, b), (a, b)


def _matrix_product_bwd(residuals, g):
    # GEMMs, as autodiff of A @ B would give; differentiating the summed outer products instead would
    # build r weight-sized terms (merging inside a jitted training step: 13 GB instead of 2.4 GB).
    a, b = residuals
    return g @ b.T, a.T @ g


_matrix_product.defvjp(_matrix_product_fwd, _matrix_product_bwd)


def _scaled_product(a: jax.Array, b: jax.Array, scale: float | jax.Array, stacked_axes: int = 0) -> jax.Array:
    """scale·A B in float32 for A (*stack, ..., r) and B (*stack, r, ...), layer by layer over the stack axes."""
    stack = a.shape[:stacked_axes]
    shape = (*a.shape[:-1], *b.shape[stacked_axes + 1 :])
    rank = a.shape[-1]
    if not stacked_axes:
        a, b = jnp.asarray(a, jnp.float32).reshape(-1, rank), jnp.asarray(b, jnp.float32).reshape(rank, -1)
        return (scale * _matrix_product(a, b)).reshape(shape)
    a = jnp.asarray(a, jnp.float32).reshape(-1, math.prod(a.shape[stacked_axes:-1]), rank)
    b = jnp.asarray(b, jnp.float32).reshape(math.prod(stack), rank, -1)
    return (scale * jax.vmap(_matrix_product)(a, b)).reshape(shape)


@functools.partial(jax.jit, static_argnames=("dtype", "stacked_axes", "order"))
def _added(
    weight: jax.Array,
    a: jax.Array,
    b: jax.Array,
    scale: float,
    dtype: Any,
    stacked_axes: int = 0,
    order: tuple[int, ...] | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`W + scale·A B` cast to `dtype`, and whether it is all finite: one compiled pass, also when called eagerly
    (compiled once per shape and dtype; the scale is an argument, so rank and alpha patterns add no compiles).

    `order` is the leaf's `matrix_order`: A B comes out in (stack, in, out) order and is put back in W's."""
    delta = _scaled_product(a, b, jnp.float32(scale), stacked_axes)
    if order is not None:
        delta = jnp.transpose(delta, tuple(int(i) for i in np.argsort(order)))
    out = jnp.asarray(weight, jnp.float32) + delta
    return out.astype(dtype), jnp.isfinite(out).all()


def masked_b(b: jax.Array, leaf: LeafPlan) -> jax.Array:
    """B with the layers outside `layers_to_transform` zeroed (B itself when every layer is adapted).

    The mask is a constant, so those layers' B also receive zero gradient and never move.
    """
    mask = leaf.layer_mask()
    if mask is None:
        return b
    return b * jnp.asarray(mask, b.dtype).reshape(mask.shape + (1,) * (b.ndim - mask.ndim))


def _check_finite(path: str, finite: jax.Array) -> None:
    if isinstance(finite, jax.core.Tracer):
        return  # inside jit the values are unknown; check eagerly with jaxlora.merge outside jit
    if not bool(finite):
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
    norms: dict[str, jax.Array] | None = None,
) -> PyTree:
    """`W + sign·s·A B` for the leaves in the flat `pairs` mapping; every other leaf is passed through.

    DoRA pairs (with a "magnitude") give m ⊙ (W + s·A B) / ‖W + s·A B‖, and back with sign=-1 and their `norms`.
    """

    check_mergeable(pairs, params)

    def update(path: str, weight):
        if path not in pairs:
            return weight
        leaf = leaves[path]
        weight = dequantize(weight)  # a quantized kernel merges into a float one
        if "magnitude" in pairs[path]:
            out, finite = _dora_merged(weight, pairs[path], leaf, sign, None if norms is None else norms[path])
            if check_finite:
                _check_finite(path, finite)
            return out
        a, b = pairs[path]["lora_a"], masked_b(pairs[path]["lora_b"], leaf)
        out, finite = _added(weight, a, b, sign * leaf.scale, leaf.dtype, leaf.stacked_axes, leaf.matrix_order)
        if check_finite:
            _check_finite(path, finite)
        return out

    return map_with_paths(update, params)


@functools.partial(jax.jit, static_argnames=("leaf", "sign"))
def _dora_merged(weight, pair, leaf: LeafPlan, sign: float, norms) -> tuple[jax.Array, jax.Array]:
    out = merged_weight(weight, pair, leaf, sign, norms)
    return out.astype(leaf.dtype), jnp.isfinite(out).all()


def _apply_delta(
    params: PyTree, adapters: dict, plan: Plan | LoraConfig, sign: float, check_finite: bool, norms=None
) -> PyTree:
    resolved = resolve(params, plan)
    pairs = resolved.check_adapters(adapters)
    if sign < 0 and any("magnitude" in pair for pair in pairs.values()):
        norms = _check_norms(norms, pairs, resolved)
    return add_deltas(params, pairs, resolved.leaves, sign, check_finite, norms)


def _check_norms(norms, pairs: dict, resolved: Plan) -> dict:
    """The flat `{path: column norms}` DoRA's unmerge needs, after checking they are there and fit."""
    if norms is None:
        raise ValueError(
            "unmerging DoRA adapters needs the column norms ‖W + s·A B‖ of the weights before merging (the merged "
            "weight's column norms are the magnitudes, so they cannot be recovered from it): compute "
            "norms = jaxlora.dora_norms(params, adapters, plan) before jaxlora.merge and pass unmerge(..., norms=norms)"
        )
    flat = {p: v for p, v in leaves_with_paths(norms)} if not all(p in norms for p in pairs) else dict(norms)
    for path, pair in pairs.items():
        if "magnitude" not in pair:
            continue
        if path not in flat or tuple(jnp.shape(flat[path])) != resolved.leaves[path].magnitude_shape:
            raise ValueError(
                f"norms for {path!r} are missing or misshaped (want {resolved.leaves[path].magnitude_shape}); "
                "pass the dict jaxlora.dora_norms(params, adapters, plan) returned"
            )
    return flat


def dora_norms(params: PyTree, adapters: dict, plan: Plan | LoraConfig) -> dict[str, jax.Array]:
    """`{path: ‖W + s·A B‖ per output column}` for every DoRA adapter, computed factored (no W + s·A B formed).

    Keep them when merging DoRA adapters: `unmerge` needs them to take the adapters out again.

    Args:
      params: the base params (not merged).
      adapters: DoRA adapters (`LoraConfig(use_dora=True)`).
      plan: from `jaxlora.plan(params, config)`.

    Returns:
      A flat dict from the adapted leaf's path to its float32 column norms (shape: W's output axes).

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, use_dora=True))
      >>> params, adapters = jaxlora.init(jax.random.key(0), params, plan)
      >>> norms = jaxlora.dora_norms(params, adapters, plan)
      >>> merged = jaxlora.merge(params, adapters, plan)
      >>> back = jaxlora.unmerge(merged, adapters, plan, norms=norms)
      >>> bool(jnp.allclose(back["dense"]["kernel"], 1.0)), norms["dense/kernel"].tolist()
      (True, [2.0, 2.0, 2.0])
    """
    resolved = resolve(params, plan)
    pairs = resolved.check_adapters(adapters)
    weights = dict(leaves_with_paths(params))
    return {
        path: leaf_norms(weights[path], pair, resolved.leaves[path])
        for path, pair in pairs.items()
        if "magnitude" in pair
    }


def merge(params: PyTree, adapters: dict, plan: Plan | LoraConfig, *, check_finite: bool = True) -> PyTree:
    """`W + s·A B` for every adapted leaf (accumulated in float32, cast once to W's dtype), as a tree map.

    Args:
      params: the base params.
      adapters: from `jaxlora.init` (or trained).
      plan: from `jaxlora.plan(params, config)` (a `LoraConfig` is resolved here).
      check_finite: outside jit, raise if a merged leaf holds NaN or Inf.

    Returns:
      A new tree; `params` is not modified. Works inside `jit` (its gradient is two GEMMs per leaf).

    Raises:
      ValueError: if the adapters or the plan do not fit `params`.
      FloatingPointError: outside jit, naming the path whose merged weight is not finite.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
      >>> params, adapters = jaxlora.init(jax.random.key(0), params, plan)
      >>> bool((jaxlora.merge(params, adapters, plan)["dense"]["kernel"] == 1).all())  # B = 0
      True
    """
    return _apply_delta(params, adapters, plan, 1.0, check_finite)


def unmerge(
    merged: PyTree, adapters: dict, plan: Plan | LoraConfig, *, check_finite: bool = True, norms: dict | None = None
) -> PyTree:
    """`W - s·A B` for every adapted leaf: the inverse of `merge` up to float rounding.

    Args:
      merged: params with the adapters merged in.
      adapters: the adapters that were merged.
      plan: the plan (or config) they were merged with.
      check_finite: outside jit, raise if a leaf holds NaN or Inf.
      norms: DoRA adapters only: `jaxlora.dora_norms(params, adapters, plan)` taken before merging.

    Returns:
      A new tree with the update taken out again.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
      >>> _, adapters = jaxlora.init(jax.random.key(0), params, plan)
      >>> back = jaxlora.unmerge(jaxlora.merge(params, adapters, plan), adapters, plan)
      >>> bool(jnp.allclose(back["dense"]["kernel"], 1.0))
      True
    """
    return _apply_delta(merged, adapters, plan, -1.0, check_finite, norms)
