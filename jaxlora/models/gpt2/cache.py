"""The key/value cache of incremental decoding: every block's keys and values, and each row's left padding."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxlora.models.gpt2.config import GPT2Config


@flax.struct.dataclass
class KVCache:
    """The keys and values of every block for the positions decoded so far; a pytree, so it goes through jit.

    Attributes:
      keys: (n_layer, batch, max_length, n_head, head_dim).
      values: the same shape.
      index: int32 scalar, the cache position the next token is written at (all rows advance together).
      start: int32 (batch,), each row's first real position: a left-padded row's padding lies before it, is never
        attended to, and its first real token gets position embedding 0 (as if the row ran alone).
    """

    keys: jax.Array
    values: jax.Array
    index: jax.Array
    start: jax.Array

    @property
    def max_length(self) -> int:
        return self.keys.shape[2]


LayerCache = tuple[jax.Array, jax.Array, jax.Array]  # one block's (keys, values, write index)


def init_cache(config: GPT2Config, batch: int, max_length: int, start: Any = None, dtype: Any = jnp.float32) -> KVCache:
    """An empty KV cache for `batch` rows of at most `max_length` positions (prompt and generated tokens).

    Args:
      config: the model's config (n_layer, n_head, n_embd, n_positions).
      batch: rows.
      max_length: positions the cache holds; at most ``config.n_positions``.
      start: (batch,) left-padding length of each row (0 = none); default all 0.
      dtype: of the keys and values.

    Returns:
      The cache, index 0; pass it as ``kv_cache=`` to :class:`GPT2`.

    Raises:
      ValueError: if max_length exceeds n_positions or start has the wrong shape.

    Example:
      >>> cache = init_cache(GPT2Config(n_embd=8, n_layer=2, n_head=2), batch=3, max_length=5)
      >>> cache.keys.shape, int(cache.index)
      ((2, 3, 5, 2, 4), 0)
    """
    if not 0 < max_length <= config.n_positions:
        raise ValueError(f"max_length={max_length} must be in 1..n_positions={config.n_positions}.")
    start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    if start.shape != (batch,):
        raise ValueError(f"start must have shape ({batch},) (one left-padding length per row), got {start.shape}.")
    shape = (config.n_layer, batch, max_length, config.n_head, config.n_embd // config.n_head)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.int32(0), start)


def check_cache(cfg: GPT2Config, cache: KVCache, ids_shape: tuple[int, ...]) -> None:
    if not isinstance(cache, KVCache):
        raise TypeError(f"kv_cache must be a KVCache from init_cache, got {type(cache).__name__}.")
    expected = (cfg.n_layer, ids_shape[0], cache.max_length, cfg.n_head, cfg.n_embd // cfg.n_head)
    if cache.keys.shape != expected or cache.values.shape != expected:
        raise ValueError(
            f"kv_cache holds keys {cache.keys.shape}, expected {expected} for input_ids {ids_shape}; build it with "
            "init_cache(config, batch, max_length)."
        )
    if ids_shape[1] > cache.max_length:
        raise ValueError(f"{ids_shape[1]} tokens do not fit a cache of max_length={cache.max_length}.")


def positions_and_mask(cache: KVCache, length: int) -> tuple[jax.Array, jax.Array]:
    """Position ids (batch, length) of the new tokens and their (batch, 1, length, max_length) attention mask.

    The new tokens sit at cache positions index .. index + length - 1; a token at cache position p of row b sees
    the cached positions start_b .. p, and its position embedding is p - start_b (0 on the padding)."""
    where = cache.index + jnp.arange(length)  # (length,)
    start = cache.start[:, None]  # (batch, 1)
    positions = jnp.maximum(where[None] - start, 0)
    keys = jnp.arange(cache.max_length)
    mask = (keys[None, None, :] <= where[None, :, None]) & (keys[None, None, :] >= start[:, :, None])
    return positions, mask[:, None]
