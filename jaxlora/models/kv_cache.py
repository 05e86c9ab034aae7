"""The key/value cache of incremental decoding, one type for every model family, with a length per row.

A :class:`KVCache` holds every layer's keys and values in a fixed buffer of ``max_length`` slots per row, and
``lengths``, how many tokens each row holds. Row ``b``'s tokens sit at slots ``0 .. lengths[b] - 1`` and their
positions are their slots: positions are row-local, there is no padding inside the cache. New tokens of a row go
at its own offset, so rows advance independently: a finished row can be emptied (:func:`reset_row`) or replaced by
another request's prefilled cache (:func:`insert_row`) while the others keep decoding, which is what a
continuous-batching loop needs.

Slots at or past a row's length are never read before they are written: the new token at position ``p`` sees the
slots ``0 .. p`` (:func:`attention_mask`), and the call that brings it writes its key and value at slot ``p`` first.
A model family's call does, per layer, :func:`write` of the new keys and values, attention under
:func:`attention_mask` with :func:`positions` for its position embedding, and finally :func:`advance`.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

__all__ = [
    "KVCache",
    "advance",
    "attention_mask",
    "check_cache",
    "init_cache",
    "insert_row",
    "positions",
    "reset_row",
    "write",
]


@flax.struct.dataclass
class KVCache:
    """Every layer's keys and values, and how many tokens each row holds; a pytree, so it goes through ``jax.jit``.

    Attributes:
      keys: (layers, batch, max_length, kv_heads, head_dim); row ``b``'s tokens at slots ``0 .. lengths[b] - 1``.
      values: the same shape.
      lengths: int32 (batch,), the tokens each row holds, which is also the position of its next token.

    Example:
      >>> cache = init_cache(layers=2, batch=3, max_length=8, kv_heads=1, head_dim=4)
      >>> cache.max_length, cache.batch, cache.lengths.tolist()
      (8, 3, [0, 0, 0])
    """

    keys: jax.Array
    values: jax.Array
    lengths: jax.Array

    @property
    def max_length(self) -> int:
        """The slots per row (prompt and generated tokens)."""
        return self.keys.shape[2]

    @property
    def batch(self) -> int:
        """The rows."""
        return self.keys.shape[1]


def init_cache(
    layers: int, batch: int, max_length: int, kv_heads: int, head_dim: int, dtype: Any = jnp.float32
) -> KVCache:
    """An empty cache: every row holds 0 tokens.

    Each model family wraps it as ``init_cache(config, batch, max_length)`` (``jaxlora.models.gpt2.init_cache``,
    ``jaxlora.models.llama.init_cache``), which reads the shapes from the config.

    Args:
      layers: transformer blocks.
      batch: rows.
      max_length: slots per row, the most tokens (prompt and generated) a row can hold.
      kv_heads: key/value heads per layer.
      head_dim: width of one head.
      dtype: of the keys and values.

    Returns:
      A :class:`KVCache` of zeros with ``lengths`` all 0.

    Raises:
      ValueError: a size below 1.

    Example:
      >>> cache = init_cache(layers=2, batch=3, max_length=8, kv_heads=1, head_dim=4)
      >>> cache.keys.shape, cache.lengths.dtype
      ((2, 3, 8, 1, 4), dtype('int32'))
    """
    sizes = dict(layers=layers, batch=batch, max_length=max_length, kv_heads=kv_heads, head_dim=head_dim)
    for name, size in sizes.items():
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"init_cache: {name}={size!r} must be an integer >= 1.")
    shape = (layers, batch, max_length, kv_heads, head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


def positions(cache: KVCache, length: int) -> jax.Array:
    """The positions of `length` new tokens per row: row ``b``'s go at ``lengths[b], lengths[b] + 1, ...``.

    Args:
      cache: the cache the tokens are appended to.
      length: new tokens per row (static).

    Returns:
      int32 (batch, length), ``lengths[:, None] + arange(length)``; also the slots the tokens are written at.

    Example:
      >>> cache = advance(init_cache(1, 2, 8, 1, 4), jnp.array([3, 0]))
      >>> positions(cache, 2).tolist()
      [[3, 4], [0, 1]]
    """
    return cache.lengths[:, None] + jnp.arange(length, dtype=jnp.int32)


def attention_mask(cache: KVCache, length: int) -> jax.Array:
    """Which slots `length` new tokens per row attend to: slot ``s`` is visible to the new token at position ``p``
    iff ``s <= p`` (the row's earlier tokens, the new ones up to itself; nothing past it).

    Args:
      cache: the cache the tokens are appended to (before :func:`advance`).
      length: new tokens per row (static).

    Returns:
      bool (batch, 1, length, max_length), broadcastable over heads as ``jaxlora.models.attention.attention``
      takes it.

    Example:
      >>> cache = advance(init_cache(1, 2, 4, 1, 4), jnp.array([2, 0]))
      >>> attention_mask(cache, 1)[:, 0, 0].astype(int).tolist()
      [[1, 1, 1, 0], [1, 0, 0, 0]]
    """
    slots = jnp.arange(cache.max_length, dtype=jnp.int32)
    return (slots[None, None, :] <= positions(cache, length)[:, :, None])[:, None]


def write(layer: jax.Array, new: jax.Array, lengths: jax.Array) -> jax.Array:
    """One layer's keys (or values) with `new` written at each row's own offset (one update per row, vmapped).

    The caller keeps ``lengths + new.shape[1] <= max_length``; past it, ``lax.dynamic_update_slice`` moves the
    write back to fit, as it does any out-of-range start (this cannot be checked under ``jax.jit``).

    Args:
      layer: (batch, max_length, kv_heads, head_dim), e.g. ``cache.keys[i]``.
      new: (batch, length, kv_heads, head_dim), cast to `layer`'s dtype.
      lengths: int32 (batch,), each row's first slot to write (``cache.lengths``).

    Returns:
      `layer` with row ``b``'s slots ``lengths[b] .. lengths[b] + length - 1`` replaced.

    Example:
      >>> layer = jnp.zeros((2, 4, 1, 1))
      >>> write(layer, jnp.ones((2, 2, 1, 1)), jnp.array([1, 2]))[..., 0, 0].astype(int).tolist()
      [[0, 1, 1, 0], [0, 0, 1, 1]]
    """

    def row(buffer: jax.Array, tokens: jax.Array, start: jax.Array) -> jax.Array:
        return jax.lax.dynamic_update_slice_in_dim(buffer, tokens, start, axis=0)

    return jax.vmap(row)(layer, new.astype(layer.dtype), lengths)


def advance(cache: KVCache, n: jax.Array | int) -> KVCache:
    """The cache with each row's length moved on by `n` tokens (after their keys and values were written).

    Args:
      cache: the cache.
      n: tokens per row: a scalar for every row, or (batch,) one count per row (0 leaves a row as it is; a
        negative count forgets a row's last tokens, e.g. the right padding of a prefilled prompt).

    Returns:
      The cache with ``lengths + n``.

    Example:
      >>> advance(advance(init_cache(1, 3, 8, 1, 4), 2), jnp.array([0, 1, -2])).lengths.tolist()
      [2, 3, 0]
    """
    return cache.replace(lengths=cache.lengths + jnp.asarray(n, jnp.int32))


def insert_row(cache: KVCache, row: jax.Array | int, other: KVCache) -> KVCache:
    """The cache with row `row` replaced by the one row of `other`, e.g. a new request prefilled on its own.

    `row` may be a traced integer: one compiled program serves every row.

    Args:
      cache: the batch's cache.
      row: the row to replace, in ``0 .. batch - 1``.
      other: a batch-1 cache of the same layers, max_length, heads and dtype.

    Returns:
      The cache with ``other``'s keys, values and length at `row`; the other rows unchanged.

    Raises:
      ValueError: `other` has more than one row or another shape.

    Example:
      >>> batch, request = init_cache(1, 3, 8, 1, 4), advance(init_cache(1, 1, 8, 1, 4), 5)
      >>> jax.jit(insert_row)(batch, 1, request).lengths.tolist()
      [0, 5, 0]
    """
    want = (cache.keys.shape[0], 1, *cache.keys.shape[2:])
    if other.keys.shape != want or other.values.shape != want or other.lengths.shape != (1,):
        raise ValueError(
            f"insert_row: other holds keys {other.keys.shape}, expected {want} (one row of the same layers, "
            f"max_length, heads and head_dim); build it with the same init_cache(..., batch=1, ...)."
        )
    row = jnp.asarray(row, jnp.int32)

    def put(mine: jax.Array, theirs: jax.Array, axis: int) -> jax.Array:
        return jax.lax.dynamic_update_slice_in_dim(mine, theirs.astype(mine.dtype), row, axis=axis)

    return KVCache(
        put(cache.keys, other.keys, 1), put(cache.values, other.values, 1), put(cache.lengths, other.lengths, 0)
    )


def reset_row(cache: KVCache, row: jax.Array | int) -> KVCache:
    """The cache with row `row` emptied (length 0), to be refilled by new tokens or :func:`insert_row`.

    Its old keys and values stay in the buffer but are never read: a token at position ``p`` only sees slots up
    to ``p``, which its own call has just written.

    Args:
      cache: the cache.
      row: the row, in ``0 .. batch - 1``; may be traced.

    Returns:
      The cache with ``lengths[row] = 0``.

    Example:
      >>> reset_row(advance(init_cache(1, 2, 8, 1, 4), 3), 0).lengths.tolist()
      [0, 3]
    """
    return cache.replace(lengths=cache.lengths.at[row].set(0))


def check_cache(
    cache: Any, batch: int, length: int, layers: int, kv_heads: int, head_dim: int, where: str = "kv_cache"
) -> None:
    """Refuses a cache that cannot take `length` new tokens of `batch` rows, naming the problem and the fix.

    Only the shapes can be checked (they are static): whether each row's ``lengths + length`` fits
    ``max_length`` depends on traced values, and is the caller's to keep.

    Args:
      cache: what was passed as the cache.
      batch: rows of the new tokens.
      length: new tokens per row.
      layers, kv_heads, head_dim: the model's, from its config.
      where: the argument's name, for the message.

    Returns:
      None.

    Raises:
      TypeError: `cache` is not a :class:`KVCache`.
      ValueError: its shapes do not match the model's and the batch, or `length` exceeds ``max_length``.

    Example:
      >>> check_cache(init_cache(2, 3, 8, 1, 4), batch=3, length=8, layers=2, kv_heads=1, head_dim=4)
      >>> check_cache(init_cache(2, 3, 8, 1, 4), batch=3, length=9, layers=2, kv_heads=1, head_dim=4)
      Traceback (most recent call last):
      ...
      ValueError: kv_cache has max_length=8 slots per row, too few for 9 new tokens; build it with a larger max_length.
    """
    if not isinstance(cache, KVCache):
        raise TypeError(
            f"{where} must be a jaxlora.models.kv_cache.KVCache (see init_cache), got {type(cache).__name__}."
        )
    expected = (layers, batch, cache.max_length, kv_heads, head_dim)
    if cache.keys.shape != expected or cache.values.shape != expected or cache.lengths.shape != (batch,):
        raise ValueError(
            f"{where} holds keys {cache.keys.shape}, values {cache.values.shape} and lengths {cache.lengths.shape}, "
            f"expected {expected} and ({batch},) for the model and {batch} rows; build it with the family's "
            "init_cache(config, batch, max_length)."
        )
    if length > cache.max_length:
        raise ValueError(
            f"{where} has max_length={cache.max_length} slots per row, too few for {length} new tokens; build it "
            "with a larger max_length."
        )
