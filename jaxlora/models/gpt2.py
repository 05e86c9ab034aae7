"""GPT-2 in flax.linen, with parameter names that mirror Hugging Face's ``GPT2Model``.

Parameter tree (linen names a list of blocks ``h_0``, ``h_1``, ...; the torch names are ``h.0``, ``h.1``)::

    wte/embedding                  (vocab, n_embd)      transformer.wte.weight
    wpe/embedding                  (n_positions, n_embd) transformer.wpe.weight
    h_{i}/ln_1/{scale,bias}                             transformer.h.{i}.ln_1.{weight,bias}
    h_{i}/attn/c_attn/{kernel,bias} (n_embd, 3 n_embd)  transformer.h.{i}.attn.c_attn.{weight,bias}
    h_{i}/attn/c_proj/{kernel,bias} (n_embd, n_embd)    transformer.h.{i}.attn.c_proj.{weight,bias}
    h_{i}/ln_2/{scale,bias}                             transformer.h.{i}.ln_2.{weight,bias}
    h_{i}/mlp/c_fc/{kernel,bias}    (n_embd, 4 n_embd)  transformer.h.{i}.mlp.c_fc.{weight,bias}
    h_{i}/mlp/c_proj/{kernel,bias}  (4 n_embd, n_embd)  transformer.h.{i}.mlp.c_proj.{weight,bias}
    ln_f/{scale,bias}                                   transformer.ln_f.{weight,bias}
    head/kernel  (classifier only)  (n_embd, classes)   score.weight (transposed: nn.Linear)

Every linear layer is a plain ``nn.Dense`` and both embeddings are ``nn.Embed``, so ``jaxlora.apply`` adapts
them without forming ``W + A @ B``. Hugging Face stores GPT-2's linears as ``Conv1D`` whose weight is already
laid out ``(in, out)`` like a flax kernel, so loading copies them without a transpose.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxlora._src.name_maps import ModuleName, torch_module, torch_param
from jaxlora._src.safetensors_io import read_tensors
from jaxlora.models.attention import attention, masked_scores
from jaxlora.models.normalization import LayerNorm
from jaxlora.models.sampling import sample_token

Params = dict[str, Any]

__all__ = [
    "GPT2",
    "PEFT_NAME_MAP",
    "PEFT_NAME_MAP_SCANNED",
    "PRESETS",
    "GPT2Classifier",
    "GPT2Config",
    "KVCache",
    "apply_model",
    "config_from_hf",
    "generate",
    "generate_greedy",
    "init_cache",
    "left_pad",
    "load_hf_weights",
    "stack_layers",
    "torch_module_name",
    "torch_param_name",
    "unstack_layers",
]

_ACTIVATIONS = {
    "gelu_new": partial(nn.gelu, approximate=True),
    "gelu": partial(nn.gelu, approximate=False),
}

# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """GPT-2 hyperparameters (Hugging Face field names); ``dropout`` is used for embeddings, attention and residuals."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None -> 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.1
    activation: str = "gelu_new"  # "gelu_new" (tanh approximation, GPT-2's) or "gelu" (exact)
    initializer_range: float = 0.02
    scan_layers: bool = False  # blocks stacked by nn.scan under "h" (kernels (n_layer, in, out)), not h_0, h_1, ...

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}.")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is not one of {sorted(_ACTIVATIONS)}.")

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GPT2Config:
        """One of the four published sizes ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"), optionally modified."""
        key = name.removeprefix("openai-community/")
        if key not in PRESETS:
            raise ValueError(f"Unknown GPT-2 size {name!r}; choose one of {sorted(PRESETS)}.")
        return dataclasses.replace(PRESETS[key], **overrides)

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> GPT2Config:
        """Read a Hugging Face ``config.json`` dictionary."""
        activation = hf.get("activation_function", "gelu_new")
        return cls(
            vocab_size=hf["vocab_size"],
            n_positions=hf["n_positions"],
            n_embd=hf["n_embd"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_inner=hf.get("n_inner"),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            dropout=hf.get("resid_pdrop", 0.1),
            activation="gelu_new" if activation in ("gelu_new", "gelu_pytorch_tanh") else activation,
            initializer_range=hf.get("initializer_range", 0.02),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(n_embd=768, n_layer=12, n_head=12),  # 124M
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),  # 355M
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),  # 774M
    "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25),  # 1558M
}

# --------------------------------------------------------------------------------------------------------------
# Key/value cache for incremental decoding
# --------------------------------------------------------------------------------------------------------------


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


def _check_cache(cfg: GPT2Config, cache: KVCache, ids_shape: tuple[int, ...]) -> None:
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


def _cache_positions_and_mask(cache: KVCache, length: int) -> tuple[jax.Array, jax.Array]:
    """Position ids (batch, length) of the new tokens and their (batch, 1, length, max_length) attention mask.

    The new tokens sit at cache positions index .. index + length - 1; a token at cache position p of row b sees
    the cached positions start_b .. p, and its position embedding is p - start_b (0 on the padding)."""
    where = cache.index + jnp.arange(length)  # (length,)
    start = cache.start[:, None]  # (batch, 1)
    positions = jnp.maximum(where[None] - start, 0)
    keys = jnp.arange(cache.max_length)
    mask = (keys[None, None, :] <= where[None, :, None]) & (keys[None, None, :] >= start[:, :, None])
    return positions, mask[:, None]


# --------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------


def _dense(features: int, name: str, std: float) -> nn.Dense:
    return nn.Dense(features, name=name, kernel_init=nn.initializers.normal(std))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with GPT-2's fused ``c_attn`` (q, k, v) projection."""

    config: GPT2Config

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array, deterministic: bool, layer_cache: LayerCache | None = None
    ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """The attention output; with `layer_cache` (keys, values, write index) also this layer's updated keys and
        values: x's keys and values are written at the index and the queries attend to the whole cache."""
        cfg = self.config
        batch, length, width = x.shape
        head_dim = width // cfg.n_head
        qkv = _dense(3 * width, "c_attn", cfg.initializer_range)(x)
        q, k, v = (t.reshape(batch, length, cfg.n_head, head_dim) for t in jnp.split(qkv, 3, axis=-1))
        if layer_cache is not None:
            cached_k, cached_v, index = layer_cache
            k = jax.lax.dynamic_update_slice_in_dim(cached_k, k.astype(cached_k.dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cached_v, v.astype(cached_v.dtype), index, axis=1)
        if deterministic or cfg.dropout == 0.0:  # keeps no (query, key)-sized tensor for the backward pass
            out = attention(q, k, v, mask).reshape(batch, length, width)
        else:  # dropout on the attention weights
            weights = jax.nn.softmax(masked_scores(q, k, mask), axis=-1).astype(v.dtype)
            weights = nn.Dropout(cfg.dropout)(weights, deterministic=deterministic)
            out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
        out = _dense(width, "c_proj", cfg.initializer_range / math.sqrt(2 * cfg.n_layer))(out)
        out = nn.Dropout(cfg.dropout)(out, deterministic=deterministic)
        return out if layer_cache is None else (out, (k, v))


class MLP(nn.Module):
    """GPT-2's feed-forward block: ``c_fc`` -> gelu -> ``c_proj``."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        cfg = self.config
        h = _ACTIVATIONS[cfg.activation](_dense(cfg.mlp_width, "c_fc", cfg.initializer_range)(x))
        h = _dense(x.shape[-1], "c_proj", cfg.initializer_range / math.sqrt(2 * cfg.n_layer))(h)
        return nn.Dropout(cfg.dropout)(h, deterministic=deterministic)


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    config: GPT2Config

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array, deterministic: bool, layer_cache: LayerCache | None = None
    ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        eps = self.config.layer_norm_epsilon
        attn = CausalSelfAttention(self.config, name="attn")(
            LayerNorm(eps, name="ln_1")(x), mask, deterministic, layer_cache
        )
        attn, new_kv = attn if layer_cache is not None else (attn, None)
        x = x + attn
        x = x + MLP(self.config, name="mlp")(LayerNorm(eps, name="ln_2")(x), deterministic)
        return x if layer_cache is None else (x, new_kv)


class _ScannedBlock(Block):
    """A Block with nn.scan's (carry, x) -> (carry, y) signature; `deterministic` is static, so an attribute."""

    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, None]:
        return Block.__call__(self, x, mask, self.deterministic), None


class _ScannedCachedBlock(Block):
    """A Block under nn.scan that also reads and writes its layer's slice of the KV cache (scanned inputs)."""

    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, index: jax.Array, keys: jax.Array, values: jax.Array):
        return Block.__call__(self, x, mask, self.deterministic, (keys, values, index))


def _cached_blocks(
    cfg: GPT2Config, x: jax.Array, mask: jax.Array, deterministic: bool, cache: KVCache
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """The blocks reading and writing `cache`; returns the hidden states and the new (keys, values) stacks."""
    if not cfg.scan_layers:
        keys, values = [], []
        for i in range(cfg.n_layer):
            x, (k, v) = Block(cfg, name=f"h_{i}")(x, mask, deterministic, (cache.keys[i], cache.values[i], cache.index))
            keys.append(k)
            values.append(v)
        return x, (jnp.stack(keys), jnp.stack(values))
    scanned = nn.scan(
        _ScannedCachedBlock,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, 0, 0),
        length=cfg.n_layer,
    )
    return scanned(cfg, deterministic, name="h")(x, mask, cache.index, cache.keys, cache.values)


def _blocks(cfg: GPT2Config, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
    """The n_layer blocks: h_0, h_1, ... or, with `scan_layers`, one nn.scan over stacked params under "h"."""
    if not cfg.scan_layers:
        for i in range(cfg.n_layer):
            x = Block(cfg, name=f"h_{i}")(x, mask, deterministic)
        return x
    scanned = nn.scan(
        _ScannedBlock,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,
        length=cfg.n_layer,
    )
    return scanned(cfg, deterministic, name="h")(x, mask)[0]


def _attention_mask(length: int, attention_mask: jax.Array | None) -> jax.Array:
    """Boolean (batch|1, 1, query, key) mask: causal, and optionally hiding padded keys."""
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:
        mask = mask & jnp.asarray(attention_mask, bool)[:, None, None, :]
    return mask


def _transformer(
    cfg: GPT2Config,
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    deterministic: bool,
    kv_cache: KVCache | None = None,
) -> tuple[jax.Array, nn.Embed, KVCache | None]:
    """Final hidden states, the token embedding and the updated cache (None without one); called inside a compact
    method so names stay top level."""
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must have shape (batch, length), got {input_ids.shape}.")
    length = input_ids.shape[1]
    if length > cfg.n_positions:
        raise ValueError(f"Sequence length {length} exceeds n_positions={cfg.n_positions}; truncate the input.")
    embed_init = nn.initializers.normal(cfg.initializer_range)
    wte = nn.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=embed_init, name="wte")
    wpe = nn.Embed(cfg.n_positions, cfg.n_embd, embedding_init=embed_init, name="wpe")
    if kv_cache is not None:
        if attention_mask is not None:
            raise ValueError("With kv_cache, padding is the cache's `start` (see init_cache); drop attention_mask.")
        _check_cache(cfg, kv_cache, input_ids.shape)
        positions, mask = _cache_positions_and_mask(kv_cache, length)
    else:
        positions, mask = jnp.arange(length)[None], _attention_mask(length, attention_mask)
    x = wte(input_ids) + wpe(positions)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    if kv_cache is None:
        x, new_cache = _blocks(cfg, x, mask, deterministic), None
    else:
        x, (keys, values) = _cached_blocks(cfg, x, mask, deterministic, kv_cache)
        new_cache = KVCache(keys, values, kv_cache.index + length, kv_cache.start)
    return LayerNorm(cfg.layer_norm_epsilon, name="ln_f")(x), wte, new_cache


class GPT2(nn.Module):
    """GPT-2 language model; the output head is tied to ``wte`` (``wte.attend``) as in the original."""

    config: GPT2Config

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        deterministic: bool = True,
        return_hidden: bool = False,
        kv_cache: KVCache | None = None,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Next-token logits (batch, length, vocab); ``attention_mask`` (1 = real token) hides pad keys.

        ``return_hidden=True`` returns the final hidden states (batch, length, n_embd) instead, e.g. to score
        only a subset of the vocabulary against ``params["wte"]["embedding"]``.

        With ``kv_cache`` (from :func:`init_cache`) the tokens are the next ``length`` positions of each row: their
        keys and values are written into the cache at ``kv_cache.index``, they attend to everything cached before
        them (left padding hidden by ``kv_cache.start``), and the call returns ``(logits, new_cache)``.
        """
        hidden, wte, new_cache = _transformer(self.config, input_ids, attention_mask, deterministic, kv_cache)
        out = hidden if return_hidden else wte.attend(hidden)
        return out if kv_cache is None else (out, new_cache)


class GPT2Classifier(nn.Module):
    """GPT-2 body plus a new linear ``head`` (no bias, like HF's ``score``) read at the last real token.

    The published spam recipe reads the final position, which for right-padded batches is a pad token, so its
    prediction depends on how much padding a batch has. With causal attention the last real token has seen the
    whole message and none of the padding, so reading it makes the result independent of padding (this is also
    what Hugging Face's ``GPT2ForSequenceClassification`` does). Pass ``lengths`` (real tokens per row, right
    padding) or an ``attention_mask``; with neither, the final position is read, as in the recipe.
    """

    config: GPT2Config
    num_classes: int = 2

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        lengths: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """Class logits of shape (batch, num_classes)."""
        hidden, _, _ = _transformer(self.config, input_ids, attention_mask, deterministic)
        index = _last_token_index(hidden.shape[:2], lengths, attention_mask)
        pooled = jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]
        head = nn.Dense(self.num_classes, use_bias=False, name="head")
        return head(pooled)


def _last_token_index(shape: tuple[int, int], lengths: jax.Array | None, attention_mask: jax.Array | None) -> jax.Array:
    """Position of each row's last real token, shape (batch,)."""
    batch, length = shape
    if lengths is not None:
        return jnp.clip(jnp.asarray(lengths, jnp.int32) - 1, 0, length - 1)
    if attention_mask is not None:
        mask = jnp.asarray(attention_mask, bool)
        return length - 1 - jnp.argmax(mask[:, ::-1], axis=1).astype(jnp.int32)
    return jnp.full((batch,), length - 1, jnp.int32)


# --------------------------------------------------------------------------------------------------------------
# Greedy generation
# --------------------------------------------------------------------------------------------------------------


def generate_greedy(model: GPT2, params: Params, token_ids: Any, max_new_tokens: int) -> jax.Array:
    """Append ``max_new_tokens`` argmax tokens to ``token_ids`` (batch, length) or (length,).

    Works in a fixed buffer of length ``length + max_new_tokens`` inside one ``lax.fori_loop``: the model is
    compiled once per buffer shape (prompt length and step count are traced), not once per step. There is no KV
    cache: each step reruns the whole buffer, and causal attention keeps the unwritten tail from affecting it.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    ids = jnp.asarray(token_ids, jnp.int32)
    squeeze = ids.ndim == 1
    ids = ids[None] if squeeze else ids
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"token_ids must be a non-empty (batch, length) or (length,) array, got {ids.shape}.")
    total = ids.shape[1] + max_new_tokens
    if total > model.config.n_positions:
        raise ValueError(
            f"prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds n_positions="
            f"{model.config.n_positions}; shorten the prompt or generate fewer tokens."
        )
    buffer = jnp.zeros((ids.shape[0], total), jnp.int32).at[:, : ids.shape[1]].set(ids)
    out = _greedy_fill(model, params, buffer, jnp.int32(ids.shape[1]), jnp.int32(max_new_tokens))
    return out[0] if squeeze else out


@partial(jax.jit, static_argnames=("model",))
def _greedy_fill(model: GPT2, params: Params, buffer: jax.Array, prompt_len: jax.Array, max_new_tokens: jax.Array):
    def step(i, buffer):
        position = prompt_len + i - 1
        logits = model.apply({"params": params}, buffer)
        next_token = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, position, axis=1, keepdims=False), axis=-1)
        return jax.lax.dynamic_update_index_in_dim(buffer, next_token.astype(jnp.int32), position + 1, axis=1)

    return jax.lax.fori_loop(0, max_new_tokens, step, buffer)


# --------------------------------------------------------------------------------------------------------------
# Generation with the KV cache: greedy or sampled, any forward (base, jaxlora.apply, jaxlora.apply_bank)
# --------------------------------------------------------------------------------------------------------------


def apply_model(model: GPT2, params: Params, input_ids: jax.Array, kv_cache: KVCache) -> tuple[jax.Array, KVCache]:
    """The default `forward` of :func:`generate`: the plain model, ``model.apply({"params": params}, ...)``.

    Args:
      model: the GPT2 module.
      params: its params.
      input_ids: (batch, length) tokens to append to the cache.
      kv_cache: the cache.

    Returns:
      ``(logits, new_cache)``.

    Example:
      >>> model = GPT2(GPT2Config(vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=2))
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
      >>> logits, cache = apply_model(model, params, jnp.ones((1, 3), jnp.int32), init_cache(model.config, 1, 8))
      >>> logits.shape, int(cache.index)
      ((1, 3, 32), 3)
    """
    return model.apply({"params": params}, input_ids, kv_cache=kv_cache)


def left_pad(prompts: Any, pad_token_id: int = 50256) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths as one left-padded batch for :func:`generate`.

    Args:
      prompts: a sequence of non-empty token-id sequences.
      pad_token_id: the filler (GPT-2's <|endoftext|> by default; never attended to).

    Returns:
      ``(input_ids, attention_mask)``, both (batch, longest prompt), mask 1 on real tokens.

    Raises:
      ValueError: for no prompts or an empty one.

    Example:
      >>> ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
      >>> ids.tolist(), mask.tolist()
      ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    if not prompts or any(p.size == 0 for p in prompts):
        raise ValueError("left_pad needs at least one prompt and no empty prompt.")
    width = max(p.size for p in prompts)
    ids = np.full((len(prompts), width), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, p in enumerate(prompts):
        ids[row, width - p.size :], mask[row, width - p.size :] = p, 1
    return ids, mask


def generate(
    model: GPT2,
    params: Any,
    input_ids: Any,
    max_new_tokens: int,
    *,
    attention_mask: Any = None,
    rng: jax.Array | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    forward: Any = apply_model,
    cache_dtype: Any = jnp.float32,
    return_logits: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The prompts followed by `max_new_tokens` generated tokens, decoded incrementally with a KV cache.

    The prompt runs once into the cache (prefill), then one token per step inside a ``lax.scan``: one compiled
    program per (batch, prompt length, max_new_tokens, forward), whatever the tokens, adapters or key. Greedy
    (argmax) without `rng`; with `rng`, sampled by :func:`sample_token` with a key folded per step, so the same
    key gives the same tokens. Rows of different prompt lengths are left-padded (:func:`left_pad`): the padding is
    never attended to and each row's positions start at 0, so a row decodes as it would alone.

    `forward(model, params, input_ids, kv_cache) -> (logits, new_cache)` runs the model; the default is the
    plain model. LoRA adapters, unmerged, or a mixed batch over an adapter bank::

        def lora(model, state, ids, cache):
            params, adapters = state
            return jaxlora.apply(model, {"params": params}, adapters, plan, ids, kv_cache=cache)

        def bank(model, state, ids, cache):
            params, bank, adapter_ids = state
            return jaxlora.apply_bank(model, {"params": params}, bank, adapter_ids, ids, kv_cache=cache)

    `forward` is a static argument (compiled per function object): define it once, not anew for every call.

    Args:
      model: a :class:`GPT2`.
      params: what `forward` takes as its state (the model's params for the default).
      input_ids: (batch, length) or (length,) integer prompt(s).
      max_new_tokens: tokens to append (>= 1); prompt + new tokens must fit ``n_positions``.
      attention_mask: (batch, length), 1 on real tokens, for left-padded prompts (the last column all 1).
      rng: a ``jax.random.key`` to sample; None for greedy decoding.
      temperature: sampling temperature (> 0; ignored when greedy).
      top_k: sample among the k most likely tokens (None: all; ignored when greedy).
      forward: the model call, see above.
      cache_dtype: dtype of the cached keys and values.
      return_logits: also return the logits each new token was chosen from, (batch, max_new_tokens, vocab).

    Returns:
      int32 tokens (batch, length + max_new_tokens), 1-D when `input_ids` was; with `return_logits`,
      ``(tokens, logits)``.

    Raises:
      ValueError: an empty or non-integer prompt, padding that is not on the left, too many tokens for
        ``n_positions``, or bad sampling settings.

    Example:
      >>> model = GPT2(GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=1, n_head=2))
      >>> params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
      >>> ids, mask = left_pad([[5, 6, 7], [8]])
      >>> generate(model, params, ids % 32, 4, attention_mask=mask).shape
      (2, 7)
    """
    ids = np.asarray(input_ids)
    squeeze = ids.ndim == 1
    ids = ids[None] if squeeze else ids
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be a non-empty integer (batch, length) or (length,) array, got {ids.shape}.")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask, bool)
    mask = mask[None] if squeeze and mask.ndim == 1 else mask
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}; they must be equal.")
    start = ids.shape[1] - mask.sum(axis=1)
    if not np.array_equal(mask, np.arange(ids.shape[1])[None] >= start[:, None]) or not mask[:, -1].all():
        raise ValueError(
            "attention_mask must be 0 on a leading run of padding and 1 after it, with at least one real token "
            "per row: pad batched prompts on the left (see left_pad)."
        )
    if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    if ids.shape[1] + max_new_tokens > model.config.n_positions:
        raise ValueError(
            f"prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds n_positions="
            f"{model.config.n_positions}; shorten the prompt or generate fewer tokens."
        )
    if rng is not None and not temperature > 0:
        raise ValueError(f"temperature must be > 0 to sample, got {temperature}.")
    if top_k is not None and not (isinstance(top_k, int | np.integer) and 1 <= top_k <= model.config.vocab_size):
        raise ValueError(f"top_k must be an integer in 1..vocab_size={model.config.vocab_size} or None, got {top_k!r}.")
    fed = np.where(mask, ids, 0)  # the padding is never attended to, but an id outside the vocabulary would be NaN
    tokens, logits = _decode(
        model, forward, params, jnp.asarray(fed, jnp.int32), jnp.asarray(start, jnp.int32),
        jax.random.key(0) if rng is None else rng, jnp.float32(temperature),
        max_new_tokens=int(max_new_tokens), top_k=None if top_k is None else int(top_k), greedy=rng is None,
        cache_dtype=jnp.dtype(cache_dtype), return_logits=return_logits,
    )  # fmt: skip
    out = jnp.concatenate([jnp.asarray(ids, jnp.int32), tokens], axis=1)
    out = out[0] if squeeze else out
    if return_logits:
        return out, logits[0] if squeeze else logits
    return out


@partial(
    jax.jit,
    static_argnames=("model", "forward", "max_new_tokens", "top_k", "greedy", "cache_dtype", "return_logits"),
)
def _decode(model, forward, params, ids, start, key, temperature, *, max_new_tokens, top_k, greedy, cache_dtype,
            return_logits):  # fmt: skip
    """Prefill, then max_new_tokens - 1 single-token steps; the new tokens (batch, new) and their logits."""
    batch, length = ids.shape
    cache = init_cache(model.config, batch, length + max_new_tokens, start, cache_dtype)
    logits, cache = forward(model, params, ids, cache)

    def pick(step, logits):
        if greedy:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return sample_token(jax.random.fold_in(key, step), logits, temperature, top_k)

    def step(carry, i):
        cache, last = carry
        token = pick(i, last)
        logits, cache = forward(model, params, token[:, None], cache)
        return (cache, logits[:, -1].astype(jnp.float32)), (token, last if return_logits else None)

    last = logits[:, -1].astype(jnp.float32)
    (_, last), (tokens, seen) = jax.lax.scan(step, (cache, last), jnp.arange(max_new_tokens - 1))
    final = pick(max_new_tokens - 1, last)
    tokens = jnp.concatenate([tokens.T, final[:, None]], axis=1)
    if not return_logits:
        return tokens, None
    return tokens, jnp.concatenate([jnp.moveaxis(seen, 0, 1), last[:, None]], axis=1)


# --------------------------------------------------------------------------------------------------------------
# Name map to PyTorch / PEFT
# --------------------------------------------------------------------------------------------------------------


# Rows are jaxlora.name_maps.ModuleName(pattern over our module path, torch module ``re.sub`` template, layout).
# Hugging Face keeps GPT-2's linears as ``Conv1D`` with weight ``(in, out)``, identical to our kernel ("conv1d";
# PEFT calls these ``fan_in_fan_out=True``); the classifier head maps to GPT2ForSequenceClassification's
# ``score``, an ``nn.Linear`` whose weight is our kernel transposed ("linear").
PEFT_NAME_MAP: tuple[ModuleName, ...] = (
    ModuleName(r"wte", "transformer.wte", "tied_embedding"),  # also the LM head (wte.attend)
    ModuleName(r"wpe", "transformer.wpe", "embedding"),
    ModuleName(r"h_(\d+)/ln_1", r"transformer.h.\1.ln_1", "layernorm"),
    ModuleName(r"h_(\d+)/attn/c_attn", r"transformer.h.\1.attn.c_attn", "conv1d"),
    ModuleName(r"h_(\d+)/attn/c_proj", r"transformer.h.\1.attn.c_proj", "conv1d"),
    ModuleName(r"h_(\d+)/ln_2", r"transformer.h.\1.ln_2", "layernorm"),
    ModuleName(r"h_(\d+)/mlp/c_fc", r"transformer.h.\1.mlp.c_fc", "conv1d"),
    ModuleName(r"h_(\d+)/mlp/c_proj", r"transformer.h.\1.mlp.c_proj", "conv1d"),
    ModuleName(r"ln_f", "transformer.ln_f", "layernorm"),
    ModuleName(r"head", "score", "linear"),  # GPT2ForSequenceClassification's head
)

# The same for scan_layers=True: one module path "h/..." holds every block; {layer} becomes each block's index.
PEFT_NAME_MAP_SCANNED: tuple[ModuleName, ...] = tuple(
    ModuleName(row.pattern.replace(r"h_(\d+)", "h"), row.module.replace(r"\1", "{layer}"), row.layout)
    for row in PEFT_NAME_MAP
)


def stack_layers(params: Params, n_layer: int) -> Params:
    """The scan_layers=True params from unscanned ones: h_0 ... h_{n-1} stacked leaf by leaf under "h"."""
    blocks = [params[f"h_{i}"] for i in range(n_layer)]
    rest = {k: v for k, v in params.items() if not re.fullmatch(r"h_\d+", k)}
    return {**rest, "h": jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)}


def unstack_layers(params: Params) -> Params:
    """The unscanned params from scan_layers=True ones: "h" split into h_0, h_1, ..."""
    n_layer = jax.tree.leaves(params["h"])[0].shape[0]
    rest = {k: v for k, v in params.items() if k != "h"}
    return {**rest, **{f"h_{i}": jax.tree.map(lambda leaf, i=i: leaf[i], params["h"]) for i in range(n_layer)}}


def torch_module_name(module_path: str) -> tuple[str, str]:
    """Torch module name and layout for one of our module paths, e.g. "h_0/attn/c_attn" -> ("transformer.h.0...")."""
    if not any(re.fullmatch(row.pattern, module_path) for row in PEFT_NAME_MAP):
        raise KeyError(
            f"No torch name for GPT-2 module {module_path!r}; known patterns: {[r.pattern for r in PEFT_NAME_MAP]}"
        )
    return torch_module(module_path, "kernel", PEFT_NAME_MAP)


def torch_param_name(param_path: str) -> str:
    """Torch state-dict key of one of our "/"-joined parameter paths: "ln_f/scale" -> "transformer.ln_f.weight"."""
    module_path, _, leaf = param_path.rpartition("/")
    name, layout = torch_module_name(module_path)
    try:
        return f"{name}.{torch_param(leaf, layout)}"
    except ValueError:
        raise KeyError(f"Unknown GPT-2 parameter leaf {leaf!r} in {param_path!r}.") from None


# --------------------------------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints
# --------------------------------------------------------------------------------------------------------------

_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers in older checkpoints
_NO_WEIGHTS_HINT = (
    "Give the path of a GPT-2 model.safetensors file (or of a directory holding one), or a Hugging Face hub id "
    "such as 'openai-community/gpt2' on a machine that is online."
)


def _looks_like_local_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.endswith(".safetensors") or os.sep in name.replace("/", "", 1)


def _hub_file(repo_id: str, filename: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as err:  # pragma: no cover - huggingface_hub ships with transformers
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path and huggingface_hub is not installed. {_NO_WEIGHTS_HINT}"
        ) from err
    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as err:  # offline, unknown repo, no network: all end the same way for the user
        raise FileNotFoundError(
            f"Could not get {filename!r} of {repo_id!r} from the Hugging Face Hub or its local cache "
            f"(offline or unreachable: {type(err).__name__}: {err}). {_NO_WEIGHTS_HINT}"
        ) from err


def _weight_files(path_or_repo: str | os.PathLike) -> tuple[list[Path], Path | None]:
    """The safetensors file(s) to read and the ``config.json`` beside them, if any."""
    path = Path(path_or_repo).expanduser()
    if path.is_file():
        config = path.parent / "config.json"
        return [path], config if config.is_file() else None
    if path.is_dir():
        config = path / "config.json"
        config = config if config.is_file() else None
        if (path / "model.safetensors").is_file():
            return [path / "model.safetensors"], config
        index = path / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [path / shard for shard in shards], config
        raise FileNotFoundError(f"No model.safetensors (or model.safetensors.index.json) in {path}. {_NO_WEIGHTS_HINT}")
    name = str(path_or_repo)
    if _looks_like_local_path(name):
        raise FileNotFoundError(f"GPT-2 weights not found at {name!r}. {_NO_WEIGHTS_HINT}")
    return [_hub_file(name, "model.safetensors")], _hub_file(name, "config.json")


def config_from_hf(path_or_repo: str | os.PathLike) -> GPT2Config:
    """GPT2Config from the ``config.json`` beside local weights or in a hub repo."""
    _, config_path = _weight_files(path_or_repo)
    if config_path is None:
        raise FileNotFoundError(f"No config.json beside the weights at {path_or_repo!r}; build a GPT2Config yourself.")
    return GPT2Config.from_hf_dict(json.loads(config_path.read_text()))


def _strip_prefix(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Accept GPT2LMHeadModel keys ("transformer.h.0...") and GPT2Model keys ("h.0...") alike."""
    out = {}
    for key, value in tensors.items():
        short = key.removeprefix("transformer.")
        if short in out:
            raise ValueError(f"Checkpoint holds both {short!r} and 'transformer.{short}'; keep one layout.")
        out[short] = value
    return out


def _infer_config(tensors: Mapping[str, Any]) -> GPT2Config:
    """Enough of a config to know every expected shape (n_head does not change shapes)."""
    if "wte.weight" not in tensors or "wpe.weight" not in tensors:
        raise ValueError(
            "Not a GPT-2 checkpoint: no 'wte.weight'/'wpe.weight' (also looked for 'transformer.wte.weight'). "
            f"First keys: {sorted(tensors)[:8]}"
        )
    vocab, width = tensors["wte.weight"].shape
    layers = {int(m.group(1)) for k in tensors if (m := re.match(r"h\.(\d+)\.", k))}
    fc = tensors.get("h.0.mlp.c_fc.weight")
    return GPT2Config(
        vocab_size=vocab,
        n_positions=tensors["wpe.weight"].shape[0],
        n_embd=width,
        n_layer=max(layers) + 1 if layers else 0,
        n_head=1,
        n_inner=None if fc is None else fc.shape[1],
    )


def _expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Our "/"-joined parameter paths and shapes, without allocating anything."""
    shapes = jax.eval_shape(lambda: GPT2(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def load_hf_weights(
    path_or_repo: str | os.PathLike, config: GPT2Config | None = None, dtype: Any = jnp.float32
) -> Params:
    """GPT-2 params for :class:`GPT2` / :class:`GPT2Classifier` from Hugging Face safetensors weights.

    ``path_or_repo``: a ``model.safetensors`` file, a directory holding one (or a sharded index), or a hub id such
    as ``"openai-community/gpt2"`` (downloaded with huggingface_hub when online). Shapes are checked against
    ``config`` when given, else against the ``config.json`` beside the weights, else against the weights
    themselves. Causal-mask buffers are ignored; a tied ``lm_head.weight`` is checked and dropped. With
    ``config.scan_layers`` the blocks come back stacked under "h" (see `stack_layers`).
    """
    files, config_path = _weight_files(path_or_repo)
    tensors = _strip_prefix(read_tensors(files))
    if config is None and config_path is not None:
        config = GPT2Config.from_hf_dict(json.loads(config_path.read_text()))
    config = config or _infer_config(tensors)
    source = ", ".join(str(f) for f in files)

    lm_head = tensors.pop("lm_head.weight", None)
    if lm_head is not None and "wte.weight" in tensors:
        wte = tensors["wte.weight"]
        if lm_head.shape != wte.shape or not np.array_equal(np.asarray(lm_head), np.asarray(wte)):
            raise ValueError(
                f"{source}: 'lm_head.weight' differs from 'wte.weight'; only tied GPT-2 heads are supported."
            )
    for key in [k for k in tensors if _BUFFERS.fullmatch(k)]:
        del tensors[key]

    expected = {
        torch_param_name(path).removeprefix("transformer."): (path, shape)
        for path, shape in _expected_shapes(dataclasses.replace(config, scan_layers=False)).items()
    }
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match GPT-2 with n_layer={config.n_layer}, n_embd={config.n_embd}: "
            f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}."
        )
    params: Params = {}
    for key, (path, shape) in expected.items():
        value = tensors[key]
        if tuple(value.shape) != shape:
            raise ValueError(f"{source}: {key!r} has shape {tuple(value.shape)}, expected {shape} for {path!r}.")
        node = params
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = jnp.asarray(value, dtype)
    return stack_layers(params, config.n_layer) if config.scan_layers else params
