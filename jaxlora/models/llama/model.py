"""A Llama-family decoder in flax NNX whose parameter names mirror Hugging Face's ``LlamaForCausalLM``.

Parameter tree (HF names drop the leading ``model.``; ``lm_head`` only for untied heads)::

    embed_tokens/embedding                       (vocab, hidden)       model.embed_tokens.weight
    layers/.../input_layernorm/scale             (hidden,)             model.layers.{i}.input_layernorm.weight
    layers/.../self_attn/{q,k,v,o}_proj/kernel   (in, out)             model.layers.{i}.self_attn.q_proj.weight (T)
    layers/.../self_attn/{q,k,v}_proj/bias       (out,)  (Qwen2)       model.layers.{i}.self_attn.q_proj.bias
    layers/.../post_attention_layernorm/scale    (hidden,)             model.layers.{i}.post_attention_layernorm...
    layers/.../mlp/{gate,up,down}_proj/kernel    (in, out)             model.layers.{i}.mlp.gate_proj.weight (T)
    norm/scale                                   (hidden,)             model.norm.weight
    lm_head/kernel                               (hidden, vocab)       lm_head.weight (T)

Two layouts of ``layers``: **scanned** (``scan_layers=True``, the default): one ``layers`` node whose every leaf
has a leading axis of length ``num_hidden_layers`` and which runs under ``nnx.scan`` (compiled once, whatever the
depth); **unrolled**: an ``nnx.List``, so the paths are ``layers/0/...``, ``layers/1/...`` and a Python loop runs
them. ``jaxlora.models.llama.convert_layout`` switches between the two.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.models import kv_cache as caching
from jaxlora.models.attention import attention
from jaxlora.models.kv_cache import KVCache
from jaxlora.models.llama.cache import check
from jaxlora.models.llama.config import LlamaConfig
from jaxlora.models.llama.rope import apply_rotary, rotary_tables
from jaxlora.models.normalization import rms_norm
from jaxlora.models.rematerialization import checkpoint_policy


class RMSNorm(nnx.Module):
    """Root-mean-square norm, in float32 and cast back before the scale, as Hugging Face's ``LlamaRMSNorm``."""

    def __init__(self, size: int, eps: float, dtype: Any):
        self.scale = nnx.Param(jnp.ones((size,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)  # its backward pass keeps x and 1/rms, nothing of x's size more


def _linear(n_in: int, n_out: int, bias: bool, config: LlamaConfig, dtype: Any, rngs: nnx.Rngs) -> nnx.Linear:
    init = nnx.initializers.normal(config.initializer_range)
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, param_dtype=dtype, kernel_init=init, rngs=rngs)


class Attention(nnx.Module):
    """Rotary grouped-query self-attention with separate q/k/v/o projections."""

    def __init__(self, config: LlamaConfig, dtype: Any, rngs: nnx.Rngs):
        width, heads, kv_heads, d = (
            config.hidden_size,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.head_dim,
        )
        self.q_proj = _linear(width, heads * d, config.qkv_bias, config, dtype, rngs)
        self.k_proj = _linear(width, kv_heads * d, config.qkv_bias, config, dtype, rngs)
        self.v_proj = _linear(width, kv_heads * d, config.qkv_bias, config, dtype, rngs)
        self.o_proj = _linear(heads * d, width, config.o_bias, config, dtype, rngs)
        self.shape = (heads, kv_heads, d)

    def __call__(self, x, cos, sin, mask, kv, lengths):
        """Output (b, t, hidden) and, with a layer cache ``kv = (keys, values)``, that cache with x's k/v written at
        each row's length; `mask` is (b, 1, t, keys)."""
        b, t, _ = x.shape
        heads, kv_heads, d = self.shape
        q = apply_rotary(self.q_proj(x).reshape(b, t, heads, d), cos, sin)
        k = apply_rotary(self.k_proj(x).reshape(b, t, kv_heads, d), cos, sin)
        v = self.v_proj(x).reshape(b, t, kv_heads, d)
        if kv is not None:
            k, v = caching.write(kv[0], k, lengths), caching.write(kv[1], v, lengths)
            kv = (k, v)
        out = attention(q, k, v, mask)  # grouped-query; the backward pass keeps only the weights
        return self.o_proj(out.reshape(b, t, heads * d)), kv


class MLP(nnx.Module):
    """SwiGLU feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: LlamaConfig, dtype: Any, rngs: nnx.Rngs):
        width, inner, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = _linear(width, inner, bias, config, dtype, rngs)
        self.up_proj = _linear(width, inner, bias, config, dtype, rngs)
        self.down_proj = _linear(inner, width, bias, config, dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: LlamaConfig, dtype: Any, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype, rngs)

    def __call__(self, x, cos, sin, mask, kv, lengths):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, lengths)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


def _stacked_layers(config: LlamaConfig, dtype: Any, rngs: nnx.Rngs) -> DecoderLayer:
    """One DecoderLayer whose every parameter has a leading axis of `num_hidden_layers` (independently drawn)."""

    @nnx.split_rngs(splits=config.num_hidden_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs: nnx.Rngs) -> DecoderLayer:
        return DecoderLayer(config, dtype, rngs)

    return make(rngs)


def _call_layer(layer, x, cos, sin, mask, kv, lengths):
    return layer(x, cos, sin, mask, kv, lengths)


def _layer_fn(remat: str | Callable[..., bool] | None, scanned: bool) -> Callable:
    """A block's call, rematerialised in the backward pass under `remat`'s policy (or not, for None)."""
    if remat is None:
        return _call_layer
    return nnx.remat(_call_layer, policy=checkpoint_policy(remat), prevent_cse=not scanned)  # a scan keeps XLA from CSE


def _scan_layers(remat, layer, x, cos, sin, mask, kv, lengths):
    scan = nnx.scan(_layer_fn(remat, True), in_axes=(0, nnx.Carry, None, None, None, 0, None), out_axes=(nnx.Carry, 0))
    return scan(layer, x, cos, sin, mask, kv, lengths)


class Llama(nnx.Module):
    """Llama / Qwen2 causal language model (``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` in transformers).

    Args:
        config: the hyperparameters (:class:`LlamaConfig`, e.g. from ``config_from_hf``).
        scan_layers: stack the blocks on a leading axis and run them with ``nnx.scan`` (default), or keep an
            ``nnx.List`` of blocks run one after another (the layout that jaxlora's PEFT name map addresses).
        dtype: weight and activation dtype, ``jnp.float32`` or ``jnp.bfloat16``; norms and softmax run in float32.
        remat: rematerialise each decoder block in the backward pass: a policy name from ``REMAT_POLICIES``
            (``"nothing_saveable"`` keeps only each block's input and recomputes the rest, about one more forward
            pass; ``"dots_with_no_batch_dims_saveable"`` also keeps the projections' outputs and recomputes the
            element-wise work), a ``jax.checkpoint_policies`` callable, or None (default) to keep every residual.
            The forward pass and its gradients are unchanged; the step trades compute for activation memory. It
            pays off in the scanned layout: unrolled, XLA:CPU was measured to schedule the recomputation early and
            save nothing.
        rngs: initialisation randomness (normal(initializer_range) linears and embedding, unit norm scales).

    Example:
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                   num_attention_heads=4, num_key_value_heads=2)
        >>> model = Llama(cfg, rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((1, 5), jnp.int32)).shape
        (1, 5, 64)
    """

    def __init__(
        self,
        config: LlamaConfig,
        *,
        scan_layers: bool = True,
        dtype: Any = jnp.float32,
        remat: str | Callable[..., bool] | None = None,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.normal(config.initializer_range)
        checkpoint_policy(remat)  # refuse an unknown name now, not at the first call
        self.config = config
        self.scan_layers = scan_layers
        self.remat = remat
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype, embedding_init=init, rngs=rngs
        )
        if scan_layers:
            self.layers = _stacked_layers(config, dtype, rngs)
        else:
            self.layers = nnx.List([DecoderLayer(config, dtype, rngs) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        if not config.tie_word_embeddings:
            self.lm_head = _linear(config.hidden_size, config.vocab_size, False, config, dtype, rngs)

    @property
    def dtype(self) -> Any:
        return self.embed_tokens.embedding.dtype

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *, kv_cache: KVCache | None = None
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Next-token logits (batch, length, vocab) for `input_ids` (batch, length); with `kv_cache`, also the cache.

        With `kv_cache` (a :class:`jaxlora.models.kv_cache.KVCache` from :func:`jaxlora.models.llama.init_cache`)
        the tokens are the next `length` tokens of each row: row ``b``'s go at positions (and cache slots)
        ``kv_cache.lengths[b]`` onwards, they attend to the row's cached tokens and to each other causally, with
        row-local rotary positions, and the call returns ``(logits, new_cache)`` with every row's length moved on
        by `length`. Feed a prompt first, then one token at a time; prompts of different lengths go right-padded,
        then :func:`jaxlora.models.decoding.prefilled` sets each row's length to its real tokens (``generate`` does
        this for left-padded prompts). Being the module's call, it is what ``jaxlora.apply_nnx`` and
        ``jaxlora.apply_bank_nnx`` run, so adapters serve cached decoding too.

        Args:
            input_ids: (batch, length) integer tokens.
            attention_mask: without a cache, (batch, length), 1 for real tokens and 0 for padding (left or
                right), hiding the padded keys; None for none.
            kv_cache: a cache with `batch` rows, or None for the plain (uncached) forward.

        Returns:
            The logits; with `kv_cache`, ``(logits, new_cache)``.

        Raises:
            ValueError: non-integer or non-2-D ids; with `kv_cache`, an attention_mask too, a cache of other
                shapes, or `length` larger than its max_length (that ``lengths + length`` fits is the caller's to
                keep: it cannot be checked under jit).
        """
        input_ids = _check_ids(input_ids)
        b, t = input_ids.shape
        if kv_cache is not None:
            if attention_mask is not None:
                raise ValueError(
                    "With kv_cache, each row attends to the tokens its cache holds (kv_cache.lengths), so there is "
                    "no padding to mask: drop attention_mask (generate right-aligns left-padded prompts itself)."
                )
            check(self.config, kv_cache, input_ids.shape)
            positions, mask = caching.positions(kv_cache, t), caching.attention_mask(kv_cache, t)
            kv = (kv_cache.keys, kv_cache.values)
            logits, (keys, values) = self._run(input_ids, positions, mask, kv, kv_cache.lengths)
            return logits, caching.advance(kv_cache.replace(keys=keys, values=values), t)
        keys_valid = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
        mask = (jnp.tril(jnp.ones((t, t), bool))[None] & keys_valid[:, None, :])[:, None]
        logits, _ = self._run(input_ids, jnp.arange(t)[None].repeat(b, 0), mask, None, None)
        return logits

    def decode(self, input_ids: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """``self(input_ids, kv_cache=cache)``: the logits of `input_ids` appended to the cache, and the new cache.

        Args:
            input_ids: (batch, t) integer tokens.
            cache: a cache from :func:`jaxlora.models.llama.init_cache` with `batch` rows.

        Returns:
            ``(logits, cache)``, see ``__call__``.
        """
        return self(input_ids, kv_cache=cache)

    def _run(self, input_ids, positions, mask, kv, lengths):
        x = self.embed_tokens(input_ids)
        cos, sin = rotary_tables(self.config, positions)
        if self.scan_layers:
            x, kv = _scan_layers(self.remat, self.layers, x, cos, sin, mask, kv, lengths)
        else:
            new_kv, call = [], _layer_fn(self.remat, False)
            for i, layer in enumerate(self.layers):
                x, layer_kv = call(layer, x, cos, sin, mask, None if kv is None else (kv[0][i], kv[1][i]), lengths)
                new_kv.append(layer_kv)
            kv = None if kv is None else tuple(jnp.stack(parts) for parts in zip(*new_kv, strict=True))
        x = self.norm(x)
        logits = self.embed_tokens.attend(x) if self.config.tie_word_embeddings else self.lm_head(x)
        return logits, kv


def _check_ids(input_ids: Any) -> jax.Array:
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(
            f"input_ids must be an integer array of shape (batch, length), got {input_ids.dtype} {input_ids.shape}; "
            "add a batch axis with ids[None]."
        )
    return input_ids
