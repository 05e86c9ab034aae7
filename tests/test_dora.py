"""DoRA: factored forward and gradients against plain-jnp formulas that form W + s·A B; merge, PEFT files, errors."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import MLP, Zoo

import jaxlora
from jaxlora._src.dora import column_norms, dora_linear, dora_linear_dropout

SCALE = 1.7


def _dense_reference(x, w, bias, a, b, m, scale=SCALE):
    """DoRA as the paper writes it, W' = m ⊙ V / ‖V‖_c with V = W + s·A B formed, the norm a constant (PEFT)."""
    v = w + scale * a @ b
    norm = jax.lax.stop_gradient(jnp.linalg.norm(v, axis=0))
    y = x @ (m / norm * v)
    return y if bias is None else y + bias


def _operands(seed=0, n_in=7, n_out=5, rank=3, batch=(2, 4)):
    ks = jax.random.split(jax.random.key(seed), 7)
    x = jax.random.normal(ks[0], (*batch, n_in))
    w = jax.random.normal(ks[1], (n_in, n_out))
    bias = jax.random.normal(ks[2], (n_out,))
    a = jax.random.normal(ks[3], (n_in, rank))
    b = 0.3 * jax.random.normal(ks[4], (rank, n_out))
    m = 1.0 + jax.random.uniform(ks[5], (n_out,))
    return x, w, bias, a, b, m


def test_column_norms_match_the_formed_matrix():
    _, w, _, a, b, _ = _operands()
    np.testing.assert_allclose(column_norms(w, a, b, SCALE), jnp.linalg.norm(w + SCALE * a @ b, axis=0), rtol=1e-5)


def test_column_norms_never_form_an_in_by_out_array():
    w, a, b = jnp.zeros((300, 200)), jnp.zeros((300, 4)), jnp.zeros((4, 200))
    jaxpr = jax.make_jaxpr(column_norms, static_argnums=3)(w, a, b, SCALE)
    shapes = [tuple(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars]
    assert (300, 200) not in shapes, "the norm formed an (in, out) array"


@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_and_every_gradient_match_the_plain_reference(with_bias):
    x, w, bias, a, b, m = _operands()
    bias = bias if with_bias else None
    np.testing.assert_allclose(
        dora_linear(x, w, bias, a, b, m, SCALE), _dense_reference(x, w, bias, a, b, m), rtol=1e-5, atol=1e-5
    )
    cot = jax.random.normal(jax.random.key(9), (2, 4, 5))
    argnums = (0, 1, 2, 3, 4, 5) if with_bias else (0, 1, 3, 4, 5)

    def loss(f):
        return lambda *args: jnp.sum(f(*args) * cot)

    got = jax.grad(loss(lambda *z: dora_linear(*z, SCALE)), argnums)(x, w, bias, a, b, m)
    want = jax.grad(loss(_dense_reference), argnums)(x, w, bias, a, b, m)
    for name, g, r in zip(
        ["x", "w", "bias", "a", "b", "m"] if with_bias else ["x", "w", "a", "b", "m"], got, want, strict=True
    ):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")


def test_the_norm_is_a_constant_for_gradients_as_in_peft():
    """Differentiating through ‖V‖ would give other A, B gradients: the reference without stop_gradient differs."""
    x, w, bias, a, b, m = _operands()

    def through_norm(a, b):
        v = w + SCALE * a @ b
        return jnp.sum(x @ (m / jnp.linalg.norm(v, axis=0) * v))

    got = jax.grad(lambda a, b: jnp.sum(dora_linear(x, w, bias, a, b, m, SCALE)), (0, 1))(a, b)
    other = jax.grad(through_norm, (0, 1))(a, b)
    assert not np.allclose(got[0], other[0], atol=1e-3)


def test_dropout_form_matches_peft_training_mode():
    """PEFT: x W + bias + (c - 1)(x' W) + c·s(x' A) B with c = m / ‖V‖; x' = x gives the plain DoRA output."""
    x, w, bias, a, b, m = _operands()
    x_drop = x * (jax.random.uniform(jax.random.key(3), x.shape) > 0.5) * 2.0
    c = m / jnp.linalg.norm(w + SCALE * a @ b, axis=0)
    want = x @ w + bias + (c - 1) * (x_drop @ w) + c * SCALE * (x_drop @ a @ b)
    np.testing.assert_allclose(dora_linear_dropout(x, x_drop, w, bias, a, b, m, SCALE), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        dora_linear_dropout(x, x, w, bias, a, b, m, SCALE), _dense_reference(x, w, bias, a, b, m), rtol=1e-4, atol=1e-4
    )


# ----------------------------------------------------------------------------------------------------------------
# Through the library: init, apply, merge, the plan


def _mlp(use_dora=True, **config):
    model = MLP((16, 8, 3))
    x = jax.random.normal(jax.random.key(0), (5, 10))
    params = model.init(jax.random.key(1), x)["params"]
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, alpha=3.0, use_dora=use_dora, **config))
    return model, x, params, plan


def _trained(adapters, seed=4):
    """Trained-looking DoRA adapters: B non-zero and magnitudes moved away from ‖W‖."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [x + 0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


def _reference_params(params, adapters, plan):
    """Every adapted kernel replaced by the dense DoRA weight computed with plain jnp."""
    out = jax.tree.map(lambda x: x, params)
    for path, leaf in plan.leaves.items():
        layer = path.split("/")[0]
        ad = adapters[layer]["kernel"]
        v = params[layer]["kernel"] + leaf.scale * ad["lora_a"] @ ad["lora_b"]
        out[layer]["kernel"] = ad["magnitude"] / jnp.linalg.norm(v, axis=0) * v
    return out


def test_init_magnitude_is_the_weight_norm_and_the_model_starts_as_the_base():
    model, x, params, plan = _mlp()
    _, adapters = jaxlora.init(jax.random.key(2), params, plan)
    for layer in ("linear1", "linear2", "linear3"):
        np.testing.assert_allclose(
            adapters[layer]["kernel"]["magnitude"], jnp.linalg.norm(params[layer]["kernel"], axis=0), rtol=1e-6
        )
    base = model.apply({"params": params}, x)
    np.testing.assert_allclose(jaxlora.apply(model, {"params": params}, adapters, plan, x), base, rtol=1e-5, atol=1e-6)


def test_pissa_with_dora_starts_as_the_base():
    model, x, params, plan = _mlp(init="pissa")
    residual, adapters = jaxlora.init(jax.random.key(2), params, plan)
    np.testing.assert_allclose(
        jaxlora.apply(model, {"params": residual}, adapters, plan, x),
        model.apply({"params": params}, x),
        rtol=1e-4,
        atol=1e-4,
    )


def test_apply_merge_and_gradients_match_the_dense_reference():
    model, x, params, plan = _mlp()
    _, adapters = jaxlora.init(jax.random.key(2), params, plan)
    adapters = _trained(adapters)
    want = model.apply({"params": _reference_params(params, adapters, plan)}, x)
    assert not np.allclose(want, model.apply({"params": params}, x), atol=1e-2)
    forward = jaxlora.apply_fn(model, plan, strict=True)
    np.testing.assert_allclose(forward({"params": params}, adapters, x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        model.apply({"params": jaxlora.merge(params, adapters, plan)}, x), want, rtol=1e-5, atol=1e-5
    )

    def reference_loss(adapters):
        frozen = {p: {n: jax.lax.stop_gradient(v) for n, v in d.items()} for p, d in params.items()}
        norms = {
            p: jax.lax.stop_gradient(
                jnp.linalg.norm(
                    params[p]["kernel"] + 3.0 / 2 * adapters[p]["kernel"]["lora_a"] @ adapters[p]["kernel"]["lora_b"],
                    axis=0,
                )
            )
            for p in params
        }
        dense = {
            p: {
                "bias": frozen[p]["bias"],
                "kernel": adapters[p]["kernel"]["magnitude"]
                / norms[p]
                * (frozen[p]["kernel"] + 1.5 * adapters[p]["kernel"]["lora_a"] @ adapters[p]["kernel"]["lora_b"]),
            }
            for p in params
        }
        return jnp.sum(jnp.sin(model.apply({"params": dense}, x)))

    # Both gradients under jit: one compile each (eagerly, each op compiles on its own, most of this test's time).
    got = jax.jit(jax.grad(lambda ad: jnp.sum(jnp.sin(forward({"params": params}, ad, x)))))(adapters)
    want_grads = jax.jit(jax.grad(reference_loss))(adapters)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5), got, want_grads)


def test_unmerge_with_the_norms_recovers_the_base():
    _, _, params, plan = _mlp()
    _, adapters = jaxlora.init(jax.random.key(2), params, plan)
    adapters = _trained(adapters)
    norms = jaxlora.dora_norms(params, adapters, plan)
    merged = jaxlora.merge(params, adapters, plan)
    np.testing.assert_allclose(
        jnp.linalg.norm(merged["linear1"]["kernel"], axis=0), adapters["linear1"]["kernel"]["magnitude"], rtol=1e-5
    )
    back = jaxlora.unmerge(merged, adapters, plan, norms=norms)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5), back, params)
    with pytest.raises(ValueError, match=re.escape("unmerging DoRA adapters needs the column norms")):
        jaxlora.unmerge(merged, adapters, plan)


def test_plan_counts_the_magnitude():
    _, _, params, plan = _mlp()
    _, _, _, plain = _mlp(use_dora=False)
    assert plan.num_lora == plain.num_lora + 16 + 8 + 3
    assert f"{plan.num_lora:,}" in plan.table()
    _, adapters = jaxlora.init(jax.random.key(2), params, plan)
    assert jaxlora.count_params(adapters) == plan.num_lora


def test_adapters_and_config_disagreeing_about_dora_are_refused():
    _, _, params, plan = _mlp()
    _, _, _, plain = _mlp(use_dora=False)
    _, dora_adapters = jaxlora.init(jax.random.key(2), params, plan)
    _, plain_adapters = jaxlora.init(jax.random.key(2), params, plain)
    with pytest.raises(ValueError, match=r"holds a DoRA 'magnitude', but the config has use_dora=False"):
        plain.check_adapters(dora_adapters)
    with pytest.raises(ValueError, match=r"has no 'magnitude', but the config sets use_dora=True"):
        plan.check_adapters(plain_adapters)
    bad = jax.tree.map(lambda x: x, dora_adapters)
    bad["linear1"]["kernel"]["magnitude"] = jnp.ones(3)
    with pytest.raises(ValueError, match=r"linear1/kernel/magnitude has shape \(3,\), but the plan gives \(16,\)"):
        plan.check_adapters(bad)


def test_dora_on_an_unsupported_layer_kind_is_named():
    model = Zoo()
    tokens = jnp.zeros((1, 5), jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, targets=("conv/kernel",), use_dora=True))
    _, adapters = jaxlora.init(jax.random.key(1), params, plan)
    with pytest.raises(
        ValueError, match=r"DoRA \(use_dora=True\) is not supported yet for 'conv/kernel', which meets a convolution"
    ):
        jaxlora.apply(model, {"params": params}, adapters, plan, tokens)


def test_config_round_trips_and_checks_use_dora():
    config = jaxlora.LoraConfig(rank=2, use_dora=True)
    assert jaxlora.LoraConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="use_dora must be True or False"):
        jaxlora.LoraConfig(use_dora="yes")


def test_adapter_checkpoint_round_trips_dora(tmp_path):
    model, x, params, plan = _mlp()
    _, adapters = jaxlora.init(jax.random.key(2), params, plan)
    adapters = _trained(adapters)
    jaxlora.checkpoint.save_adapter(tmp_path / "ckpt", params, adapters, plan)
    _, loaded, loaded_plan = jaxlora.checkpoint.load_adapter(tmp_path / "ckpt", params)
    assert loaded_plan.config.use_dora
    jax.tree.map(np.testing.assert_array_equal, loaded, adapters)
    np.testing.assert_array_equal(
        jaxlora.apply(model, {"params": params}, loaded, loaded_plan, x),
        jaxlora.apply(model, {"params": params}, adapters, plan, x),
    )
