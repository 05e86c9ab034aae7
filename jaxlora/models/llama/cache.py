"""The key/value cache of incremental decoding: every layer's keys and values, and which slots hold real tokens."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxlora.models.llama.config import LlamaConfig


class KVCache(NamedTuple):
    """Keys and values of every layer in a fixed buffer of ``max_length`` slots, and which slots are real tokens.

    ``keys``/``values``: (layers, batch, max_length, kv_heads, head_dim); ``valid``: (batch, max_length) bool,
    False for unwritten and padding slots; ``index``: () int32, the number of slots written so far. Rotary
    positions are slot indices: attention only sees position differences, so left padding needs no offsets.
    """

    keys: jax.Array
    values: jax.Array
    valid: jax.Array
    index: jax.Array


def init_cache(config: LlamaConfig, batch: int, max_length: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty :class:`KVCache` for `batch` rows of up to `max_length` tokens (prompt plus generated).

    Example:
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                   num_attention_heads=4, num_key_value_heads=2)
        >>> init_cache(cfg, batch=3, max_length=10).keys.shape
        (2, 3, 10, 2, 4)
    """
    shape = (config.num_hidden_layers, batch, max_length, config.num_key_value_heads, config.head_dim)
    return KVCache(
        jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_length), bool), jnp.array(0, jnp.int32)
    )
