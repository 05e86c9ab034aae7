"""LoftQ (Li et al. 2023): an NF4 base Q and adapters A, B chosen together so that Q + s·A B starts close to W.

Alternating, from A B = 0: Q = NF4(W - s·A B), then s·A B = the top-r SVD of W - Q. After k steps the base is the
last Q (a `qwix.QArray` in jaxlora.quantization's NF4 format: blocks of 64 input features per output column, the
bitsandbytes layout) and the adapters the last SVD. As PiSSA, the singular values are split as sqrt(S / s) into
A and B, so that s·A B (not A B) is the SVD part for any alpha; PEFT's LoftQ sets A B itself, which agrees when
s = 1 (alpha = r).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxlora._src.config import LoraConfig
from jaxlora._src.planning import LeafPlan
from jaxlora._src.quantization import DEFAULT_BLOCK_SIZE, dequantize, quantize_array
from jaxlora._src.svd import top_singular


def loftq_factors(
    weight: jax.Array, rank: int, scale: float, iterations: int, block_size: int = DEFAULT_BLOCK_SIZE, path: str = "W"
) -> tuple[Any, jax.Array, jax.Array]:
    """LoftQ's alternation on one 2-D kernel (in, out).

    Args:
      weight: the float kernel W (in, out).
      rank: the adapters' rank r.
      scale: the LoRA scale s.
      iterations: how many (quantize, SVD) steps (>= 1).
      block_size: NF4's block length along the input features.
      path: the leaf's path, for error messages.

    Returns:
      `(q, a, b)`: the NF4 `qwix.QArray` Q, A (in, r) and B (r, out), float32, with s·A B the top-r SVD of W - Q.

    Example:
      >>> import jax
      >>> from jaxlora._src.loftq import loftq_factors
      >>> w = jax.random.normal(jax.random.key(0), (128, 16))
      >>> q, a, b = loftq_factors(w, rank=4, scale=2.0, iterations=2)
      >>> q.shape, a.shape, b.shape
      ((128, 16), (128, 4), (4, 16))
    """
    w = jnp.asarray(weight, jnp.float32)
    residual = w
    for _ in range(iterations):
        q = quantize_array(residual.astype(weight.dtype), "nf4", block_size, path)
        u, s, vt = top_singular(w - dequantize(q).astype(jnp.float32), rank)
        root = jnp.sqrt(s / scale)
        a, b = u * root, root[:, None] * vt
        residual = w - scale * a @ b
    return q, a, b


def loftq_pair(weight: jax.Array, leaf: LeafPlan, config: LoraConfig) -> tuple[Any, dict[str, jax.Array]]:
    """The NF4 base (blocks of `config.loftq_block_size`) and `{"lora_a", "lora_b"}` of one planned leaf (see
    `loftq_factors`).

    Raises:
      ValueError: naming the leaf, for what an NF4 base cannot hold: stacked or n-D kernels, DoRA, or an input
        size that the 64-value blocks do not divide.
    """
    path = leaf.path
    if leaf.stacked_axes or len(leaf.shape) != 2:
        raise ValueError(
            f"init='loftq' quantizes {path!r} to NF4, and jaxlora's quantized bases are 2-D kernels (in, out); this "
            f"one has shape {leaf.shape}{' (stacked)' if leaf.stacked_axes else ''}: leave it out of the targets, "
            "or use init='pissa' / 'olora' for it"
        )
    if leaf.use_dora:
        raise ValueError(f"init='loftq' on {path!r}: DoRA on a quantized base is not supported; use use_dora=False")
    block = config.loftq_block_size
    if leaf.fan_in % block:
        raise ValueError(
            f"init='loftq' quantizes {path!r} in NF4 blocks of {block} input features (loftq_block_size), and its "
            f"{leaf.fan_in} input features are not a multiple of {block}: set loftq_block_size to a divisor of "
            f"{leaf.fan_in}, or leave the leaf out of the targets"
        )
    q, a, b = loftq_factors(weight, leaf.rank, leaf.scale, config.loftq_iter, block, path)
    dtype = jnp.promote_types(leaf.dtype, jnp.float32)
    return q, {"lora_a": a.astype(dtype), "lora_b": b.astype(dtype)}
