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


def test_gradients_equal_autodiff_of_the_plain_formula():
    q, k, v, mask = _inputs()
    weights = jax.random.normal(jax.random.key(7), q.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(weights * jnp.sin(fn(q, k, v, mask)))

    ours = jax.grad(loss(attention), argnums=(0, 1, 2))(q, k, v)
    reference = jax.grad(loss(plain_attention), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(ours, reference, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_backward_pass_keeps_one_query_by_key_tensor():
    q, k, v, mask = _inputs(length=16)
    query_by_key = q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1]

    def kept(fn):
        _, backward = jax.vjp(lambda q, k, v: fn(q, k, v, mask), q, k, v)
        return [leaf for leaf in jax.tree.leaves(backward) if getattr(leaf, "dtype", None) == jnp.float32]

    ours = [leaf.size for leaf in kept(attention)]
    assert ours.count(query_by_key) == 1, ours
    assert sum(ours) == 3 * q.size + query_by_key  # q, k, v and the weights
