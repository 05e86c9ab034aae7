"""Greedy and sampled generation with a KV cache, compiled once per (batch, prompt length, new tokens)."""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.models.llama.cache import init_cache
from jaxlora.models.llama.model import Llama
from jaxlora.models.sampling import sample_token


def generate(
    model: Llama,
    input_ids: Any,
    max_new_tokens: int,
    *,
    attention_mask: Any = None,
    rng: jax.Array | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | tuple[int, ...] | None = None,
    pad_token_id: int = 0,
) -> jax.Array:
    """The prompts followed by `max_new_tokens` generated tokens, shape (batch, length + max_new_tokens).

    The prompt is run once into a KV cache (see ``Llama.decode``), then one token per step inside a
    ``lax.scan``. Greedy (argmax) without `rng`; with `rng`, sampled from softmax(logits / temperature),
    optionally restricted to the `top_k` most likely tokens and to the smallest set whose probability reaches
    `top_p`. After a row emits one of `eos_token_id` it is filled with `pad_token_id`, as transformers does.

    Args:
        model: a :class:`Llama` (either layout, any dtype).
        input_ids: (batch, length) or (length,) integer prompt(s); batched prompts of different lengths are
            left-padded, with `attention_mask` 0 on the padding.
        max_new_tokens: number of tokens to append (>= 0).
        attention_mask: (batch, length), 1 = real token; the last column must be all 1 (left padding).
        rng: a ``jax.random.key`` for sampling; None for greedy decoding.
        temperature, top_k, top_p: sampling controls (ignored when greedy).
        eos_token_id, pad_token_id: end-of-sequence id(s) and the filler after them.

    Returns:
        int32 tokens; 1-D when `input_ids` was.

    Raises:
        ValueError: an empty or non-integer prompt, right padding, or bad sampling settings.

    Example:
        >>> from jaxlora.models.llama import LlamaConfig
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                   num_attention_heads=4, num_key_value_heads=2)
        >>> generate(Llama(cfg, rngs=nnx.Rngs(0)), [5, 6, 7], max_new_tokens=4).shape
        (7,)
    """
    ids = np.asarray(input_ids)
    squeeze = ids.ndim == 1
    ids = ids[None] if squeeze else ids
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be a non-empty integer (batch, length) or (length,) array, got {ids.shape}.")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask, bool)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}; they must be equal.")
    if not mask[:, -1].all():
        raise ValueError("attention_mask is 0 in the last prompt column: pad batched prompts on the left.")
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    eos = () if eos_token_id is None else tuple(np.atleast_1d(eos_token_id).tolist())
    graphdef, state = nnx.split(model)
    key = jax.random.key(0) if rng is None else rng
    out = _generate(
        graphdef, state, jnp.asarray(ids, jnp.int32), jnp.asarray(mask), key, jnp.float32(temperature),
        jnp.int32(top_k or 0), jnp.float32(1.0 if top_p is None else top_p), jnp.int32(pad_token_id),
        max_new_tokens=max_new_tokens, greedy=rng is None, eos=eos,
    )  # fmt: skip
    return out[0] if squeeze else out


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}; for greedy decoding pass no rng.")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}.")


@partial(jax.jit, static_argnums=(0,), static_argnames=("max_new_tokens", "greedy", "eos"))
def _generate(graphdef, state, ids, mask, key, temperature, top_k, top_p, pad, *, max_new_tokens, greedy, eos):
    model = nnx.merge(graphdef, state)
    batch, length = ids.shape
    cache = init_cache(model.config, batch, length + max_new_tokens, model.dtype)
    logits, cache = model.decode(ids, cache, mask)

    def step(carry, step_key):
        cache, last, done = carry
        last = last.astype(jnp.float32)
        token = jnp.argmax(last, axis=-1) if greedy else sample_token(step_key, last, temperature, top_k, top_p)
        token = jnp.where(done, pad, token).astype(jnp.int32)
        done = done | jnp.isin(token, jnp.asarray(eos, jnp.int32)) if eos else done
        # A module made at this trace level: NNX transforms refuse modules from an outer trace.
        logits, cache = nnx.merge(graphdef, state, copy=True).decode(token[:, None], cache)
        return (cache, logits[:, -1], done), token

    carry = (cache, logits[:, -1], jnp.zeros((batch,), bool))
    _, tokens = jax.lax.scan(step, carry, jax.random.split(key, max_new_tokens))
    return jnp.concatenate([ids, tokens.T.reshape(batch, max_new_tokens)], axis=1)
