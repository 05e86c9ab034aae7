"""DoRA on flax.nnx layers: nnx.Linear served by the factored DoRA layer, checked against plain-jnp formulas."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlora


class _Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(6, 8, rngs=rngs)
        self.down = nnx.Linear(8, 5, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down(jnp.tanh(self.up(x)))


def _trained(adapters, seed=3):
    """Adapters as after some training: B non-zero and m away from ‖W‖."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [x + 0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


def _reference(params, adapters, plan, x):
    """The paper's W' = m ⊙ V / ‖V‖ (column norms, held constant for gradients) with V = W + s·A B formed."""

    def layer(name, x):
        w = params[name]["kernel"][...]
        pair = adapters[name]["kernel"]
        v = w + plan.leaves[f"{name}/kernel"].scale * pair["lora_a"] @ pair["lora_b"]
        y = x @ (pair["magnitude"] / jax.lax.stop_gradient(jnp.linalg.norm(v, axis=0)) * v)
        return y + params[name]["bias"][...] if "bias" in params[name] else y

    return layer("down", jnp.tanh(layer("up", x)))


def _setup():
    model = _Net(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, alpha=3.0, use_dora=True))
    _, adapters = jaxlora.init(jax.random.key(1), params, plan)
    x = jax.random.normal(jax.random.key(2), (4, 6))
    return model, params, plan, adapters, x


def test_nnx_linear_dora_forward_and_gradients_match_the_plain_reference():
    model, params, plan, adapters, x = _setup()
    forward = jaxlora.apply_nnx_fn(plan, strict=True)
    np.testing.assert_allclose(forward(model, adapters, x), model(x), rtol=1e-5, atol=1e-6)  # B = 0, m = ‖W‖
    adapters = _trained(adapters)
    np.testing.assert_allclose(forward(model, adapters, x), _reference(params, adapters, plan, x), rtol=1e-5, atol=1e-5)
    got = jax.grad(lambda a: jnp.sum(jnp.sin(forward(model, a, x))))(adapters)
    want = jax.grad(lambda a: jnp.sum(jnp.sin(_reference(params, a, plan, x))))(adapters)
    assert set(jax.tree.leaves(jax.tree.map(lambda _: 1, got))) == {1}
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5), got, want)


def test_nnx_dora_is_served_on_an_einsum_computing_x_w_and_refused_by_name_on_a_convolution():
    class _Proj(nnx.Module):
        def __init__(self, rngs):
            self.proj = nnx.Einsum("bi,io->bo", (6, 4), rngs=rngs)
            self.conv = nnx.Conv(4, 2, (3,), rngs=rngs)

        def __call__(self, x):
            return self.conv(self.proj(x)[:, None, :])

    model = _Proj(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    x = jax.random.normal(jax.random.key(3), (2, 6))
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, use_dora=True, targets=(r"proj/kernel",)))
    _, adapters = jaxlora.init(jax.random.key(1), params, plan)
    adapters = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(4), a.shape), adapters)
    out = jaxlora.apply_nnx_fn(plan, strict=True)(model, adapters, x)
    merged = nnx.merge(*nnx.split(model))
    nnx.update(merged, jaxlora.merge(params, adapters, plan))
    np.testing.assert_allclose(out, merged(x), rtol=1e-5, atol=1e-5)
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, use_dora=True, targets=(r"conv/kernel",)))
    _, adapters = jaxlora.init(jax.random.key(1), params, plan)
    message = "DoRA (use_dora=True) is not supported yet for 'conv/kernel', which meets a convolution"
    with pytest.raises(ValueError, match=re.escape(message)):
        jaxlora.apply_nnx_fn(plan)(model, adapters, x)
