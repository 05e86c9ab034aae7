"""Generation: greedy without a cache (the reference), and greedy or sampled with the KV cache for any forward
(the plain model, ``jaxlora.apply``, ``jaxlora.apply_bank``), with left-padded prompts."""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.models import decoding
from jaxlora.models.gpt2.cache import init_cache
from jaxlora.models.gpt2.model import GPT2
from jaxlora.models.kv_cache import KVCache

Params = dict[str, Any]


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
      >>> logits.shape, cache.lengths.tolist()
      ((1, 3, 32), [3])
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
    top_p: float | None = None,
    eos_token_id: int | tuple[int, ...] | None = None,
    pad_token_id: int = 50256,
    forward: Any = apply_model,
    cache_dtype: Any = jnp.float32,
    return_logits: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The prompts followed by `max_new_tokens` generated tokens, decoded incrementally with a KV cache.

    The prompt runs once into the cache (prefill), then one token per step inside a ``lax.scan``
    (:func:`jaxlora.models.decoding.decode`, the loop Llama's ``generate`` uses too): one compiled program per
    (batch, prompt length, max_new_tokens, forward), whatever the tokens, adapters, key or sampling settings.
    Greedy (argmax) without `rng`; with `rng`, sampled by ``jaxlora.models.sample_token`` with a key folded per
    step, so the same key gives the same tokens. Rows of different prompt lengths are left-padded
    (:func:`left_pad`); inside, each row's real tokens are moved to the start of its row of the KV cache
    (:class:`jaxlora.models.kv_cache.KVCache`, one length per row), so its positions start at 0, the padding is
    never attended to, and a row decodes as it would alone. After a row emits one of `eos_token_id` it is filled
    with `pad_token_id`, as transformers does.

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
      max_new_tokens: tokens to append (>= 0); prompt + new tokens must fit ``n_positions``.
      attention_mask: (batch, length), 1 on real tokens, for left-padded prompts (the last column all 1).
      rng: a ``jax.random.key`` to sample; None for greedy decoding.
      temperature: sampling temperature (> 0; ignored when greedy).
      top_k: sample among the k most likely tokens (None: all; ignored when greedy).
      top_p: sample among the smallest set of most likely tokens whose probability reaches it (None: all).
      eos_token_id: stop token(s); None for none.
      pad_token_id: what a row holds after its stop token (GPT-2's <|endoftext|> by default).
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
    ids, mask, squeeze = decoding.prompt_batch(input_ids, attention_mask)
    decoding.check_settings(max_new_tokens, rng is not None, temperature, top_k, top_p, model.config.vocab_size)
    if ids.shape[1] + max_new_tokens > model.config.n_positions:
        raise ValueError(
            f"prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds n_positions="
            f"{model.config.n_positions}; shorten the prompt or generate fewer tokens."
        )
    if max_new_tokens == 0:
        tokens = jnp.zeros((ids.shape[0], 0), jnp.int32)
        logits = jnp.zeros((ids.shape[0], 0, model.config.vocab_size), jnp.float32)
    else:
        aligned, lengths = decoding.right_align(ids, mask)  # fill 0: an id outside the vocabulary embeds as NaN
        tokens, logits = _decode(
            model, forward, params, jnp.asarray(aligned, jnp.int32), jnp.asarray(lengths),
            *decoding.traced_settings(rng, temperature, top_k, top_p, pad_token_id),
            max_new_tokens=int(max_new_tokens), greedy=rng is None, eos=decoding.stop_tokens(eos_token_id),
            cache_dtype=jnp.dtype(cache_dtype), return_logits=return_logits,
        )  # fmt: skip
    out = jnp.concatenate([jnp.asarray(ids, jnp.int32), tokens], axis=1)
    out = out[0] if squeeze else out
    if return_logits:
        return out, logits[0] if squeeze else logits
    return out


@partial(
    jax.jit,
    static_argnames=("model", "forward", "max_new_tokens", "greedy", "eos", "cache_dtype", "return_logits"),
)
def _decode(model, forward, params, ids, lengths, key, temperature, top_k, top_p, pad, *, max_new_tokens, greedy, eos,
            cache_dtype, return_logits):  # fmt: skip
    """The new tokens (batch, new) and, with `return_logits`, their logits, for right-aligned prompts `ids` of
    `lengths` real tokens."""
    batch, length = ids.shape
    cache = init_cache(model.config, batch, length + max_new_tokens, cache_dtype)
    return decoding.decode(
        lambda: decoding.prefilled(*forward(model, params, ids, cache), lengths),
        lambda cache, token: forward(model, params, token[:, None], cache),
        max_new_tokens=max_new_tokens, key=key, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
        eos=eos, pad_token_id=pad, return_logits=return_logits,
    )  # fmt: skip
