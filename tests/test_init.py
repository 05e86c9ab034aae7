"""Initialisers: B zero and A distributed as documented; PiSSA keeps the adapted model equal to the base."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from models import MLP

import jaxlora


def _params():
    model = MLP((300, 200))
    return model, model.init(jax.random.key(0), jnp.ones((1, 400)))["params"]


def test_kaiming_and_gaussian_a_have_the_documented_spread_and_b_is_zero():
    _, params = _params()
    _, kaiming = jaxlora.init(jax.random.key(1), params, jaxlora.LoraConfig(rank=8, init="kaiming"))
    a = kaiming["linear1"]["kernel"]["lora_a"]
    assert float(jnp.abs(a).max()) <= 1 / np.sqrt(400) and float(a.std()) > 0.5 / np.sqrt(3 * 400)
    assert not kaiming["linear1"]["kernel"]["lora_b"].any()
    _, gauss = jaxlora.init(jax.random.key(1), params, jaxlora.LoraConfig(rank=8, init="gaussian", init_std=2.0))
    assert abs(float(gauss["linear1"]["kernel"]["lora_a"].std()) - 2.0) < 0.1
    _, default_std = jaxlora.init(jax.random.key(1), params, jaxlora.LoraConfig(rank=8, init="gaussian"))
    assert abs(float(default_std["linear1"]["kernel"]["lora_a"].std()) - 1 / 8) < 0.01


def test_init_returns_params_untouched_and_keys_depend_on_path_only():
    _, params = _params()
    config = jaxlora.LoraConfig(rank=2)
    same, adapters = jaxlora.init(jax.random.key(1), params, config)
    assert same is params
    _, only_first = jaxlora.init(jax.random.key(1), params, jaxlora.LoraConfig(rank=2, targets=("linear1/kernel",)))
    np.testing.assert_array_equal(adapters["linear1"]["kernel"]["lora_a"], only_first["linear1"]["kernel"]["lora_a"])


def test_pissa_adapters_hold_the_top_singular_directions_and_the_model_is_unchanged():
    model, params = _params()
    config = jaxlora.LoraConfig(rank=4, alpha=8.0, init="pissa")
    residual, adapters = jaxlora.init(jax.random.key(1), params, config)
    w = params["linear1"]["kernel"]
    pair = adapters["linear1"]["kernel"]
    update = config.scale_for("linear1/kernel") * pair["lora_a"] @ pair["lora_b"]
    u, s, vt = np.linalg.svd(np.asarray(w, np.float64))
    np.testing.assert_allclose(update, (u[:, :4] * s[:4]) @ vt[:4], atol=1e-4)
    np.testing.assert_allclose(residual["linear1"]["kernel"] + update, w, atol=1e-5)
    x = jax.random.normal(jax.random.key(2), (5, 400))
    adapted = jaxlora.apply(model, {"params": residual}, adapters, config, x)
    np.testing.assert_allclose(adapted, model.apply({"params": params}, x), rtol=1e-4, atol=1e-4)
