"""Greedy and sampled generation with a KV cache, compiled once per (batch, prompt length, new tokens)."""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.models import decoding
from jaxlora.models.llama.cache import init_cache
from jaxlora.models.llama.model import Llama


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

    The prompt is run once into a KV cache (see ``Llama.decode``; each row's real tokens moved to the start of its
    cache row, so its rotary positions start at 0 and it decodes as it would alone), then one token per step inside
    a ``lax.scan`` (:func:`jaxlora.models.decoding.decode`, the loop GPT-2's ``generate`` uses too). Greedy
    (argmax) without `rng`; with `rng`, sampled from softmax(logits / temperature), optionally restricted to the
    `top_k` most likely tokens and to the smallest set whose probability reaches `top_p`, with a key folded per
    step. After a row emits one of `eos_token_id` it is filled with `pad_token_id`, as transformers does.

    Args:
        model: a :class:`Llama` (either layout, any dtype).
        input_ids: (batch, length) or (length,) integer prompt(s); batched prompts of different lengths are
            left-padded, with `attention_mask` 0 on the padding.
        max_new_tokens: number of tokens to append (>= 0).
        attention_mask: (batch, length), 1 = real token; the last column must be all 1 (left padding).
        rng: a ``jax.random.key`` for sampling; None for greedy decoding.
        temperature, top_k, top_p: sampling controls (ignored when greedy): temperature > 0, top_k in
            1..vocab_size, top_p in (0, 1].
        eos_token_id, pad_token_id: end-of-sequence id(s) and the filler after them.

    Returns:
        int32 tokens; 1-D when `input_ids` was.

    Raises:
        ValueError: an empty or non-integer prompt, padding that is not on the left, or bad sampling settings.

    Example:
        >>> from jaxlora.models.llama import LlamaConfig
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                   num_attention_heads=4, num_key_value_heads=2)
        >>> generate(Llama(cfg, rngs=nnx.Rngs(0)), [5, 6, 7], max_new_tokens=4).shape
        (7,)
    """
    ids, mask, squeeze = decoding.prompt_batch(input_ids, attention_mask)
    decoding.check_settings(max_new_tokens, rng is not None, temperature, top_k, top_p, model.config.vocab_size)
    if max_new_tokens == 0:
        return jnp.asarray(ids[0] if squeeze else ids, jnp.int32)
    graphdef, state = nnx.split(model)
    aligned, lengths = decoding.right_align(ids, mask)
    tokens = _generate(
        graphdef, state, jnp.asarray(aligned, jnp.int32), jnp.asarray(lengths),
        *decoding.traced_settings(rng, temperature, top_k, top_p, pad_token_id),
        max_new_tokens=max_new_tokens, greedy=rng is None, eos=decoding.stop_tokens(eos_token_id),
    )  # fmt: skip
    out = jnp.concatenate([jnp.asarray(ids, jnp.int32), tokens], axis=1)
    return out[0] if squeeze else out


@partial(jax.jit, static_argnums=(0,), static_argnames=("max_new_tokens", "greedy", "eos"))
def _generate(graphdef, state, ids, lengths, key, temperature, top_k, top_p, pad, *, max_new_tokens, greedy, eos):
    """The new tokens (batch, max_new_tokens) for right-aligned prompts `ids` of `lengths` real tokens."""
    model = nnx.merge(graphdef, state)
    batch, length = ids.shape
    cache = init_cache(model.config, batch, length + max_new_tokens, model.dtype)

    def step(cache, token):  # a module made at this trace level: NNX transforms refuse modules from an outer trace
        return nnx.merge(graphdef, state, copy=True).decode(token[:, None], cache)

    tokens, _ = decoding.decode(
        lambda: decoding.prefilled(*model.decode(ids, cache), lengths), step, max_new_tokens=max_new_tokens,
        key=key, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, eos=eos, pad_token_id=pad,
    )  # fmt: skip
    return tokens
