"""Greedy and sampled generation with a KV cache for any forward (the plain model, ``jaxlora.apply_nnx``,
``jaxlora.apply_bank_nnx``), compiled once per (batch, prompt length, new tokens, forward)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.models import decoding
from jaxlora.models.kv_cache import KVCache
from jaxlora.models.llama.cache import init_cache
from jaxlora.models.llama.model import Llama


def call_model(model: Llama, state: Any, input_ids: jax.Array, kv_cache: KVCache) -> tuple[jax.Array, KVCache]:
    """The default `forward` of :func:`generate`: the plain model, ``model(input_ids, kv_cache=kv_cache)``.

    Args:
      model: the Llama.
      state: unused (the plain model needs nothing besides itself).
      input_ids: (batch, length) tokens to append to the cache.
      kv_cache: the cache.

    Returns:
      ``(logits, new_cache)``.

    Example:
      >>> from jaxlora.models.llama import LlamaConfig, init_cache
      >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
      ...                   num_attention_heads=4, num_key_value_heads=2)
      >>> model = Llama(cfg, rngs=nnx.Rngs(0))
      >>> logits, cache = call_model(model, None, jnp.ones((1, 3), jnp.int32), init_cache(cfg, 1, 8))
      >>> logits.shape, cache.lengths.tolist()
      ((1, 3, 64), [3])
    """
    return model(input_ids, kv_cache=kv_cache)


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
    forward: Callable[[Llama, Any, jax.Array, KVCache], tuple[jax.Array, KVCache]] = call_model,
    state: Any = None,
) -> jax.Array:
    """The prompts followed by `max_new_tokens` generated tokens, shape (batch, length + max_new_tokens).

    The prompt is run once into a KV cache (see ``Llama.__call__`` with ``kv_cache``; each row's real tokens moved
    to the start of its cache row, so its rotary positions start at 0 and it decodes as it would alone), then one
    token per step inside a ``lax.scan`` (:func:`jaxlora.models.decoding.decode`, the loop GPT-2's ``generate``
    uses too): one compiled program per (batch, prompt length, max_new_tokens, forward), whatever the tokens,
    state, key or sampling settings. Greedy (argmax) without `rng`; with `rng`, sampled from
    softmax(logits / temperature), optionally restricted to the `top_k` most likely tokens and to the smallest set
    whose probability reaches `top_p`, with a key folded per step. After a row emits one of `eos_token_id` it is
    filled with `pad_token_id`, as transformers does.

    `forward(model, state, input_ids, kv_cache) -> (logits, new_cache)` runs the model; the default
    (:func:`call_model`) is the plain model. LoRA adapters, unmerged, or a mixed batch over an adapter bank
    (``plan`` from ``jaxlora.plan(nnx.state(model, nnx.Param), config)``; a plan is no array, so the function
    holds it, not `state`)::

        def lora(model, adapters, ids, cache):
            return jaxlora.apply_nnx(model, adapters, plan, ids, kv_cache=cache)

        def bank(model, state, ids, cache):
            bank, adapter_ids = state
            return jaxlora.apply_bank_nnx(model, bank, adapter_ids, ids, kv_cache=cache)

        tokens = generate(model, ids, 8, attention_mask=mask, forward=lora, state=adapters)
        tokens = generate(model, ids, 8, attention_mask=mask, forward=bank, state=(bank, bank.ids(slots)))

    `forward` is a static argument (compiled per function object): define it once, not anew for every call.
    Inside the decoding loop it gets a fresh copy of `model` at each step (NNX transforms refuse a module made
    outside the trace that runs them); what it changes on that copy is dropped.

    Args:
        model: a :class:`Llama` (either layout, any dtype; the cache takes its dtype).
        input_ids: (batch, length) or (length,) integer prompt(s); batched prompts of different lengths are
            left-padded, with `attention_mask` 0 on the padding.
        max_new_tokens: number of tokens to append (>= 0).
        attention_mask: (batch, length), 1 = real token; the last column must be all 1 (left padding).
        rng: a ``jax.random.key`` for sampling; None for greedy decoding.
        temperature, top_k, top_p: sampling controls (ignored when greedy): temperature > 0, top_k in
            1..vocab_size, top_p in (0, 1].
        eos_token_id, pad_token_id: end-of-sequence id(s) and the filler after them.
        forward: the model call, see above.
        state: what `forward` takes besides the model (adapters, or a bank and one adapter index per row); a
            pytree of arrays, traced, so new values reuse the compiled program. None for the default.

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
    graphdef, weights = nnx.split(model)
    aligned, lengths = decoding.right_align(ids, mask)
    tokens = _generate(
        graphdef, weights, state, jnp.asarray(aligned, jnp.int32), jnp.asarray(lengths),
        *decoding.traced_settings(rng, temperature, top_k, top_p, pad_token_id),
        forward=forward, max_new_tokens=max_new_tokens, greedy=rng is None, eos=decoding.stop_tokens(eos_token_id),
    )  # fmt: skip
    out = jnp.concatenate([jnp.asarray(ids, jnp.int32), tokens], axis=1)
    return out[0] if squeeze else out


@partial(jax.jit, static_argnums=(0,), static_argnames=("forward", "max_new_tokens", "greedy", "eos"))
def _generate(
    graphdef, weights, state, ids, lengths, key, temperature, top_k, top_p, pad, *, forward, max_new_tokens, greedy,
    eos,
):  # fmt: skip
    """The new tokens (batch, max_new_tokens) for right-aligned prompts `ids` of `lengths` real tokens."""
    model = nnx.merge(graphdef, weights)
    batch, length = ids.shape
    cache = init_cache(model.config, batch, length + max_new_tokens, model.dtype)

    def step(cache, token):  # a module made at this trace level: NNX transforms refuse modules from an outer trace
        return forward(nnx.merge(graphdef, weights, copy=True), state, token[:, None], cache)

    tokens, _ = decoding.decode(
        lambda: decoding.prefilled(*forward(model, state, ids, cache), lengths), step, max_new_tokens=max_new_tokens,
        key=key, greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, eos=eos, pad_token_id=pad,
    )  # fmt: skip
    return tokens
