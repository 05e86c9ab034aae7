"""One decoding loop for every model family: a prefill, then one token per step in a compiled ``lax.scan``.

A family supplies two functions, `prefill() -> (logits, state)` (the prompt run into its KV cache) and
`step(state, token) -> (logits, state)` (one token per row appended); :func:`decode` picks each next token from the
last logits (greedy, or sampled with temperature, top-k and top-p), fills a row with `pad_token_id` once it has
emitted a stop token, and returns the new tokens. :func:`prompt_batch` and :func:`check_settings` are the input
checks both families' ``generate`` share, so that the same mistake gets the same message.

Both families' caches are a :class:`jaxlora.models.kv_cache.KVCache`, whose rows hold their tokens from slot 0
on: :func:`right_align` moves left-padded prompts there, and :func:`prefilled` turns the prefill of that block
into what :func:`decode` continues from (each row's logits at its last real token, its length its real length),
so each row decodes as it would alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.models.kv_cache import KVCache
from jaxlora.models.sampling import sample_token

__all__ = ["check_settings", "decode", "prefilled", "prompt_batch", "right_align", "stop_tokens", "traced_settings"]


def prompt_batch(input_ids: Any, attention_mask: Any = None) -> tuple[np.ndarray, np.ndarray, bool]:
    """The prompts as a (batch, length) integer array, their left-padding mask, and whether the input was 1-D.

    Args:
      input_ids: (batch, length) or (length,) integer token ids.
      attention_mask: the same shape, 1 on real tokens and 0 on a leading run of padding; None for no padding.

    Returns:
      ``(ids, mask, squeeze)``: ids and a bool mask of shape (batch, length), and True for a 1-D input.

    Raises:
      ValueError: an empty or non-integer prompt, a mask of another shape, or padding that is not on the left.

    Example:
      >>> ids, mask, squeeze = prompt_batch([[0, 5, 6]], [[0, 1, 1]])
      >>> ids.shape, mask.tolist(), squeeze
      ((1, 3), [[False, True, True]], False)
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
            "per row: pad batched prompts on the left (see jaxlora.models.gpt2.left_pad)."
        )
    return ids, mask, squeeze


def right_align(ids: np.ndarray, mask: np.ndarray, fill: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts with each row's real tokens moved to its start, as a KV cache holds them.

    Args:
      ids: (batch, length) token ids, left-padded (from :func:`prompt_batch`).
      mask: (batch, length) bool, True on the real tokens (a trailing run per row).
      fill: the id written after each row's real tokens (never attended to by the tokens before it; pick one in
        the vocabulary, since an id outside it embeds as NaN).

    Returns:
      ``(ids, lengths)``: the (batch, length) right-padded ids and the int32 (batch,) real tokens per row.

    Example:
      >>> ids, lengths = right_align(np.array([[0, 0, 5], [6, 7, 8]]), np.array([[0, 0, 1], [1, 1, 1]], bool))
      >>> ids.tolist(), lengths.tolist()
      ([[5, 0, 0], [6, 7, 8]], [1, 3])
    """
    lengths = mask.sum(axis=1).astype(np.int32)
    width = ids.shape[1]
    slots = np.arange(width)[None]
    source = (slots + (width - lengths)[:, None]) % width  # slot s of a row takes its token at s + padding
    return np.where(slots < lengths[:, None], np.take_along_axis(ids, source, axis=1), fill), lengths


def prefilled(logits: jax.Array, cache: KVCache, lengths: jax.Array) -> tuple[jax.Array, KVCache]:
    """The prefill of right-aligned prompts as :func:`decode` continues from it.

    The model ran the whole (batch, length) block into the cache, padding included; each row's first new token
    comes from the logits at its last real token, and it holds only its real tokens, so its next token is written
    over its padding.

    Args:
      logits: (batch, length, vocab) of the prefill.
      cache: the cache after the prefill (every row's length moved on by ``length``).
      lengths: int32 (batch,) real tokens per row (from :func:`right_align`).

    Returns:
      ``(logits, cache)``: (batch, 1, vocab) at each row's last real token, and the cache with ``lengths`` as its
      rows' lengths.

    Example:
      >>> from jaxlora.models.kv_cache import init_cache
      >>> logits = jnp.arange(6.0).reshape(2, 3, 1)
      >>> last, cache = prefilled(logits, init_cache(1, 2, 4, 1, 1), jnp.array([1, 3]))
      >>> last[:, 0, 0].tolist(), cache.lengths.tolist()
      ([0.0, 5.0], [1, 3])
    """
    lengths = jnp.asarray(lengths, jnp.int32)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)
    return last, cache.replace(lengths=lengths)


def check_settings(
    max_new_tokens: Any, sampled: bool, temperature: float, top_k: Any, top_p: Any, vocab_size: int
) -> None:
    """Refuses decoding settings that have no meaning, naming the setting and its valid range.

    Args:
      max_new_tokens: tokens to generate (an integer >= 0).
      sampled: whether tokens are sampled (temperature, top_k and top_p only matter then).
      temperature: > 0 when sampling.
      top_k: None, or an integer in 1..vocab_size.
      top_p: None, or a float in (0, 1].
      vocab_size: the model's vocabulary size.

    Returns:
      None.

    Example:
      >>> check_settings(4, sampled=True, temperature=0.7, top_k=40, top_p=0.9, vocab_size=100)
    """
    if not isinstance(max_new_tokens, int | np.integer) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}.")
    if sampled and not temperature > 0:
        raise ValueError(f"temperature must be > 0 to sample, got {temperature!r}; for greedy decoding pass no rng.")
    if top_k is not None and not (isinstance(top_k, int | np.integer) and 1 <= top_k <= vocab_size):
        raise ValueError(f"top_k must be an integer in 1..vocab_size={vocab_size} or None, got {top_k!r}.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}.")


def traced_settings(
    rng: jax.Array | None, temperature: float, top_k: int | None, top_p: float | None, pad_token_id: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """The sampling settings as arrays for a jitted :func:`decode`, so that other values reuse its program.

    Args:
      rng: a ``jax.random.key``, or None (greedy: a fixed key, never used).
      temperature: the sampling temperature.
      top_k: None for every token (0).
      top_p: None for every token (1.0).
      pad_token_id: what a row holds after its stop token.

    Returns:
      ``(key, temperature, top_k, top_p, pad_token_id)``: a key, float32, int32, float32 and int32 scalars.

    Example:
      >>> key, temperature, top_k, top_p, pad = traced_settings(None, 1.0, None, 0.9, 0)
      >>> int(top_k), float(top_p)
      (0, 0.8999999761581421)
    """
    key = jax.random.key(0) if rng is None else rng
    top_p = 1.0 if top_p is None else top_p
    return key, jnp.float32(temperature), jnp.int32(top_k or 0), jnp.float32(top_p), jnp.int32(pad_token_id)


def stop_tokens(eos_token_id: int | tuple[int, ...] | None) -> tuple[int, ...]:
    """`eos_token_id` (one id, several, or None) as the static tuple :func:`decode` takes.

    Args:
      eos_token_id: the stop token(s), or None for none.

    Returns:
      A tuple of Python ints (empty for None).

    Example:
      >>> stop_tokens(None), stop_tokens(7), stop_tokens([7, 9])
      ((), (7,), (7, 9))
    """
    return () if eos_token_id is None else tuple(int(t) for t in np.atleast_1d(eos_token_id))


def decode(
    prefill: Callable[[], tuple[jax.Array, Any]],
    step: Callable[[Any, jax.Array], tuple[jax.Array, Any]],
    *,
    max_new_tokens: int,
    key: jax.Array,
    greedy: bool,
    temperature: jax.Array | float = 1.0,
    top_k: jax.Array | int = 0,
    top_p: jax.Array | float = 1.0,
    eos: tuple[int, ...] = (),
    pad_token_id: jax.Array | int = 0,
    return_logits: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """The new tokens of a batch: the prompt's prefill, then ``max_new_tokens - 1`` single-token steps.

    Call it inside ``jax.jit`` (the step loop is a ``lax.scan``: one compiled program whatever the tokens). The
    token after step ``i``'s logits is the argmax when `greedy`, else drawn by :func:`sample_token` with the key
    ``fold_in(key, i)``, so the same key gives the same tokens. A row that has emitted a token of `eos` gets
    `pad_token_id` from then on.

    Args:
      prefill: ``() -> (logits (batch, length, vocab), state)``, the prompt run into the model's cache.
      step: ``(state, token (batch,)) -> (logits (batch, 1, vocab), state)``, one token per row appended.
      max_new_tokens: how many tokens to return per row (>= 1; a static Python int).
      key: a ``jax.random.key`` (unused when greedy).
      greedy: argmax decoding (static).
      temperature, top_k, top_p: sampling controls (0 and 1.0 keep every token); may be traced values.
      eos: stop tokens (static); empty for none.
      pad_token_id: what a row holds after its stop token.
      return_logits: also return the (float32) logits each new token was chosen from.

    Returns:
      ``(tokens, logits)``: int32 (batch, max_new_tokens), and (batch, max_new_tokens, vocab) or None.

    Example:
      >>> bias = jnp.array([0.0, 1.0, 0.0])  # a "model" that always prefers token 1
      >>> prefill = lambda: (jnp.zeros((2, 3, 3)) + bias, None)
      >>> step = lambda state, token: (jnp.zeros((2, 1, 3)) + bias, state)
      >>> decode(prefill, step, max_new_tokens=3, key=jax.random.key(0), greedy=True)[0].tolist()
      [[1, 1, 1], [1, 1, 1]]
    """
    logits, state = prefill()
    batch = logits.shape[0]

    def pick(i: jax.Array, last: jax.Array, done: jax.Array) -> tuple[jax.Array, jax.Array]:
        if greedy:
            token = jnp.argmax(last, axis=-1).astype(jnp.int32)
        else:
            token = sample_token(jax.random.fold_in(key, i), last, temperature, top_k, top_p)
        token = jnp.where(done, jnp.int32(pad_token_id), token)
        return token, (done | jnp.isin(token, jnp.asarray(eos, jnp.int32))) if eos else done

    def body(carry, i):
        state, last, done = carry
        token, done = pick(i, last, done)
        logits, state = step(state, token)
        return (state, logits[:, -1].astype(jnp.float32), done), (token, last if return_logits else None)

    last = logits[:, -1].astype(jnp.float32)
    carry = (state, last, jnp.zeros((batch,), bool))
    (_, last, done), (tokens, seen) = jax.lax.scan(body, carry, jnp.arange(max_new_tokens - 1))
    final, _ = pick(jnp.int32(max_new_tokens - 1), last, done)
    tokens = jnp.concatenate([tokens.T, final[:, None]], axis=1)
    if not return_logits:
        return tokens, None
    return tokens, jnp.concatenate([jnp.moveaxis(seen, 0, 1), last[:, None]], axis=1)
