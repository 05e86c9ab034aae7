"""DoRA (weight-decomposed LoRA, Liu et al. 2024) computed factored: W + s·A B is never formed.

W' = m ⊙ V / ‖V‖ with V = W + s·A B and ‖·‖ the L2 norm of each output column (over W's fan-in axes, as PEFT
takes it over `weight.norm(dim=1)` of torch's (out, in) weight). The column norms come from

    ‖v_j‖² = ‖w_j‖² + 2s·(Aᵀ W)_j · B_j + s²·B_jᵀ (Aᵀ A) B_j,

which needs one r x in x out product and no in x out array, and the layer output is a rescaling of the LoRA
output: y = (m / ‖V‖) ⊙ (x W + s·(x A) B) + bias.

Gradients: following the DoRA paper (section 4.3) and PEFT (`weight_norm.detach()`), ‖V‖ is a constant in the
backward pass: no gradient flows through the norm into A, B or W. The magnitude m receives Σ g ⊙ h / ‖V‖.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxlora._src.linear import _matmul, _matmul_t, _outer
from jaxlora._src.planning import LeafPlan


def column_norms(w: jax.Array, a: jax.Array, b: jax.Array, scale: float | jax.Array) -> jax.Array:
    """‖W + s·A B‖ per output column, for W (in, out), A (in, r), B (r, out), in float32, without W + s·A B.

    Args:
      w: the base weight viewed as (fan_in, fan_out).
      a: A as (fan_in, r).
      b: B as (r, fan_out).
      scale: s.

    Returns:
      The (fan_out,) column norms (float32).
    """
    w = w.astype(jnp.float32)
    a = a.astype(jnp.float32)
    b = b.astype(jnp.float32)
    base = lax.dot_general(w, w, (((0,), (0,)), ((1,), (1,))))  # ‖w_j‖², a batched dot: no w*w array
    cross = jnp.sum(lax.dot_general(a, w, (((0,), (0,)), ((), ()))) * b, axis=0)  # (Aᵀ W)_j · B_j
    gram = lax.dot_general(a, a, (((0,), (0,)), ((), ())))  # Aᵀ A, (r, r)
    square = jnp.sum((gram @ b) * b, axis=0)
    return jnp.sqrt(jnp.maximum(base + 2.0 * scale * cross + scale * scale * square, 0.0))


def leaf_norms(weight: jax.Array, pair: dict, leaf: LeafPlan) -> jax.Array:
    """`column_norms` for one planned leaf of any shape, shaped like its magnitude vector."""
    w = jnp.reshape(weight, (leaf.fan_in, leaf.fan_out))
    a = jnp.reshape(pair["lora_a"], (leaf.fan_in, leaf.rank))
    b = jnp.reshape(pair["lora_b"], (leaf.rank, leaf.fan_out))
    return column_norms(w, a, b, leaf.scale).reshape(leaf.magnitude_shape)


def initial_magnitude(weight: jax.Array, pair: dict, leaf: LeafPlan, dtype) -> jax.Array:
    """DoRA's initial m = ‖W + s·A B‖ (= ‖W‖ when B = 0), so that the adapted layer starts as the base layer."""
    return leaf_norms(weight, pair, leaf).astype(dtype)


def _rescale(magnitude: jax.Array, norms: jax.Array) -> jax.Array:
    """m / ‖V‖ per output column; a zero column (‖V‖ = 0) keeps scale 0 instead of NaN."""
    safe = jnp.where(norms > 0, norms, 1.0)
    return jnp.where(norms > 0, magnitude.astype(jnp.float32) / safe, 0.0)


def _forward(x, w, bias, a, b, magnitude, scale):
    norms = column_norms(w, a, b, scale)
    factor = _rescale(magnitude, norms)
    xa = _matmul(x, a)
    h = _matmul(x, w) + (scale * _matmul(xa, b)).astype(x.dtype)
    y = (factor * h).astype(h.dtype)
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y, (xa, h, factor, norms)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def dora_linear(x, w, bias, a, b, magnitude, scale: float):
    """`(m / ‖W + s·A B‖) ⊙ (x W + s·(x A) B) + bias` for W (in, out), with the norm held constant for gradients.

    The hand-written VJP computes only the cotangents asked for (no dW for a frozen W).

    Args:
      x: the input (..., in).
      w: W (in, out).
      bias: (out,) or None.
      a: A (in, r).
      b: B (r, out).
      magnitude: m (out,).
      scale: s.

    Returns:
      The layer output (..., out).
    """
    return _forward(x, w, bias, a, b, magnitude, scale)[0]


def _fwd(x, w, bias, a, b, magnitude, scale):
    primals = (x, w, bias, a, b, magnitude)
    values = [None if p is None else p.value for p in primals]
    y, (xa, h, factor, norms) = _forward(*values, scale)
    perturbed = tuple(p is not None and p.perturbed for p in primals)
    return y, (values, xa, h, factor, norms, perturbed)


def _bwd(scale, residuals, g):
    (x, w, bias, a, b, magnitude), xa, h, factor, norms, perturbed = residuals
    want_x, want_w, want_bias, want_a, want_b, want_m = perturbed
    g = lax.optimization_barrier(g)
    batch = tuple(range(g.ndim - 1))
    dbias = jnp.sum(g, axis=batch).astype(bias.dtype) if want_bias else None
    dm = None
    if want_m:
        safe = jnp.where(norms > 0, norms, 1.0)
        dm = jnp.where(norms > 0, jnp.sum(g.astype(jnp.float32) * h, axis=batch) / safe, 0.0).astype(magnitude.dtype)
    gc = (g * factor).astype(g.dtype)  # the one (..., out) array the backward pass forms
    # s enters through the small operands (s·B, and the (r, out) product for dB): no second (..., out) array s·gc.
    gb = _matmul_t(gc.astype(b.dtype), scale * b) if (want_x or want_a) else None  # (..., r)
    dx = (_matmul_t(gc, w) + _matmul_t(gb, a).astype(gc.dtype)).astype(x.dtype) if want_x else None
    dw = _outer(x, gc).astype(w.dtype) if want_w else None
    da = _outer(x.astype(a.dtype), gb) if want_a else None
    db = (scale * _outer(xa, gc.astype(b.dtype))).astype(b.dtype) if want_b else None
    return dx, dw, dbias, da, db, dm


dora_linear.defvjp(_fwd, _bwd, symbolic_zeros=True)


def dora_linear_dropout(x, x_lora, w, bias, a, b, magnitude, scale: float):
    """DoRA with LoRA dropout on the adapter input `x_lora`, as PEFT computes it in training mode.

    `x W + bias + (c - 1) ⊙ (x_lora W) + c ⊙ s·(x_lora A) B` with c = m / ‖W + s·A B‖ (held constant): the base
    term sees the clean input, the DoRA term the dropped-out one. Plain jnp, differentiated by JAX.
    """
    factor = _rescale(magnitude, lax.stop_gradient(column_norms(w, a, b, scale)))
    y = _matmul(x, w)
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    dropped = _matmul(x_lora, w) * (factor - 1.0) + factor * (scale * _matmul(_matmul(x_lora, a), b))
    return y + dropped.astype(y.dtype)


def merged_weight(weight: jax.Array, pair: dict, leaf: LeafPlan, sign: float = 1.0, norms=None) -> jax.Array:
    """DoRA's merged weight m ⊙ (W + s·A B) / ‖W + s·A B‖ (sign=+1), or the base W back from it (sign=-1).

    Unmerging needs the column norms of the original W + s·A B (`norms`, from `jaxlora.dora_norms` before
    merging): the merged weight has column norms m, so ‖W + s·A B‖ cannot be recovered from it.
    """
    w = jnp.asarray(weight, jnp.float32).reshape(leaf.fan_in, leaf.fan_out)
    a = jnp.asarray(pair["lora_a"], jnp.float32).reshape(leaf.fan_in, leaf.rank)
    b = jnp.asarray(pair["lora_b"], jnp.float32).reshape(leaf.rank, leaf.fan_out)
    magnitude = jnp.asarray(pair["magnitude"], jnp.float32).reshape(leaf.fan_out)
    if sign > 0:
        norms = lax.stop_gradient(column_norms(w, a, b, leaf.scale))
        out = _rescale(magnitude, norms) * (w + leaf.scale * (a @ b))
    else:
        norms = jnp.asarray(norms, jnp.float32).reshape(leaf.fan_out)
        safe = jnp.where(magnitude != 0, magnitude, 1.0)
        out = w * (norms / safe) - leaf.scale * (a @ b)
    return out.reshape(leaf.shape)
