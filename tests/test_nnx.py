"""The same functions work on NNX state from `nnx.split`, and the result goes back with `nnx.merge`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxlora


class TwoLayer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(8, 16, rngs=rngs)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def test_nnx_state_init_merge_partition_and_training_round_trip():
    graphdef, state = nnx.split(TwoLayer(nnx.Rngs(0)))
    config = jaxlora.LoraConfig(rank=2, alpha=4.0, exclude=("out/kernel",), modules_to_save=("out/.*",))
    assert "hidden" in str(jaxlora.plan(state, config))
    _, adapters = jaxlora.init(jax.random.key(1), state, config)
    x = jax.random.normal(jax.random.key(2), (5, 8))
    y = jax.random.randint(jax.random.key(3), (5,), 0, 3)
    base_out = nnx.merge(graphdef, state)(x)
    np.testing.assert_array_equal(nnx.merge(graphdef, jaxlora.merge(state, adapters, config))(x), base_out)

    trainable, frozen = jaxlora.partition(state, adapters, config)
    tx = jaxlora.optimizer(optax.adam(1e-2), config)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state):
        def loss_fn(trainable):
            s, a = jaxlora.combine(trainable, frozen)
            logits = nnx.merge(graphdef, jaxlora.merge(s, a, config))(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    first = None
    for _ in range(10):
        trainable, opt_state, loss = step(trainable, opt_state)
        first = first if first is not None else float(loss)
    assert float(loss) < first
    new_state, new_adapters = jaxlora.combine(trainable, frozen)
    assert isinstance(new_state, nnx.State)
    np.testing.assert_array_equal(new_state["hidden"]["kernel"][...], state["hidden"]["kernel"][...])
    assert not np.array_equal(new_state["out"]["kernel"][...], state["out"]["kernel"][...])
    merged = jaxlora.merge(new_state, new_adapters, config)
    model = nnx.merge(graphdef, merged)
    assert isinstance(model, TwoLayer) and model(x).shape == (5, 3)
    restored = jaxlora.unmerge(merged, new_adapters, config)
    np.testing.assert_allclose(restored["hidden"]["kernel"][...], state["hidden"]["kernel"][...], atol=1e-6)
    assert jnp.isfinite(model(x)).all()
