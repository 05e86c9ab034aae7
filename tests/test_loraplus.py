"""LoRA+: B (and DoRA's magnitude) step with ratio x A's learning rate; frozen leaves keep no state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora


def _setup(use_dora=False):
    params = {
        "body": {"kernel": jax.random.normal(jax.random.key(0), (6, 5)), "bias": jnp.zeros(5)},
        "head": {"kernel": jax.random.normal(jax.random.key(1), (5, 3))},
    }
    config = jaxlora.LoraConfig(rank=2, targets=("body/kernel",), modules_to_save=("head/kernel",), use_dora=use_dora)
    plan = jaxlora.plan(params, config)
    params, adapters = jaxlora.init(jax.random.key(2), params, plan)
    return params, adapters, plan


def _ones_like(tree):
    return jax.tree.map(jnp.ones_like, tree)


@pytest.mark.parametrize("ratio", [16.0, 4.0])
def test_sgd_steps_scale_b_by_the_ratio(ratio):
    params, adapters, plan = _setup(use_dora=True)
    trainable, _ = jaxlora.partition(params, adapters, plan)
    lr = 0.01
    tx = jaxlora.loraplus_optimizer(optax.sgd, lr, plan, ratio=ratio)
    updates, _ = tx.update(_ones_like(trainable), tx.init(trainable), trainable)
    body = updates["lora"]["body"]["kernel"]
    # SGD's update is -lr * grad; with unit gradients every entry is exactly the rate of its group.
    np.testing.assert_allclose(body["lora_a"], -lr, rtol=1e-6)
    np.testing.assert_allclose(body["lora_b"], -lr * ratio, rtol=1e-6)
    np.testing.assert_allclose(body["magnitude"], -lr * ratio, rtol=1e-6)
    np.testing.assert_allclose(updates["params"]["head"]["kernel"], -lr, rtol=1e-6)


def test_default_ratio_is_the_papers_and_schedules_are_scaled():
    assert jaxlora.loraplus.DEFAULT_RATIO == 16.0
    params, adapters, plan = _setup()
    trainable, _ = jaxlora.partition(params, adapters, plan)
    schedule = optax.linear_schedule(0.1, 0.0, 10)
    tx = jaxlora.loraplus_optimizer(optax.sgd, schedule, plan)
    state = tx.init(trainable)
    grads = _ones_like(trainable)
    _, state = tx.update(grads, state, trainable)  # step 0 -> 1
    updates, _ = tx.update(grads, state, trainable)
    body = updates["lora"]["body"]["kernel"]
    np.testing.assert_allclose(body["lora_a"], -schedule(1), rtol=1e-6)
    np.testing.assert_allclose(body["lora_b"], -16.0 * schedule(1), rtol=1e-6)


def test_frozen_leaves_keep_no_state_and_adam_uses_the_ratio():
    params, adapters, plan = _setup()
    lr = 1e-3
    tx = jaxlora.loraplus_optimizer(optax.adam, lr, plan, ratio=8.0)
    full = {"params": params, "lora": adapters}
    state = tx.init(full)
    assert not any(x.shape == (6, 5) for x in jax.tree.leaves(state)), "the frozen body kernel has Adam moments"
    grads = jax.tree.map(lambda x: 0.5 * jnp.ones_like(x), full)
    updates, _ = tx.update(grads, state, full)
    # Adam's first step moves every trained entry by ~lr regardless of the gradient's size.
    np.testing.assert_allclose(updates["lora"]["body"]["kernel"]["lora_a"], -lr, rtol=1e-4)
    np.testing.assert_allclose(updates["lora"]["body"]["kernel"]["lora_b"], -8 * lr, rtol=1e-4)
    np.testing.assert_array_equal(updates["params"]["body"]["kernel"], 0.0)


@pytest.mark.parametrize("ratio", [0, -1.0, True, "16"])
def test_bad_ratio_is_refused(ratio):
    _, _, plan = _setup()
    with pytest.raises(ValueError, match="ratio must be a number > 0"):
        jaxlora.loraplus_optimizer(optax.sgd, 0.1, plan, ratio=ratio)
