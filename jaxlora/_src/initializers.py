"""Adapter initialisation: A random (Kaiming-uniform or Gaussian) and B zero; PiSSA (W's SVD), OLoRA (QR), LoftQ."""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxlora._src.config import LoraConfig
from jaxlora._src.dora import initial_magnitude
from jaxlora._src.loftq import loftq_pair
from jaxlora._src.paths import PyTree, leaves_with_paths, map_with_paths, unflatten_adapters
from jaxlora._src.planning import LeafPlan, Plan, resolve
from jaxlora._src.svd import top_singular


def leaf_key(key: jax.Array, path: str) -> jax.Array:
    """A key for one leaf that depends only on `key` and the path, not on the other leaves."""
    return jax.random.fold_in(key, zlib.crc32(path.encode()))


def adapter_dtype(weight_dtype) -> jnp.dtype:
    """Adapters are float32 at least, so that a bf16 base still trains its adapters in float32."""
    return jnp.promote_types(weight_dtype, jnp.float32)


def _random_pair(key: jax.Array, leaf: LeafPlan, config: LoraConfig) -> dict[str, jax.Array]:
    dtype = adapter_dtype(leaf.dtype)
    if config.init == "kaiming":
        # Kaiming-uniform with a=sqrt(5) over fan_in, PEFT's default: bound = 1/sqrt(fan_in).
        bound = 1.0 / math.sqrt(leaf.fan_in)
        a = jax.random.uniform(key, leaf.a_shape, dtype, -bound, bound)
    else:
        std = config.init_std if config.init_std is not None else 1.0 / leaf.rank
        a = std * jax.random.normal(key, leaf.a_shape, dtype)
    return {"lora_a": a, "lora_b": jnp.zeros(leaf.b_shape, dtype)}


def _factored_pair(
    weight: jax.Array, leaf: LeafPlan, split: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A, B = split(W) per layer, and the residual base W - s·A B.

    Per layer for a stacked leaf; layers outside `layers_to_transform` keep W and get A = B = 0.
    """
    dtype = adapter_dtype(leaf.dtype)
    w = jnp.asarray(leaf.to_matrix_order(weight), jnp.float32).reshape(leaf.num_layers, leaf.fan_in, leaf.fan_out)
    a, b = jax.vmap(split)(w)
    mask = leaf.layer_mask()
    if mask is not None:
        keep = jnp.asarray(mask.reshape(-1, 1, 1))
        a, b = a * keep, b * keep
    residual = w - leaf.scale * jnp.einsum("lir,lro->lio", a, b)
    matrix_shape = (*leaf.stack_shape, *leaf.in_dims, *leaf.out_dims)
    residual = leaf.from_matrix_order(residual.reshape(matrix_shape)).astype(weight.dtype)
    pair = {"lora_a": a.reshape(leaf.a_shape).astype(dtype), "lora_b": b.reshape(leaf.b_shape).astype(dtype)}
    return residual, pair


def _pissa_pair(weight: jax.Array, leaf: LeafPlan, config: LoraConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PiSSA: A, B from W's top-r singular triplets (s·A B = U_r S_r V_rᵀ), and the residual base W - s·A B."""

    def split(w):
        u, s, vt = top_singular(w, leaf.rank)
        root = jnp.sqrt(s / leaf.scale)
        return u * root, root[:, None] * vt

    return _factored_pair(weight, leaf, split)


def _olora_pair(weight: jax.Array, leaf: LeafPlan, config: LoraConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
    """OLoRA, as PEFT computes it: the reduced QR of torch's (out, in) weight Wᵀ = Q R gives PEFT's lora_B = Q[:, :r]
    and lora_A = R[:r], so A = R[:r]ᵀ (in, r), B = Q[:, :r]ᵀ (r, out), not divided by the scale s; the residual
    base is W - s·A B. Householder QR (LAPACK's, which torch and jax use): R's diagonal may be negative, and the
    signs are left as the QR gives them, as in PEFT.
    """

    def split(w):
        q, r = jnp.linalg.qr(w.T)
        return r[: leaf.rank].T, q[:, : leaf.rank].T

    return _factored_pair(weight, leaf, split)


_BASE_CHANGING = {"pissa": _pissa_pair, "olora": _olora_pair, "loftq": loftq_pair}


def init(key: jax.Array, params: PyTree, plan: Plan | LoraConfig) -> tuple[PyTree, dict]:
    """Creates adapters for the leaves the plan selects; returns `(params, adapters)`.

    Args:
      key: a PRNG key; each leaf's key depends only on it and the leaf's path.
      params: the base params the plan was built for.
      plan: from `jaxlora.plan(params, config)` (a `LoraConfig` is resolved here).

    Returns:
      `(params, adapters)`: `params` unchanged (the same object) except with `init="pissa"` or `"olora"`, where the
      adapted leaves become the residual `W - s·A B` so that the adapted model still equals the base model, and
      `init="loftq"`, where they become NF4 `qwix.QArray`s Q with Q + s·A B close to W; `adapters` nested dicts
      mirroring params, `{"lora_a": A, "lora_b": B}` at each adapted leaf (B = 0 for kaiming and gaussian).

    Raises:
      ValueError: if the plan was built for other params, for init="eva" (see `jaxlora.init_eva`), and for
        init="loftq" on a leaf NF4 cannot hold (not 2-D, stacked, or DoRA), naming it.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
      >>> _, adapters = jaxlora.init(jax.random.key(0), params, plan)
      >>> adapters["dense"]["kernel"]["lora_b"].shape
      (2, 3)
    """
    resolved = resolve(params, plan)
    config = resolved.config
    if config.init == "eva":
        raise ValueError(
            "LoraConfig(init='eva') takes its adapters from the layers' inputs over data, which jaxlora.init does not "
            "see: call jaxlora.init_eva(params, plan, batches, layer_inputs) instead"
        )
    if config.init not in _BASE_CHANGING:
        pairs = {path: _random_pair(leaf_key(key, path), leaf, config) for path, leaf in resolved.leaves.items()}
        return params, unflatten_adapters(_with_magnitudes(params, pairs, resolved))
    pairs = {}
    make_pair = _BASE_CHANGING[config.init]

    def residual(path: str, weight):
        if path not in resolved.leaves:
            return weight
        weight, pairs[path] = make_pair(weight, resolved.leaves[path], config)
        return weight

    params = map_with_paths(residual, params)
    return params, unflatten_adapters(_with_magnitudes(params, pairs, resolved))


def _with_magnitudes(params: PyTree, pairs: dict, resolved: Plan) -> dict:
    """DoRA adapters get m = ‖W + s·A B‖ per output column, so the adapted model starts as the base model."""
    if not any(leaf.use_dora for leaf in resolved.leaves.values()):
        return pairs
    weights = dict(leaves_with_paths(params))
    for path, pair in pairs.items():
        leaf = resolved.leaves[path]
        if leaf.use_dora:
            pair["magnitude"] = initial_magnitude(weights[path], pair, leaf, pair["lora_a"].dtype)
    return pairs
