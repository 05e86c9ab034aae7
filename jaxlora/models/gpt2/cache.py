"""GPT-2's KV cache: the shared :class:`jaxlora.models.kv_cache.KVCache`, shaped from a :class:`GPT2Config`."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxlora.models import kv_cache
from jaxlora.models.gpt2.config import GPT2Config
from jaxlora.models.kv_cache import KVCache


def init_cache(config: GPT2Config, batch: int, max_length: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty KV cache for `batch` rows of at most `max_length` tokens each (prompt and generated).

    Args:
      config: the model's config (n_layer, n_head, n_embd, n_positions).
      batch: rows.
      max_length: slots per row; at most ``config.n_positions`` (a row's positions are its slots).
      dtype: of the keys and values.

    Returns:
      The cache, every row empty; pass it as ``kv_cache=`` to :class:`GPT2`.

    Raises:
      ValueError: if max_length is not in 1..n_positions.

    Example:
      >>> cache = init_cache(GPT2Config(n_embd=8, n_layer=2, n_head=2), batch=3, max_length=5)
      >>> cache.keys.shape, cache.lengths.tolist()
      ((2, 3, 5, 2, 4), [0, 0, 0])
    """
    if not 0 < max_length <= config.n_positions:
        raise ValueError(f"max_length={max_length} must be in 1..n_positions={config.n_positions}.")
    return kv_cache.init_cache(config.n_layer, batch, max_length, config.n_head, _head_dim(config), dtype)


def check(config: GPT2Config, cache: Any, ids_shape: tuple[int, int]) -> None:
    """Refuses a cache that does not fit the model or `ids_shape` (batch, new tokens), naming the fix."""
    batch, length = ids_shape
    kv_cache.check_cache(cache, batch, length, config.n_layer, config.n_head, _head_dim(config))
    if cache.max_length > config.n_positions:
        raise ValueError(
            f"kv_cache has max_length={cache.max_length} slots, more than n_positions={config.n_positions} position "
            "embeddings; build it with init_cache(config, batch, max_length)."
        )


def _head_dim(config: GPT2Config) -> int:
    return config.n_embd // config.n_head
