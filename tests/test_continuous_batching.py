"""Continuous batching (`jaxlora.models.continuous_batching.Server`): requests arriving over time, each on its own
adapter slot of a bank, with their own prompt lengths and budgets.

Properties: every request's tokens equal that request decoded alone (no cache, the whole sequence rerun each step)
with its adapter merged, whatever arrives beside it; a bounded set of programs is compiled whatever the requests (a
prefill per batch size and length bucket, one step, an insert per batch size); bad requests are refused by name
and the others served; a sampled request draws the same tokens whatever shares its batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxlora
from jaxlora.models import gpt2
from jaxlora.models.continuous_batching import Request, Server

MAX_LENGTH = 20
BUCKETS = (4, 8, 16)
EOS = 3
NAMES = ("a", "b", "c")


@functools.cache
def _setup():
    model = gpt2.GPT2(gpt2.GPT2Config(vocab_size=40, n_positions=MAX_LENGTH, n_embd=16, n_layer=2, n_head=2))
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    configs = [
        jaxlora.LoraConfig(rank=2, alpha=4.0, targets=(r"h_\d+/attn/c_attn/kernel",)),
        jaxlora.LoraConfig(rank=4, alpha=2.0, targets=(r"h_\d+/.*/kernel", r"wte/embedding")),
        jaxlora.LoraConfig(rank=1, alpha=3.0, targets=(r"h_\d+/mlp/.*/kernel",)),
    ]
    sets = {}
    for i, (name, config) in enumerate(zip(NAMES, configs, strict=True)):
        plan = jaxlora.plan(params, config)
        _, adapters = jaxlora.init(jax.random.key(i + 1), params, plan)
        leaves, tree = jax.tree.flatten(adapters)
        keys = jax.random.split(jax.random.key(10 + i), len(leaves))
        noise = [0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
        sets[name] = (jax.tree.unflatten(tree, noise), plan)
    bank = jaxlora.adapter_bank(sets)
    return model, params, sets, bank


def _forward(state, ids, cache, slots):
    model, _, _, _ = _setup()
    params, bank = state
    return jaxlora.apply_bank(model, {"params": params}, bank, slots, ids, kv_cache=cache)


@functools.cache
def _server(eos: bool = True) -> Server:
    model, params, _, bank = _setup()
    return Server(
        _forward, (params, bank), lambda b, n: gpt2.init_cache(model.config, b, n), rows=3, max_length=MAX_LENGTH,
        adapters=bank.names, buckets=BUCKETS, eos_token_id=EOS if eos else None,
    )  # fmt: skip


@functools.cache
def _alone(prompt: tuple[int, ...], budget: int, adapter: str | None) -> tuple[int, ...]:
    """The request decoded alone without a cache (the whole buffer rerun per token), its adapter merged."""
    model, params, sets, _ = _setup()
    merged = params if adapter is None else jaxlora.merge(params, *sets[adapter])
    buffer = jnp.zeros((1, MAX_LENGTH), jnp.int32).at[0, : len(prompt)].set(jnp.asarray(prompt))
    out = gpt2.generation._greedy_fill(model, merged, buffer, jnp.int32(len(prompt)), jnp.int32(budget))
    tokens = [int(t) for t in np.asarray(out[0, len(prompt) : len(prompt) + budget])]
    return tuple(tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens)


_requests = st.lists(
    st.builds(
        Request,
        prompt=st.lists(st.integers(0, 39), min_size=1, max_size=10).map(tuple),
        max_new_tokens=st.integers(1, 8),
        adapter=st.sampled_from((None, *NAMES)),
        arrival=st.integers(0, 6),
    ),
    min_size=1,
    max_size=7,
)


@given(_requests)
def test_each_request_gets_its_tokens_alone_with_its_adapter_merged_whatever_arrives_beside_it(requests):
    server = _server()
    done = server.run(requests)
    for request, completion in zip(requests, done, strict=True):
        assert completion.error is None and completion.request is request
        assert completion.tokens == _alone(tuple(request.prompt), request.max_new_tokens, request.adapter)
        assert request.arrival <= completion.admitted <= completion.finished
    # bounded whatever the requests: one step (none yet if every request so far ended at its prefill), an insert
    # per prefilled batch size (1, 2 or 4 prompts) and a prefill per (batch size, length bucket)
    assert server.compilations["step"] <= 1 and server.compilations["insert"] <= 3
    assert 1 <= server.compilations["prefill"] <= 3 * len(BUCKETS)


def test_rows_are_refilled_as_requests_finish():
    requests = [Request([5, 6, 7], 8, "a"), Request([8], 1, "b"), Request([9, 10], 2), Request([11], 2, "c")]
    done = _server(eos=False).run(requests)
    # 3 rows: the one-token request finishes at its prefill, so the fourth starts at step 0 too; the third
    # request's row is free after step 0 (its second token), and nothing waits for the 8-token request.
    assert [c.admitted for c in done] == [0, 0, 0, 0]
    assert [len(c.tokens) for c in done] == [8, 1, 2, 2]
    assert [c.finished for c in done] == [6, 0, 0, 0]


def test_bad_requests_are_refused_by_name_and_the_others_served():
    requests = [
        Request([1, 2], 4, "a"),
        Request(list(range(15)), 6, "b"),  # 15 + 6 > 20 slots
        Request([3], 2, "nope"),
        Request([4], 2, 7),
        Request([], 2),
        Request([5, 6], 0),
        Request([7, 8, 9], 3, "c"),
    ]
    done = _server().run(requests)
    assert "request 1: a prompt of 15 tokens plus 6 new tokens does not fit the cache's 20 slots" in done[1].error
    assert "request 2: no adapter named 'nope'; the server's adapters are ['a', 'b', 'c']" in done[2].error
    assert "request 3: adapter index 7 is out of range for 3 adapters" in done[3].error
    assert "request 4: the prompt must be a non-empty" in done[4].error
    assert "request 5: max_new_tokens=0 must be an integer >= 1" in done[5].error
    for i in (0, 6):
        request = requests[i]
        assert done[i].error is None
        assert done[i].tokens == _alone(tuple(request.prompt), request.max_new_tokens, request.adapter)
    with pytest.raises(ValueError, match=r"buckets \[4, 32\] must be prompt lengths in 1..max_length=20"):
        Server(_forward, None, None, rows=2, max_length=MAX_LENGTH, buckets=(4, 32))


def test_a_sampled_request_draws_the_same_tokens_whatever_shares_its_batch():
    model, params, _, bank = _setup()
    server = Server(
        _forward, (params, bank), lambda b, n: gpt2.init_cache(model.config, b, n), rows=2, max_length=MAX_LENGTH,
        adapters=bank.names, buckets=BUCKETS, temperature=1.5, top_k=20,
    )  # fmt: skip
    mine = Request([1, 2, 3], 8, "b", seed=7)
    alone = server.run([mine])[0].tokens
    crowded = server.run([Request([4, 5], 6, "a", seed=1), Request([6], 3, seed=2), mine])[2].tokens
    assert alone == crowded and len(alone) == 8
    other_seed = server.run([Request([1, 2, 3], 8, "b", seed=8)])[0].tokens
    assert other_seed != alone
