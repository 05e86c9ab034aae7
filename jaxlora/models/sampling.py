"""Drawing the next token from a model's logits: temperature, top-k and top-p (nucleus), shared by the models."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits: jax.Array, top_k: jax.Array | int, top_p: jax.Array | float) -> jax.Array:
    """`logits` (..., vocab) with the tokens outside the top-k, then outside the top-p nucleus, set to -inf.

    `top_k` 0 keeps every token; the nucleus is the smallest set of most likely tokens whose probability
    (renormalised after top-k) reaches `top_p`, never empty. Both may be traced values: one compile serves all.

    Args:
      logits: (..., vocab) scores.
      top_k: how many of the most likely tokens to keep; 0 for all.
      top_p: the probability mass the kept tokens must reach; 1.0 for all.

    Returns:
      `logits` with the dropped tokens at -inf, same shape and dtype.

    Example:
      >>> filter_logits(jnp.array([[0.0, 3.0, 1.0, 2.0]]), top_k=2, top_p=1.0)
      Array([[-inf,   3., -inf,   2.]], dtype=float32)
    """
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    order = jnp.argsort(-rows, axis=-1)
    ranked = jnp.take_along_axis(rows, order, axis=-1)
    drop = (top_k > 0) & (jnp.arange(vocab) >= top_k)
    probs = jax.nn.softmax(jnp.where(drop, -jnp.inf, ranked), axis=-1)
    drop = drop | (jnp.cumsum(probs, axis=-1) - probs >= top_p)  # the mass before this token reaches top_p
    drop = jnp.zeros_like(drop).at[jnp.arange(rows.shape[0])[:, None], order].set(drop)
    return jnp.where(drop, -jnp.inf, rows).reshape(logits.shape)


def sample_token(
    key: jax.Array,
    logits: jax.Array,
    temperature: float | jax.Array = 1.0,
    top_k: int | jax.Array | None = None,
    top_p: float | jax.Array | None = None,
) -> jax.Array:
    """One token per row drawn from softmax(logits / temperature), restricted by :func:`filter_logits`.

    Args:
      key: a ``jax.random.key``.
      logits: (..., vocab).
      temperature: > 0; lower is closer to greedy.
      top_k: keep only the k most likely tokens (None or 0: all); ``top_k=1`` is greedy.
      top_p: keep the smallest set of most likely tokens whose probability reaches it (None: all).

    Returns:
      int32 token ids of shape ``logits.shape[:-1]``.

    Example:
      >>> int(sample_token(jax.random.key(0), jnp.array([0.0, 5.0, 1.0]), top_k=1))
      1
    """
    scaled = logits.astype(jnp.float32) / temperature
    kept = filter_logits(scaled, 0 if top_k is None else top_k, 1.0 if top_p is None else top_p)
    return jax.random.categorical(key, kept).astype(jnp.int32)
