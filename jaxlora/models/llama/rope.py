"""Rotary position embeddings as Hugging Face computes them (half-split rotation, Llama 3 frequency scaling)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.models.llama.config import LlamaConfig


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """The (head_dim // 2,) float32 inverse frequencies, after ``rope_scaling`` ("linear" or "llama3").

    Example:
        >>> inverse_frequencies(LlamaConfig(hidden_size=32, num_attention_heads=4)).shape
        (4,)
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    scaling = config.rope_scaling_dict
    if scaling is None:
        return inv_freq.astype(np.float32)
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return (inv_freq / factor).astype(np.float32)
    return _llama3(inv_freq, factor, scaling)


def _llama3(inv_freq: np.ndarray, factor: float, scaling: dict) -> np.ndarray:
    """Llama 3.1's scaling: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    scaled = np.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelength - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelength < old_context / high) & ~(wavelength > old_context / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def rotary_tables(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)`` of shape (*positions.shape, head_dim), float32, for integer `positions`."""
    angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inverse_frequencies(config))
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate `x` (batch, length, heads, head_dim) by (batch, length, head_dim) tables, in x's dtype like HF."""
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin
