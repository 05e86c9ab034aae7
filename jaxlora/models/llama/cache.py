"""Llama's KV cache: the shared :class:`jaxlora.models.kv_cache.KVCache`, shaped from a :class:`LlamaConfig`."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxlora.models import kv_cache
from jaxlora.models.kv_cache import KVCache
from jaxlora.models.llama.config import LlamaConfig


def init_cache(config: LlamaConfig, batch: int, max_length: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty KV cache for `batch` rows of at most `max_length` tokens each (prompt and generated).

    Args:
      config: the model's config (num_hidden_layers, num_key_value_heads, head_dim).
      batch: rows.
      max_length: slots per row.
      dtype: of the keys and values.

    Returns:
      The cache, every row empty; pass it to the model as ``kv_cache=``.

    Example:
      >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
      ...                   num_attention_heads=4, num_key_value_heads=2)
      >>> cache = init_cache(cfg, batch=3, max_length=10)
      >>> cache.keys.shape, cache.lengths.tolist()
      ((2, 3, 10, 2, 4), [0, 0, 0])
    """
    return kv_cache.init_cache(
        config.num_hidden_layers, batch, max_length, config.num_key_value_heads, config.head_dim, dtype
    )


def check(config: LlamaConfig, cache: Any, ids_shape: tuple[int, int]) -> None:
    """Refuses a cache that does not fit the model or `ids_shape` (batch, new tokens), naming the fix."""
    batch, length = ids_shape
    kv_cache.check_cache(
        cache, batch, length, config.num_hidden_layers, config.num_key_value_heads, config.head_dim, where="cache"
    )
