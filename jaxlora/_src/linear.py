"""A dense layer with an optional low-rank adapter, whose backward pass is written out by hand.

y = x W + bias + s·(x' A) B, with x' the (dropped-out) LoRA input. The hand-written VJP computes
only the cotangents that are asked for (never dW for a frozen W) and, on CPU only, puts an optimisation
barrier on the incoming cotangent, which keeps XLA:CPU from fusing element-wise producers into the GEMM
operands: plain autodiff through the same dots ran about 2.5x slower on CPU. GPU and TPU compilers fuse
producers into their GEMMs profitably, so there the barrier is left out (`lax.platform_dependent` picks
per platform at lowering time).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., in) @ w (in, out), the contraction flax's Dense performs."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _matmul_t(g: jax.Array, w: jax.Array) -> jax.Array:
    """g (..., out) @ w (in, out)ᵀ without materialising the transpose."""
    return lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))


def _outer(x: jax.Array, g: jax.Array) -> jax.Array:
    """xᵀ g summed over every leading (batch) axis: (..., m), (..., n) -> (m, n)."""
    batch = tuple(range(x.ndim - 1))
    return lax.dot_general(x, g, ((batch, batch), ((), ())))


def _outer_thin(x: jax.Array, thin: jax.Array) -> jax.Array:
    """xᵀ thin for a thin (..., r) right side, formed as (thinᵀ x)ᵀ: (..., m), (..., r) -> (m, r).

    With x on the left, XLA:CPU writes a transposed copy of the whole activation x (tokens x m) for the
    GEMM; with the thin operand on the left only it and the (r, m) result are transposed.
    """
    batch = tuple(range(x.ndim - 1))
    return lax.dot_general(thin, x, ((batch, batch), ((), ()))).T


def _forward(x, x_lora, w, bias, a, b, scale):
    y = _matmul(x, w)
    if bias is not None:
        y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    if a is None:
        return y, None
    xa = _matmul(x_lora, a)
    return y + _matmul(scale * xa, b).astype(y.dtype), xa  # scaled on the thin (..., r) side, not on (..., out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def lora_linear(x, x_lora, w, bias, a, b, scale: float):
    """`x W + bias + scale·(x_lora A) B` with a hand-written backward pass; `bias`, `a`, `b` may be None.

    The backward pass computes only the cotangents asked for (never dW for a frozen W).

    Args:
      x: the input (..., in).
      x_lora: the adapter's input, `x` after LoRA dropout (or `x` itself).
      w: the kernel (in, out).
      bias: (out,) or None.
      a: A (in, r) or None.
      b: B (r, out) or None.
      scale: s (a static Python float).

    Returns:
      (..., out) in the dtype of `x W`.

    Example:
      >>> import jax.numpy as jnp, jaxlora
      >>> x, w, a, b = jnp.ones((2, 4)), jnp.ones((4, 3)), jnp.ones((4, 1)), jnp.ones((1, 3))
      >>> jaxlora.lora_linear(x, x, w, None, a, b, 0.5)[0].tolist()
      [6.0, 6.0, 6.0]
    """
    return _forward(x, x_lora, w, bias, a, b, scale)[0]


def _fwd(x, x_lora, w, bias, a, b, scale):
    primals = (x, x_lora, w, bias, a, b)  # None stays None: an absent bias or adapter
    values = [None if p is None else p.value for p in primals]
    y, xa = _forward(*values, scale)
    perturbed = tuple(p is not None and p.perturbed for p in primals)
    return y, (values, xa, perturbed)


def _bwd(scale, residuals, g):
    (x, x_lora, w, bias, a, b), xa, perturbed = residuals
    want_x, want_xl, want_w, want_bias, want_a, want_b = perturbed
    g = lax.platform_dependent(g, cpu=lax.optimization_barrier, default=lambda g: g)
    dx = _matmul_t(g, w).astype(x.dtype) if want_x else None
    dw = _outer(x, g).astype(w.dtype) if want_w else None
    dbias = jnp.sum(g, axis=tuple(range(g.ndim - 1))).astype(bias.dtype) if want_bias else None
    dxl = da = db = None
    if a is not None and (want_xl or want_a or want_b):
        g_b = g.astype(b.dtype)
        gb = scale * _matmul_t(g_b, b)  # s·g Bᵀ (..., r): the scale on the thin side, no pass over g
        if want_xl:
            dxl = _matmul_t(gb, a).astype(x_lora.dtype)
        if want_a:
            da = _outer_thin(x_lora.astype(a.dtype), gb)
        if want_b:
            db = scale * _outer(xa, g_b)  # s·(x A)ᵀ g, scaled as an (r, out) matrix
    return dx, dxl, dw, dbias, da, db


lora_linear.defvjp(_fwd, _bwd, symbolic_zeros=True)
