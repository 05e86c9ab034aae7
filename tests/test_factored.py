"""The factored forward pass equals the merged one for every layer kind, and its gradients equal autodiff's."""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import MLP, Zoo, apply_in_mode, apply_merged

import jaxlora

ZOO_CONFIG = jaxlora.LoraConfig(
    rank=2,
    alpha=3.0,
    targets=(jaxlora.ALL_KERNELS, jaxlora.ALL_EMBEDDINGS),
    fan_in_ndim={"heads/kernel": 1},
)


def _zoo():
    model = Zoo()
    tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, 32)
    params = model.init(jax.random.key(1), tokens)["params"]
    return model, tokens, params


def _randomize(adapters, seed=3):
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )


def test_every_layer_kind_is_served_factored_and_matches_merged():
    model, tokens, params = _zoo()
    _, adapters = jaxlora.init(jax.random.key(2), params, ZOO_CONFIG)
    adapters = _randomize(adapters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any adapter left unserved would warn
        factored = jaxlora.apply_fn(model, ZOO_CONFIG, strict=True)({"params": params}, adapters, tokens)
    merged = apply_merged(model, params, adapters, ZOO_CONFIG, tokens)
    base = model.apply({"params": params}, tokens)
    assert float(jnp.abs(merged - base).max()) > 1e-2  # the adapters really change the output
    np.testing.assert_allclose(factored, merged, rtol=1e-5, atol=1e-5)


def test_zero_b_gives_the_base_output_bit_for_bit_for_every_layer_kind():
    model, tokens, params = _zoo()
    _, adapters = jaxlora.init(jax.random.key(2), params, ZOO_CONFIG)
    out = jaxlora.apply(model, {"params": params}, adapters, ZOO_CONFIG, tokens)
    np.testing.assert_array_equal(out, model.apply({"params": params}, tokens))


def test_unservable_adapter_is_reported_and_merged_or_refused_when_strict():
    model, tokens, params = _zoo()
    config = jaxlora.LoraConfig(rank=2, alpha=3.0, targets=("heads/kernel",))  # default fan_in_ndim=2 misfits axis=-1
    _, adapters = jaxlora.init(jax.random.key(2), params, config)
    adapters = _randomize(adapters)
    cause = r"heads/kernel: it is contracted with x over its axes \(0,\) .* the plan's adapter contracts axes \(0, 1\)"
    with pytest.warns(UserWarning, match=cause):
        out = jaxlora.apply(model, {"params": params}, adapters, config, tokens)
    merged = apply_merged(model, params, adapters, config, tokens)
    np.testing.assert_allclose(out, merged, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=cause + r".*model=model, example="):
        jaxlora.apply_fn(model, config, strict=True)({"params": params}, adapters, tokens)
    # Read from the operation instead, the layout serves it: fan_in_ndim is not needed.
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, alpha=3.0, targets=("heads/kernel",)), model=model,
                        example=tokens)  # fmt: skip
    assert plan.leaves["heads/kernel"].a_shape == (12, 2)
    _, adapters = jaxlora.init(jax.random.key(2), params, plan)
    adapters = _randomize(adapters)
    out = jaxlora.apply_fn(model, plan, strict=True)({"params": params}, adapters, tokens)
    np.testing.assert_allclose(out, apply_merged(model, params, adapters, plan, tokens), rtol=1e-5, atol=1e-5)


def test_gradients_of_the_hand_written_backward_equal_autodiff_of_the_merged_model():
    model = MLP((16, 8, 3))
    x = jax.random.normal(jax.random.key(0), (4, 5, 10))
    params = model.init(jax.random.key(1), x)["params"]
    config = jaxlora.LoraConfig(rank=2, alpha=4.0, modules_to_save=("linear3/bias",), exclude=("linear3/kernel",))
    _, adapters = jaxlora.init(jax.random.key(2), params, config)
    adapters = _randomize(adapters)
    trainable, frozen = jaxlora.partition(params, adapters, config)

    def loss(trainable, x, mode):
        p, a = jaxlora.combine(trainable, frozen)
        return jnp.sum(jnp.sin(apply_in_mode(mode, model, {"params": p}, a, config, x)))

    g_fac, gx_fac = jax.grad(loss, argnums=(0, 1))(trainable, x, "factored")
    g_mer, gx_mer = jax.grad(loss, argnums=(0, 1))(trainable, x, "merged")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_fac, g_mer)
    np.testing.assert_allclose(gx_fac, gx_mer, rtol=1e-5, atol=1e-6)


def test_full_fine_tuning_gradients_through_the_fast_dense_equal_plain_autodiff():
    model = MLP((16, 3))
    x = jax.random.normal(jax.random.key(0), (6, 10))
    params = model.init(jax.random.key(1), x)["params"]
    config = jaxlora.LoraConfig(rank=1, targets=("linear1/kernel",))
    _, adapters = jaxlora.init(jax.random.key(2), params, config)

    def loss(params, fast):
        return jnp.sum(jaxlora.apply_fn(model, config, fast_dense=fast)({"params": params}, adapters, x) ** 2)

    fast, plain = jax.grad(loss)(params, True), jax.grad(loss)(params, False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), fast, plain)


def test_dropout_acts_only_with_a_key_and_is_deterministic_per_key():
    model = MLP((32, 4))
    x = jax.random.normal(jax.random.key(0), (8, 10))
    params = model.init(jax.random.key(1), x)["params"]
    config = jaxlora.LoraConfig(rank=2, alpha=2.0, dropout=0.5)
    _, adapters = jaxlora.init(jax.random.key(2), params, config)
    adapters = _randomize(adapters)
    run = lambda rng: jaxlora.apply(
        model, {"params": params}, adapters, config, x, rngs={"lora_dropout": rng} if rng is not None else None
    )
    no_dropout = jaxlora.apply(model, {"params": params}, adapters, config, x)
    merged = apply_merged(model, params, adapters, config, x)
    np.testing.assert_allclose(no_dropout, merged, rtol=1e-5, atol=1e-6)
    k1, k2 = jax.random.key(10), jax.random.key(11)
    np.testing.assert_array_equal(run(k1), run(k1))
    assert float(jnp.abs(run(k1) - run(k2)).max()) > 1e-3
    assert float(jnp.abs(run(k1) - no_dropout).max()) > 1e-3


class _WithStats(nn.Module):
    """A Dense layer followed by BatchNorm: a model with a second collection ("batch_stats")."""

    @nn.compact
    def __call__(self, x):
        return nn.BatchNorm(use_running_average=False, name="norm")(nn.Dense(2, name="dense")(x))


def test_apply_jits_and_extra_collections_pass_through():
    model = _WithStats()
    x = jax.random.normal(jax.random.key(0), (3, 4))
    variables = model.init(jax.random.key(1), x)
    config = jaxlora.LoraConfig(rank=1)
    _, adapters = jaxlora.init(jax.random.key(2), variables["params"], config)
    adapters = _randomize(adapters)
    out, updated = jaxlora.apply(model, variables, adapters, config, x, mutable=["batch_stats"])
    jitted, _ = jax.jit(lambda v, a: jaxlora.apply(model, v, a, config, x, mutable=["batch_stats"]))(
        variables, adapters
    )
    np.testing.assert_array_equal(out, jitted)
    merged = {**variables, "params": jaxlora.merge(variables["params"], adapters, config)}
    want, want_updated = model.apply(merged, x, mutable=["batch_stats"])  # the stats see the adapted Dense
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), updated, want_updated)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), updated["batch_stats"], variables["batch_stats"])
    assert max(jax.tree.leaves(moved)) > 1e-3  # the collection really went in and came back updated
    with pytest.raises(ValueError, match="'params' collection"):
        jaxlora.apply(model, variables["params"], adapters, config, x)


class _Stacked(nn.Module):
    """Three Dense layers run by nn.scan: one kernel of shape (3, 6, 6), sliced per step."""

    @nn.compact
    def __call__(self, x):
        layers = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return layers(name="layers")(x, None)[0]


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, carry, _):
        return nn.tanh(nn.Dense(6, name="dense")(carry)), None


def test_kernels_stacked_by_scan_fall_back_to_merging_instead_of_failing():
    model = _Stacked()
    x = jax.random.normal(jax.random.key(0), (2, 6))
    params = model.init(jax.random.key(1), x)["params"]
    config = jaxlora.LoraConfig(rank=2, alpha=2.0)
    _, adapters = jaxlora.init(jax.random.key(2), params, config)
    adapters = _randomize(adapters)
    with pytest.warns(UserWarning, match="it is stacked by a scan"):
        out = jaxlora.apply(model, {"params": params}, adapters, config, x)
    merged = apply_merged(model, params, adapters, config, x)
    np.testing.assert_allclose(out, merged, rtol=1e-6, atol=1e-6)
