"""GPT-2 incremental decoding with a KV cache: the same tokens and logits as recomputing the whole buffer.

The reference is `generate_greedy` (no cache; itself checked against Hugging Face in test_gpt2.py) and the model's
plain full-sequence forward; adapters are checked against running each row alone with its adapter merged.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora.models import decoding, gpt2
from jaxlora.models.gpt2 import GPT2, GPT2Config, generate, generate_greedy, init_cache, left_pad
from jaxlora.models.sampling import sample_token

VOCAB = 97
CONFIG = GPT2Config(
    vocab_size=VOCAB, n_positions=48, n_embd=32, n_layer=2, n_head=2, dropout=0.0, initializer_range=0.3
)
TARGETS = r"h_\d+/(attn|mlp)/.*/kernel|wte/embedding"


@pytest.fixture(scope="module")
def base():
    model = GPT2(CONFIG)
    return model, jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]  # one compile


@pytest.fixture(scope="module")
def adapter_sets(base):
    """Three (adapters, plan) sets for the base, built once for the tests that use one or all of them."""
    return _adapter_sets(base[1], 3)


def _prompt(shape, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


def _adapter_sets(params, n, rank=4):
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=TARGETS))

    @jax.jit  # one compile for all sets (eagerly, each op compiles on its own)
    def noisy_adapters(key, noise_key):
        _, adapters = jaxlora.init(key, params, plan)
        noise = jax.random.split(noise_key, len(jax.tree.leaves(adapters)))
        leaves = jax.tree.leaves(adapters)
        leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, noise, strict=True)]
        return jax.tree.unflatten(jax.tree.structure(adapters), leaves)

    return [(noisy_adapters(jax.random.key(10 + i), jax.random.key(20 + i)), plan) for i in range(n)]


def lora_forward(model, state, ids, cache):
    params, adapters, plan = state[0], state[1], PLAN_HOLDER["plan"]
    return jaxlora.apply(model, {"params": params}, adapters, plan, ids, kv_cache=cache)


def bank_forward(model, state, ids, cache):
    params, bank, adapter_ids = state
    return jaxlora.apply_bank(model, {"params": params}, bank, adapter_ids, ids, kv_cache=cache)


@partial(jax.jit, static_argnums=0)
def full_forward(model, params, ids):
    """The plain uncached forward, jitted: one compile per shape (eagerly, each of its ops compiles on its own)."""
    return model.apply({"params": params}, ids)


def greedy_alone(model, params, prompt, max_new_tokens, length):
    """`generate_greedy` of a 1-D prompt, run on to `length` tokens in all (>= its length + max_new_tokens).

    Prompts of different lengths then share one buffer shape and so one compile; greedy tokens depend only on
    those before them, so the first max_new_tokens new ones are those of a run of exactly max_new_tokens.
    """
    assert length >= len(prompt) + max_new_tokens
    return generate_greedy(model, params, prompt, length - len(prompt))


PLAN_HOLDER: dict = {}  # lora_forward is static under jit: the plan reaches it here, not as a traced argument


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("prompt_len", [1, 4, 9])
def test_cached_greedy_equals_full_recompute(base, prompt_len, scan_layers):
    model, params = base
    if scan_layers:
        model, params = GPT2(dataclasses.replace(CONFIG, scan_layers=True)), gpt2.stack_layers(params, CONFIG.n_layer)
    prompt = _prompt((3, prompt_len), seed=prompt_len)
    tokens, logits = generate(model, params, prompt, 12, return_logits=True)
    reference = generate_greedy(model, params, prompt, 12)
    np.testing.assert_array_equal(tokens, reference)
    # The logits each token was picked from equal the uncached forward over the finished buffer.
    full = full_forward(model, params, reference)[:, prompt_len - 1 : -1]
    np.testing.assert_allclose(logits, full, rtol=1e-5, atol=2e-5)
    assert logits.shape == (3, 12, VOCAB)


def test_one_prompt_without_batch_axis(base):
    model, params = base
    prompt = _prompt((5,))
    np.testing.assert_array_equal(generate(model, params, prompt, 6), generate_greedy(model, params, prompt, 6))


@pytest.mark.parametrize("scan_layers", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_rows_of_different_prompt_lengths_decode_as_if_alone(base, scan_layers):
    model, params = base
    if scan_layers:
        model, params = GPT2(dataclasses.replace(CONFIG, scan_layers=True)), gpt2.stack_layers(params, CONFIG.n_layer)
    lengths = [7, 1, 3, 5]
    prompts = [_prompt((n,), seed=n) for n in lengths]
    ids, mask = left_pad(prompts)  # pad id 50256 lies outside this vocabulary: it must never be looked up
    tokens, logits = generate(model, params, ids, 10, attention_mask=mask, return_logits=True)
    for row, prompt in enumerate(prompts):
        alone = greedy_alone(model, params, prompt, 10, 17)
        np.testing.assert_array_equal(tokens[row, 7:], alone[len(prompt) : len(prompt) + 10])
        full = full_forward(model, params, alone[None])[0, len(prompt) - 1 : len(prompt) + 9]
        np.testing.assert_allclose(logits[row], full, rtol=1e-5, atol=2e-5)


def test_unmerged_lora_through_jaxlora_apply_equals_merged(base, adapter_sets):
    model, params = base
    adapters, plan = adapter_sets[0]
    PLAN_HOLDER["plan"] = plan
    prompt = _prompt((2, 6), seed=3)
    tokens, logits = generate(model, (params, adapters), prompt, 10, forward=lora_forward, return_logits=True)
    merged = jaxlora.merge(params, adapters, plan)
    reference = generate_greedy(model, merged, prompt, 10)
    np.testing.assert_array_equal(tokens, reference)
    np.testing.assert_allclose(logits, full_forward(model, merged, reference)[:, 5:-1], rtol=1e-5, atol=5e-5)
    assert not np.array_equal(reference, generate_greedy(model, params, prompt, 10)), "the adapter changes nothing"


@pytest.mark.parametrize("scan_layers", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_mixed_adapter_batch_through_the_bank_equals_each_row_merged_alone(base, adapter_sets, scan_layers):
    model, params = base
    sets = adapter_sets
    if scan_layers:
        model = GPT2(dataclasses.replace(CONFIG, scan_layers=True))
        stacked = gpt2.stack_layers(params, CONFIG.n_layer)
        plan = jaxlora.plan(
            stacked, jaxlora.LoraConfig(rank=4, alpha=8.0, targets=r"h/(attn|mlp)/.*/kernel|wte/embedding",
                                        stacked_axes={r"h/.*": 1})
        )  # fmt: skip
        sets = [(gpt2.stack_layers(a, CONFIG.n_layer), plan) for a, _ in sets]
        params = stacked
    bank = jaxlora.adapter_bank(sets, names=["a", "b", "c"])
    slots = ["a", None, "c", "b", "a"]
    lengths = [6, 2, 4, 5, 1]
    prompts = [_prompt((n,), seed=40 + n) for n in lengths]
    ids, mask = left_pad(prompts, pad_token_id=0)
    tokens = generate(model, (params, bank, bank.ids(slots)), ids, 8, attention_mask=mask, forward=bank_forward)
    for row, (slot, prompt) in enumerate(zip(slots, prompts, strict=True)):
        merged = params if slot is None else jaxlora.merge(params, *sets[bank.index(slot)])
        alone = greedy_alone(model, merged, prompt, 8, 14)
        np.testing.assert_array_equal(
            tokens[row, 6:], alone[len(prompt) : len(prompt) + 8], err_msg=f"row {row} ({slot})"
        )


def test_top_k_one_is_greedy_and_sampling_is_reproducible_by_key(base):
    model, params = base
    prompt = _prompt((3, 4), seed=5)
    greedy = generate(model, params, prompt, 10)
    top1 = generate(model, params, prompt, 10, rng=jax.random.key(3), temperature=2.0, top_k=1)
    np.testing.assert_array_equal(top1, greedy)
    first = generate(model, params, prompt, 10, rng=jax.random.key(7), temperature=1.5)
    again = generate(model, params, prompt, 10, rng=jax.random.key(7), temperature=1.5)
    other = generate(model, params, prompt, 10, rng=jax.random.key(8), temperature=1.5)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[:, 4:], other[:, 4:])
    assert not np.array_equal(first[:, 4:], greedy[:, 4:])


def test_stop_tokens_end_a_row_as_the_uncached_greedy_reference_says(base):
    """After a row's first stop token every later token is the pad token; before it, the tokens are the uncached
    greedy reference's, and a row that never emits it is untouched."""
    model, params = base
    prompt = _prompt((3, 4), seed=11)
    reference = np.asarray(generate_greedy(model, params, prompt, 10))
    eos = int(reference[1, 4 + 3])  # row 1's fourth new token
    pad = VOCAB - 1
    got = np.asarray(generate(model, params, prompt, 10, eos_token_id=eos, pad_token_id=pad))
    for row in range(3):
        new = reference[row, 4:]
        hits = np.flatnonzero(new == eos)
        want = new.copy() if not hits.size else np.concatenate([new[: hits[0] + 1], np.full(9 - hits[0], pad)])
        np.testing.assert_array_equal(got[row, 4:], want, err_msg=f"row {row}")
    assert got[1, 4 + 4 :].tolist() == [pad] * 6


def test_top_p_keeps_the_nucleus(base):
    """A nucleus smaller than the top token's probability leaves only the argmax (greedy); top_p=1 is no filter."""
    model, params = base
    prompt = _prompt((3, 4), seed=12)
    greedy = generate(model, params, prompt, 8)
    np.testing.assert_array_equal(generate(model, params, prompt, 8, rng=jax.random.key(1), top_p=1e-6), greedy)
    free = generate(model, params, prompt, 8, rng=jax.random.key(1))
    np.testing.assert_array_equal(generate(model, params, prompt, 8, rng=jax.random.key(1), top_p=1.0), free)


def test_no_new_tokens_returns_the_prompt(base):
    model, params = base
    prompt = _prompt((2, 3))
    tokens, logits = generate(model, params, prompt, 0, return_logits=True)
    np.testing.assert_array_equal(tokens, prompt)
    assert logits.shape == (2, 0, VOCAB)


def test_sample_token_draws_from_the_tempered_top_k_softmax():
    logits = jnp.array([1.0, 2.0, 0.5, 3.0, -1.0])
    draws = 40_000
    keys = jax.random.split(jax.random.key(0), draws)
    for temperature, top_k in ((1.0, None), (0.5, None), (2.0, 3)):
        draw = partial(sample_token, logits=logits, temperature=temperature, top_k=top_k)
        picks = np.asarray(jax.vmap(draw)(keys))
        scaled = np.asarray(logits) / temperature
        if top_k is not None:
            scaled = np.where(scaled >= np.sort(scaled)[-top_k], scaled, -np.inf)
        expected = np.exp(scaled - scaled.max()) / np.exp(scaled - scaled.max()).sum()
        observed = np.bincount(picks, minlength=5) / draws
        np.testing.assert_allclose(observed, expected, atol=0.01)


def test_decoding_compiles_once_per_shape(base):
    model, params = base
    gpt2.generation._decode.clear_cache()
    for seed in range(3):  # other tokens, other padding, other keys: same program
        ids, mask = left_pad([_prompt((4,), seed), _prompt((1 + seed,), seed + 9)])
        generate(model, params, ids, 5, attention_mask=mask, rng=jax.random.key(seed))
    assert gpt2.generation._decode._cache_size() == 1


def test_bad_input_is_named(base):
    model, params = base
    with pytest.raises(ValueError, match="pad batched prompts on the left"):
        generate(model, params, _prompt((2, 3)), 4, attention_mask=np.array([[1, 1, 1], [1, 1, 0]]))
    with pytest.raises(ValueError, match="exceeds n_positions=48"):
        generate(model, params, _prompt((1, 40)), 9)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        generate(model, params, _prompt((1, 3)), 2, rng=jax.random.key(0), temperature=0.0)
    with pytest.raises(ValueError, match="top_k must be"):
        generate(model, params, _prompt((1, 3)), 2, rng=jax.random.key(0), top_k=0)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        generate(model, params, _prompt((1, 3)), -1)
    with pytest.raises(ValueError, match="top_p must be in"):
        generate(model, params, _prompt((1, 3)), 2, rng=jax.random.key(0), top_p=0.0)
    with pytest.raises(ValueError, match="drop attention_mask"):
        model.apply({"params": params}, _prompt((1, 3)), np.ones((1, 3)), kv_cache=init_cache(CONFIG, 1, 8))
    with pytest.raises(ValueError, match="expected"):
        model.apply({"params": params}, _prompt((2, 3)), kv_cache=init_cache(CONFIG, 1, 8))
    with pytest.raises(ValueError, match=r"max_length=60 must be in 1\.\.n_positions=48"):
        init_cache(CONFIG, 1, 60)


def test_the_decoding_functions_document_args_and_their_examples_run():
    import doctest
    import inspect
    import sys

    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    shared = [getattr(decoding, name) for name in decoding.__all__]  # the decoding loop both families run on
    for function in (init_cache, gpt2.apply_model, sample_token, left_pad, generate, *shared):
        doc = inspect.getdoc(function)
        assert "Args:" in doc and "Returns:" in doc and ">>>" in doc, function.__name__
        globs = {**vars(gpt2), **vars(sys.modules[function.__module__])}  # the package's names, the module's own
        for test in finder.find(function, function.__name__, globs=globs):
            runner.run(test)
    assert runner.failures == 0 and runner.tries >= 18, (runner.failures, runner.tries)
