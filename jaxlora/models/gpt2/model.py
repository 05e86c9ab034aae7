"""GPT-2's modules in flax.linen: attention, MLP, block, the language model and the classifier."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlora.models import kv_cache as caching
from jaxlora.models.attention import attention, masked_scores
from jaxlora.models.gpt2.cache import check
from jaxlora.models.gpt2.config import ACTIVATIONS, GPT2Config
from jaxlora.models.kv_cache import KVCache
from jaxlora.models.normalization import LayerNorm
from jaxlora.models.rematerialization import checkpoint_policy

LayerCache = tuple[jax.Array, jax.Array, jax.Array]  # one block's (keys, values) and the rows' lengths


def _dense(features: int, name: str, std: float) -> nn.Dense:
    return nn.Dense(features, name=name, kernel_init=nn.initializers.normal(std))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with GPT-2's fused ``c_attn`` (q, k, v) projection."""

    config: GPT2Config

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: jax.Array, deterministic: bool, layer_cache: LayerCache | None = None
    ) -> jax.Array | tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """The attention output; with `layer_cache` (keys, values, lengths) also this layer's updated keys and
        values: x's keys and values are written at each row's length and the queries attend to the whole cache."""
        cfg = self.config
        batch, length, width = x.shape
        head_dim = width // cfg.n_head
        qkv = _dense(3 * width, "c_attn", cfg.initializer_range)(x)
        q, k, v = (t.reshape(batch, length, cfg.n_head, head_dim) for t in jnp.split(qkv, 3, axis=-1))
        if layer_cache is not None:
            cached_k, cached_v, lengths = layer_cache
            k, v = caching.write(cached_k, k, lengths), caching.write(cached_v, v, lengths)
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
        h = ACTIVATIONS[cfg.activation](_dense(cfg.mlp_width, "c_fc", cfg.initializer_range)(x))
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
    def __call__(self, x: jax.Array, mask: jax.Array, lengths: jax.Array, keys: jax.Array, values: jax.Array):
        return Block.__call__(self, x, mask, self.deterministic, (keys, values, lengths))


def _rematted(block: type[Block], cfg: GPT2Config) -> type[Block]:
    """`block`, recomputed in the backward pass under `cfg.remat`'s policy (itself when None)."""
    if cfg.remat is None:
        return block
    scanned = block is not Block
    static = () if scanned else (3,)  # Block's `deterministic` (self counts); the scanned blocks hold it
    return nn.remat(block, policy=checkpoint_policy(cfg.remat), prevent_cse=not scanned, static_argnums=static)


def _cached_blocks(
    cfg: GPT2Config, x: jax.Array, mask: jax.Array, deterministic: bool, cache: KVCache
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """The blocks reading and writing `cache`; returns the hidden states and the new (keys, values) stacks."""
    if not cfg.scan_layers:
        keys, values, block = [], [], _rematted(Block, cfg)
        for i in range(cfg.n_layer):
            x, (k, v) = block(cfg, name=f"h_{i}")(
                x, mask, deterministic, (cache.keys[i], cache.values[i], cache.lengths)
            )
            keys.append(k)
            values.append(v)
        return x, (jnp.stack(keys), jnp.stack(values))
    scanned = nn.scan(
        _rematted(_ScannedCachedBlock, cfg),
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, nn.broadcast, 0, 0),
        length=cfg.n_layer,
    )
    return scanned(cfg, deterministic, name="h")(x, mask, cache.lengths, cache.keys, cache.values)


def _blocks(cfg: GPT2Config, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
    """The n_layer blocks: h_0, h_1, ... or, with `scan_layers`, one nn.scan over stacked params under "h"."""
    if not cfg.scan_layers:
        block = _rematted(Block, cfg)
        for i in range(cfg.n_layer):
            x = block(cfg, name=f"h_{i}")(x, mask, deterministic)
        return x
    scanned = nn.scan(
        _rematted(_ScannedBlock, cfg),
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
            raise ValueError(
                "With kv_cache, each row attends to the tokens its cache holds (kv_cache.lengths), so there is no "
                "padding to mask: drop attention_mask (generate right-aligns left-padded prompts itself)."
            )
        check(cfg, kv_cache, input_ids.shape)
        positions, mask = caching.positions(kv_cache, length), caching.attention_mask(kv_cache, length)
    else:
        positions, mask = jnp.arange(length)[None], _attention_mask(length, attention_mask)
    x = wte(input_ids) + wpe(positions)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    if kv_cache is None:
        x, new_cache = _blocks(cfg, x, mask, deterministic), None
    else:
        x, (keys, values) = _cached_blocks(cfg, x, mask, deterministic, kv_cache)
        new_cache = caching.advance(kv_cache.replace(keys=keys, values=values), length)
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

        With ``kv_cache`` (a :class:`jaxlora.models.kv_cache.KVCache` from :func:`init_cache`) the tokens are the
        next ``length`` tokens of each row: row ``b``'s go at positions (and cache slots) ``kv_cache.lengths[b]``
        onwards, they attend to the row's cached tokens and to each other causally, and the call returns
        ``(logits, new_cache)`` with every row's length moved on by ``length``.
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
