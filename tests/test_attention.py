"""jaxlora.models.attention.attention: the plain softmax attention's forward bit for bit, autodiff's gradients, and a
backward pass that keeps one (batch, heads, query, key) tensor, the weights."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.models.attention import attention


def plain_attention(q, k, v, mask):
    """The textbook formula, differentiated by autodiff (what GPT-2 computed before)."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _inputs(dtype=jnp.float32, batch=2, length=5, heads=3, dim=8):
    q, k, v = (
        jax.random.normal(key, (batch, length, heads, dim)).astype(dtype)
        for key in jax.random.split(jax.random.key(0), 3)
    )
    causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
    padding = jnp.arange(length)[None, :] >= jnp.array([[0], [2]])  # row 1 is left-padded by two keys
    return q, k, v, causal & padding[:, None, None, :]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_is_the_plain_formula_bit_for_bit(dtype):
    q, k, v, mask = _inputs(dtype)
    ours, plain = attention(q, k, v, mask), plain_attention(q, k, v, mask)
    assert ours.dtype == plain.dtype
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(plain, np.float32))


def assert_gradients_equal(reference, q, k, v, mask):
    """dq, dk, dv of `attention` equal autodiff's of `reference`, under a loss that weighs every output differently."""
    weights = jax.random.normal(jax.random.key(7), q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(weights * jnp.sin(fn(q, k, v, mask)))

    ours = jax.grad(loss(attention), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
    for got, expected in zip(ours, want, strict=True):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_gradients_equal_autodiff_of_the_plain_formula():
    assert_gradients_equal(plain_attention, *_inputs())


def test_the_backward_pass_keeps_one_query_by_key_tensor():
    q, k, v, mask = _inputs(length=16)
    query_by_key = q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1]

    def kept(fn):
        _, backward = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
        return [leaf for leaf in jax.tree.leaves(backward) if getattr(leaf, "dtype", None) == jnp.float32]

    ours = [leaf.size for leaf in kept(attention)]
    assert ours.count(query_by_key) == 1, ours
    assert sum(ours) == 3 * q.size + query_by_key  # q, k, v and the weights


def _grouped_inputs(groups=3, kv_heads=2, length=6):
    q, _, _, mask = _inputs(heads=groups * kv_heads, length=length)
    k, v = (jax.random.normal(key, (2, length, kv_heads, 8)) for key in jax.random.split(jax.random.key(1), 2))
    return q, k, v, mask


def plain_grouped_attention(q, k, v, mask):
    """Grouped-query attention as transformers computes it: each key/value head repeated to its group's queries."""
    groups = q.shape[2] // k.shape[2]
    return plain_attention(q, jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2), mask)


@pytest.mark.parametrize("per_head_mask", [False, True])
def test_grouped_query_attention_equals_repeated_key_value_heads(per_head_mask):
    """Forward and autodiff's gradients of the repeated-heads formula (dk, dv summed over each group)."""
    q, k, v, mask = _grouped_inputs()
    if per_head_mask:  # a (batch, heads, query, key) mask: each query head its own
        mask = mask & (jnp.arange(q.shape[2]) != 4)[None, :, None, None] | jnp.eye(mask.shape[-1], dtype=bool)
    np.testing.assert_allclose(attention(q, k, v, mask), plain_grouped_attention(q, k, v, mask), rtol=1e-6, atol=1e-6)
    assert_gradients_equal(plain_grouped_attention, q, k, v, mask)


def test_grouped_query_backward_keeps_one_query_by_key_tensor_and_no_repeated_heads():
    q, k, v, mask = _grouped_inputs(length=16)
    query_by_key = q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1]
    _, backward = jax.vjp(lambda q, k, v: attention(q, k, v, mask), q, k, v)
    kept = [leaf.size for leaf in jax.tree.leaves(backward) if getattr(leaf, "dtype", None) == jnp.float32]
    assert kept.count(query_by_key) == 1, kept
    assert sum(kept) == q.size + k.size + v.size + query_by_key  # k and v at their own (kv_heads) size


def test_query_heads_that_do_not_divide_into_the_key_value_heads_are_refused():
    q, k, v, mask = _grouped_inputs(groups=3, kv_heads=2)
    with pytest.raises(ValueError, match="6 query heads cannot share 4 key/value heads"):
        attention(q, jnp.concatenate([k, k], axis=2), jnp.concatenate([v, v], axis=2), mask)
