"""jaxlora.models.normalization: LayerNorm with flax's forward bit for bit and RMSNorm with the plain formula's (as
Hugging Face's LlamaRMSNorm), autodiff's gradients, and backward passes that keep only x and per-row statistics
(where autodiff keeps more tensors of x's size)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.models.normalization import LayerNorm, layer_norm, rms_norm


def _inputs(dtype, shape=(3, 5, 16)):
    keys = jax.random.split(jax.random.key(0), 3)
    x = (3.0 * jax.random.normal(keys[0], shape) + 1.5).astype(dtype)
    params = {
        "scale": (1.0 + 0.1 * jax.random.normal(keys[1], shape[-1:])).astype(dtype),
        "bias": (0.1 * jax.random.normal(keys[2], shape[-1:])).astype(dtype),
    }
    return x, {"params": params}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_is_flax_layer_norm_bit_for_bit(dtype):
    x, params = _inputs(dtype)
    ours, flax_out = LayerNorm(1e-5).apply(params, x), nn.LayerNorm(1e-5).apply(params, x)
    assert ours.dtype == flax_out.dtype
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(flax_out, np.float32))


def test_gradients_equal_autodiff_of_flax_layer_norm():
    x, params = _inputs(jnp.float32)
    weights = jax.random.normal(jax.random.key(5), x.shape)  # a loss that weighs every output differently

    def loss(module):
        return lambda p, x: jnp.sum(weights * jnp.tanh(module.apply(p, x)))

    ours = jax.grad(loss(LayerNorm(1e-5)), argnums=(0, 1))(params, x)
    reference = jax.grad(loss(nn.LayerNorm(1e-5)), argnums=(0, 1))(params, x)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_the_backward_pass_keeps_x_and_two_per_row_statistics_only():
    x, params = _inputs(jnp.float32, shape=(4, 6, 32))
    scale, bias = params["params"]["scale"], params["params"]["bias"]

    def kept(fn):
        _, backward = jax.vjp(fn, x, scale, bias)
        return [leaf for leaf in jax.tree.leaves(backward) if hasattr(leaf, "shape")]

    ours = kept(lambda x, s, b: layer_norm(x, s, b, 1e-5))
    flax_kept = kept(lambda x, s, b: nn.LayerNorm(1e-5).apply({"params": {"scale": s, "bias": b}}, x))
    full_size = [leaf for leaf in ours if leaf.size >= x.size]
    assert len(full_size) == 1 and full_size[0] is x  # x itself, not a copy or a derived tensor
    assert sum(leaf.size for leaf in ours) == x.size + 2 * x.size // x.shape[-1] + 2 * x.shape[-1]
    assert sum(leaf.size >= x.size for leaf in flax_kept) > 1  # what this module exists to avoid


def plain_rms_norm(x, scale, epsilon):
    """The textbook RMSNorm as Hugging Face's LlamaRMSNorm computes it, differentiated by autodiff."""
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + epsilon)
    return scale * h.astype(x.dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_norm_forward_is_the_plain_formula_bit_for_bit(dtype):
    x, params = _inputs(dtype)
    scale = params["params"]["scale"]
    ours, plain = rms_norm(x, scale, 1e-6), plain_rms_norm(x, scale, 1e-6)
    assert ours.dtype == plain.dtype
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(plain, np.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rms_norm_gradients_equal_autodiff_of_the_plain_formula(dtype):
    x, params = _inputs(dtype)
    scale = params["params"]["scale"]
    weights = jax.random.normal(jax.random.key(5), x.shape)

    def loss(fn):
        return lambda x, scale: jnp.sum(weights * jnp.tanh(fn(x, scale, 1e-6).astype(jnp.float32)))

    ours = jax.grad(loss(rms_norm), argnums=(0, 1))(x, scale)
    reference = jax.grad(loss(plain_rms_norm), argnums=(0, 1))(x, scale)
    tolerance = 2e-5 if dtype == jnp.float32 else 2e-2
    for got, want in zip(ours, reference, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tolerance, atol=tolerance
        )


def test_rms_norm_backward_keeps_x_and_one_per_row_statistic_only():
    x, params = _inputs(jnp.float32, shape=(4, 6, 32))
    scale = params["params"]["scale"]
    _, backward = jax.vjp(lambda x, s: rms_norm(x, s, 1e-6), x, scale)
    kept = [leaf for leaf in jax.tree.leaves(backward) if hasattr(leaf, "shape")]
    assert [leaf for leaf in kept if leaf.size >= x.size] == [x]
    assert sum(leaf.size for leaf in kept) == x.size + x.size // x.shape[-1] + x.shape[-1]
