"""The one KV cache of both model families (`jaxlora.models.kv_cache`): rows hold their own tokens from slot 0.

The pieces are checked against plain numpy formulas; the continuous-batching operations (`insert_row`,
`reset_row`) against the uncached GPT-2 (`generate_greedy`, itself checked against Hugging Face in test_gpt2.py)
run on each prompt alone.
"""

from __future__ import annotations

import doctest
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.models import decoding, gpt2, kv_cache, llama
from jaxlora.models.gpt2 import GPT2, GPT2Config, generate_greedy

VOCAB = 97
CONFIG = GPT2Config(
    vocab_size=VOCAB, n_positions=48, n_embd=32, n_layer=2, n_head=2, dropout=0.0, initializer_range=0.3
)
MAX_LENGTH = 32


def _cache(lengths, max_length=8, layers=2, kv_heads=2, head_dim=3):
    lengths = jnp.asarray(lengths, jnp.int32)
    return kv_cache.advance(kv_cache.init_cache(layers, len(lengths), max_length, kv_heads, head_dim), lengths)


def _prompt(n, seed):
    return np.random.default_rng(seed).integers(0, VOCAB, (n,)).astype(np.int32)


@pytest.mark.parametrize("length", [1, 3])
def test_positions_and_mask_follow_the_row_local_formula(length):
    """New token i of row b sits at position lengths[b] + i and sees slot s iff s <= that position."""
    lengths = np.array([0, 2, 5])
    cache = _cache(lengths)
    want_positions = lengths[:, None] + np.arange(length)[None]
    np.testing.assert_array_equal(kv_cache.positions(cache, length), want_positions)
    want_mask = np.zeros((3, 1, length, 8), bool)
    for b in range(3):
        for i in range(length):
            for s in range(8):
                want_mask[b, 0, i, s] = s <= lengths[b] + i
    np.testing.assert_array_equal(kv_cache.attention_mask(cache, length), want_mask)


def test_write_puts_each_rows_tokens_at_its_own_length_and_nothing_else():
    lengths = np.array([0, 2, 5])
    layer = np.random.default_rng(0).normal(size=(3, 8, 2, 3)).astype(np.float32)
    new = np.random.default_rng(1).normal(size=(3, 3, 2, 3)).astype(np.float32)
    want = layer.copy()
    for b in range(3):
        want[b, lengths[b] : lengths[b] + 3] = new[b]
    np.testing.assert_array_equal(kv_cache.write(jnp.asarray(layer), jnp.asarray(new), jnp.asarray(lengths)), want)


def test_advance_insert_row_and_reset_row_touch_only_what_they_name():
    cache = _cache([1, 2, 3])
    assert kv_cache.advance(cache, 2).lengths.tolist() == [3, 4, 5]
    assert kv_cache.advance(cache, jnp.array([0, 1, -2])).lengths.tolist() == [1, 3, 1]
    assert kv_cache.reset_row(cache, 1).lengths.tolist() == [1, 0, 3]
    other = kv_cache.KVCache(jnp.ones((2, 1, 8, 2, 3)), 2 * jnp.ones((2, 1, 8, 2, 3)), jnp.array([6], jnp.int32))
    insert = jax.jit(kv_cache.insert_row)
    for row in range(3):  # a traced row: one program for all of them
        out = insert(cache, row, other)
        others = [r for r in range(3) if r != row]
        assert out.lengths.tolist() == [6 if r == row else r + 1 for r in range(3)]
        np.testing.assert_array_equal(out.keys[:, row], other.keys[:, 0])
        np.testing.assert_array_equal(out.values[:, row], other.values[:, 0])
        np.testing.assert_array_equal(out.keys[:, others], cache.keys[:, others])
    assert insert._cache_size() == 1
    with pytest.raises(ValueError, match="one row of the same layers"):
        kv_cache.insert_row(cache, 0, _cache([1, 1]))


def test_right_align_moves_each_rows_real_tokens_to_its_start():
    rng = np.random.default_rng(2)
    ids, lengths = rng.integers(1, 50, (4, 6)), np.array([6, 1, 3, 4])
    mask = np.arange(6)[None] >= 6 - lengths[:, None]
    got, got_lengths = decoding.right_align(ids, mask, fill=0)
    for b in range(4):
        np.testing.assert_array_equal(got[b], np.concatenate([ids[b, 6 - lengths[b] :], np.zeros(6 - lengths[b])]))
    assert got_lengths.tolist() == lengths.tolist()


def test_bad_caches_are_named():
    cache = _cache([0, 0])
    with pytest.raises(TypeError, match=r"must be a jaxlora\.models\.kv_cache\.KVCache"):
        kv_cache.check_cache((cache.keys, cache.values), 2, 1, 2, 2, 3)
    with pytest.raises(ValueError, match=r"expected \(2, 3, 8, 2, 3\) and \(3,\)"):
        kv_cache.check_cache(cache, 3, 1, 2, 2, 3)
    with pytest.raises(ValueError, match="too few for 9 new tokens"):
        kv_cache.check_cache(cache, 2, 9, 2, 2, 3)
    with pytest.raises(ValueError, match="head_dim=0 must be an integer >= 1"):
        kv_cache.init_cache(1, 1, 1, 1, 0)


@pytest.fixture(scope="module")
def base():
    model = GPT2(CONFIG)
    return model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]


def _alone(model, params, prompt, n):
    """The first n greedy tokens of `prompt` run alone by the uncached model (one buffer length: one compile)."""
    return np.asarray(generate_greedy(model, params, prompt, MAX_LENGTH - len(prompt)))[len(prompt) : len(prompt) + n]


def test_rows_refilled_mid_decode_give_their_prompt_alone_and_leave_the_others_be(base):
    """A continuous-batching loop over one cache: three requests prefilled alone and put in with `insert_row`,
    decoded together; mid-decode row 1 gets a new request by `insert_row` and row 2 one by `reset_row` followed by
    its prompt fed a token per step beside the others' decoding. Every request's tokens equal its prompt run
    alone through the uncached model, and row 0 never notices."""
    model, params = base
    step = jax.jit(lambda params, cache, tokens: model.apply({"params": params}, tokens[:, None], kv_cache=cache))
    empty = gpt2.init_cache(CONFIG, 1, MAX_LENGTH)
    prefill = jax.jit(lambda params, ids: model.apply({"params": params}, ids, kv_cache=empty))
    insert, reset = jax.jit(kv_cache.insert_row), jax.jit(kv_cache.reset_row)
    first = [_prompt(5, 0), _prompt(2, 1), _prompt(7, 2)]
    refill_1, refill_2 = _prompt(6, 3), _prompt(4, 4)

    cache, nxt = gpt2.init_cache(CONFIG, 3, MAX_LENGTH), np.zeros(3, np.int32)
    for row, prompt in enumerate(first):
        logits, one = prefill(params, prompt[None])
        cache, nxt[row] = insert(cache, row, one), np.argmax(logits[0, -1])
    out = {0: [], (1, "first"): [], (2, "first"): [], (1, "refill"): [], (2, "refill"): []}
    for _ in range(4):
        out[0].append(nxt[0]), out[1, "first"].append(nxt[1]), out[2, "first"].append(nxt[2])
        logits, cache = step(params, cache, jnp.asarray(nxt))
        nxt = np.argmax(np.asarray(logits[:, -1]), axis=-1).astype(np.int32)

    logits, one = prefill(params, refill_1[None])
    cache, nxt[1] = insert(cache, 1, one), np.argmax(logits[0, -1])
    cache, feed = reset(cache, 2), list(refill_2)
    for _ in range(10):
        fed = nxt.copy()
        if feed:
            fed[2] = feed.pop(0)
        else:
            out[2, "refill"].append(nxt[2])
        out[0].append(nxt[0]), out[1, "refill"].append(nxt[1])
        logits, cache = step(params, cache, jnp.asarray(fed))
        nxt = np.argmax(np.asarray(logits[:, -1]), axis=-1).astype(np.int32)

    assert cache.lengths.tolist() == [5 + 14, 6 + 10, 4 + 6]
    want = {
        0: _alone(model, params, first[0], 14),
        (1, "first"): _alone(model, params, first[1], 4),
        (2, "first"): _alone(model, params, first[2], 4),
        (1, "refill"): _alone(model, params, refill_1, 10),
        (2, "refill"): _alone(model, params, refill_2, 6),
    }
    for key, tokens in want.items():
        np.testing.assert_array_equal(out[key], tokens, err_msg=str(key))
    assert len(set(want[0].tolist())) > 2, "degenerate reference: pick other prompts"


def test_the_modules_functions_document_args_and_their_examples_run():
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for name in kv_cache.__all__:
        function = getattr(kv_cache, name)
        doc = function.__doc__ or ""
        assert ">>>" in doc, name
        assert isinstance(function, type) or ("Args:" in doc and "Returns:" in doc), name
        for test in finder.find(function, name, globs=vars(kv_cache)):
            runner.run(test)
    for function in (gpt2.init_cache, llama.init_cache):  # the families' wrappers
        for test in finder.find(function, function.__name__, globs=vars(sys.modules[function.__module__])):
            runner.run(test)
    assert runner.failures == 0 and runner.tries >= 20, (runner.failures, runner.tries)
