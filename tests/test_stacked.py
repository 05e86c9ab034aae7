"""Stacked kernels (nn.scan, a hand-written lax.scan): one adapter per layer, served factored inside the scan.

References are plain jnp: the model unrolled layer by layer with `x W_l + b_l + s·(x A_l) B_l`, differentiated
by `jax.grad`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxlora

LAYERS, WIDTH, HIDDEN = 4, 24, 40


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        up = nn.Dense(HIDDEN, name="up")(h)
        return h + nn.Dense(WIDTH, name="down")(jnp.tanh(up)), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scanned = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
        h, _ = scanned(name="layers")(x, None)
        return nn.Dense(3, name="head")(h)


CONFIG = jaxlora.LoraConfig(rank=3, alpha=6.0, targets=("layers/.*/kernel",), stacked_axes={"layers/.*": 1})


def _setup(config=CONFIG, randomize=True):
    model = Stack()
    x = jax.random.normal(jax.random.key(0), (5, WIDTH))
    params = model.init(jax.random.key(1), x)["params"]
    plan = jaxlora.plan(params, config)
    params, adapters = jaxlora.init(jax.random.key(2), params, plan)
    if randomize:
        keys = iter(jax.random.split(jax.random.key(3), 8))
        adapters = jax.tree.map(lambda a: a + 0.2 * jax.random.normal(next(keys), a.shape), adapters)
    return model, x, params, plan, adapters


def _reference(params, adapters, x, scale, mask=None):
    """The stack unrolled in plain jnp, each layer with its own (A_l, B_l)."""

    def dense(p, a, h, layer):
        out = h @ p["kernel"][layer] + p["bias"][layer]
        if a is None:
            return out
        on = 1.0 if mask is None else mask[layer]
        return out + on * scale * (h @ a["kernel"]["lora_a"][layer]) @ a["kernel"]["lora_b"][layer]

    h, p, a = x, params["layers"], adapters.get("layers", {})
    for layer in range(LAYERS):
        up = dense(p["up"], a.get("up"), h, layer)
        h = h + dense(p["down"], a.get("down"), jnp.tanh(up), layer)
    return h @ params["head"]["kernel"] + params["head"]["bias"]


def test_each_stacked_layer_gets_its_own_adapter_and_the_plan_counts_them():
    _model, _x, _params, plan, adapters = _setup(randomize=False)
    up = adapters["layers"]["up"]["kernel"]
    assert up["lora_a"].shape == (LAYERS, WIDTH, 3) and up["lora_b"].shape == (LAYERS, 3, HIDDEN)
    assert not np.allclose(up["lora_a"][0], up["lora_a"][1])  # initialised per layer
    assert plan.num_lora == LAYERS * 3 * (WIDTH + HIDDEN) * 2
    table = str(plan)
    assert "stacked layers" in table and "4 of 4" in table and "(4, 24, 3)" in table


def test_zero_b_gives_the_base_output_bit_for_bit():
    model, x, params, plan, adapters = _setup(randomize=False)
    np.testing.assert_array_equal(
        jaxlora.apply(model, {"params": params}, adapters, plan, x), model.apply({"params": params}, x)
    )


def test_forward_and_gradients_equal_the_unrolled_plain_jnp_reference():
    model, x, params, plan, adapters = _setup()
    forward = jaxlora.apply_fn(model, plan, strict=True)  # strict: nothing may fall back to merging
    out = forward({"params": params}, adapters, x)
    want = _reference(params, adapters, x, 2.0)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(want - model.apply({"params": params}, x)).max()) > 1e-2  # the adapters matter

    loss = lambda a, p, x: jnp.sum(jnp.sin(forward({"params": p}, a, x)))
    reference = lambda a, p, x: jnp.sum(jnp.sin(_reference(p, a, x, 2.0)))
    # jitted: one compile each instead of one per op of the unrolled reference and of the scan's backward
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(adapters, params, x)
    expected = jax.jit(jax.grad(reference, argnums=(0, 1, 2)))(adapters, params, x)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5), got, expected)
    merged = model.apply({"params": jaxlora.merge(params, adapters, plan)}, x)
    np.testing.assert_allclose(merged, want, rtol=1e-5, atol=1e-5)


def _large_shaped(jaxpr, shapes) -> list[tuple[int, ...]]:
    found = []
    for eqn in jaxpr.eqns:
        found += [tuple(v.aval.shape) for v in eqn.outvars if tuple(getattr(v.aval, "shape", ())) in shapes]
        for sub in jax.core.jaxprs_in_params(eqn.params):
            found += _large_shaped(sub, shapes)
    return found


def test_the_compiled_training_step_never_forms_a_layer_or_stack_sized_kernel():
    model, x, params, plan, adapters = _setup()
    trainable, frozen = jaxlora.partition(params, adapters, plan)
    tx = jaxlora.optimizer(optax.adam(1e-3), plan)
    y = jnp.zeros((5,), jnp.int32)

    def step(trainable, opt_state):
        def loss_fn(trainable):
            p, a = jaxlora.combine(trainable, frozen)
            logits = jaxlora.apply_fn(model, plan, strict=True)({"params": p}, a, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    opt_state = tx.init(trainable)
    kernels = {(WIDTH, HIDDEN), (HIDDEN, WIDTH), (LAYERS, WIDTH, HIDDEN), (LAYERS, HIDDEN, WIDTH)}
    assert _large_shaped(jax.make_jaxpr(step)(trainable, opt_state).jaxpr, kernels) == []

    def merged_step(trainable, opt_state):  # the control: merging inside the step does form them
        def loss_fn(trainable):
            p, a = jaxlora.combine(trainable, frozen)
            return jnp.sum(model.apply({"params": jaxlora.merge(p, a, plan)}, x))

        return jax.grad(loss_fn)(trainable)

    assert _large_shaped(jax.make_jaxpr(merged_step)(trainable, opt_state).jaxpr, kernels)


def test_layers_to_transform_adapts_only_the_chosen_layers_of_the_stack():
    config = jaxlora.LoraConfig(
        rank=3,
        alpha=6.0,
        targets=("layers/.*/kernel",),
        stacked_axes={"layers/.*": 1},
        layers_to_transform={"layers/.*": (0, 2)},
    )
    model, x, params, plan, adapters = _setup(config)
    assert plan.num_lora == 2 * 3 * (WIDTH + HIDDEN) * 2 and "2 of 4" in str(plan)
    mask = jnp.array([1.0, 0.0, 1.0, 0.0])
    out = jaxlora.apply_fn(model, plan, strict=True)({"params": params}, adapters, x)
    np.testing.assert_allclose(out, _reference(params, adapters, x, 2.0, mask), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        model.apply({"params": jaxlora.merge(params, adapters, plan)}, x), out, rtol=1e-5, atol=1e-5
    )
    grads = jax.grad(lambda a: jnp.sum(jaxlora.apply(model, {"params": params}, a, plan, x) ** 2))(adapters)
    b_grad = grads["layers"]["up"]["kernel"]["lora_b"]
    assert float(jnp.abs(b_grad[1]).max()) == 0.0 and float(jnp.abs(b_grad[3]).max()) == 0.0
    assert float(jnp.abs(b_grad[0]).max()) > 0.0 and float(jnp.abs(b_grad[2]).max()) > 0.0


def test_dropout_draws_a_different_mask_for_every_stacked_layer():
    config = jaxlora.LoraConfig(
        rank=3, alpha=6.0, targets=("layers/.*/kernel",), stacked_axes={"layers/.*": 1}, dropout=0.5
    )
    model, x, params, plan, adapters = _setup(config)
    run = jaxlora.apply(model, {"params": params}, adapters, plan, x, rngs={"lora_dropout": jax.random.key(7)})
    # The per-layer keys: each stacked layer's slice of the leaf's keys (split from one key per leaf) differs.
    keys = jaxlora._src.serving.leaf_rng(jax.random.key(7), plan.leaves["layers/up/kernel"])
    assert keys.shape == (params["layers"]["up"]["kernel"].shape[0],)
    data = jax.random.key_data(keys).reshape(keys.shape[0], -1)
    assert len({tuple(np.asarray(row).tolist()) for row in data}) == keys.shape[0]
    assert float(jnp.abs(run - jaxlora.apply(model, {"params": params}, adapters, plan, x)).max()) > 1e-3
    again = jaxlora.apply(model, {"params": params}, adapters, plan, x, rngs={"lora_dropout": jax.random.key(7)})
    other = jaxlora.apply(model, {"params": params}, adapters, plan, x, rngs={"lora_dropout": jax.random.key(8)})
    np.testing.assert_array_equal(run, again)
    assert float(jnp.abs(run - other).max()) > 1e-3


def test_a_hand_written_lax_scan_over_the_stacked_tree_serves_each_layer_factored():
    _model, x, params, _plan, adapters = _setup()
    block = Block()
    one_layer = jax.tree.map(lambda w: w[0], params["layers"])
    layer_plan = jaxlora.plan(one_layer, jaxlora.LoraConfig(rank=3, alpha=6.0, targets=(".*/kernel",)))
    forward = jaxlora.apply_fn(block, layer_plan, strict=True)

    def body(h, layer):
        layer_params, layer_adapters = layer
        return forward({"params": layer_params}, layer_adapters, h, None)[0], None

    h, _ = jax.lax.scan(body, x, (params["layers"], adapters["layers"]))
    out = h @ params["head"]["kernel"] + params["head"]["bias"]
    np.testing.assert_allclose(out, _reference(params, adapters, x, 2.0), rtol=1e-5, atol=1e-5)


def test_an_undeclared_stack_falls_back_to_merging_with_a_warning_naming_the_fix():
    config = jaxlora.LoraConfig(rank=3, alpha=6.0, targets=("layers/up/kernel",))  # no stacked_axes, no model
    model, x, params, plan, adapters = _setup(config)
    assert adapters["layers"]["up"]["kernel"]["lora_b"].shape == (3, HIDDEN)  # one update of the (L*in, out) view
    with pytest.warns(UserWarning, match=r"layers/up/kernel: it is stacked by a scan .* set stacked_axes for it"):
        out = jaxlora.apply(model, {"params": params}, adapters, plan, x)
    np.testing.assert_allclose(out, model.apply({"params": jaxlora.merge(params, adapters, plan)}, x), atol=1e-5)
    with pytest.raises(ValueError, match=r"strict=True.*\n  layers/up/kernel: it is stacked by a scan"):
        jaxlora.apply_fn(model, plan, strict=True)({"params": params}, adapters, x)


def test_a_plan_built_with_the_model_reads_the_stack_from_the_scan():
    config = jaxlora.LoraConfig(rank=3, alpha=6.0, targets=("layers/up/kernel",))  # stacked_axes left out
    model, x, params, _, _ = _setup(randomize=False)
    plan = jaxlora.plan(params, config, model=model, example=x)
    assert plan.leaves["layers/up/kernel"].stacked_axes == 1
    assert plan.config.stacked_axes == {"layers/up/kernel": 1}  # spelled out, so checkpoints restore it
    declared = jaxlora.plan(params, dataclasses.replace(config, stacked_axes={"layers/.*": 1}))
    assert plan.leaves["layers/up/kernel"].a_shape == declared.leaves["layers/up/kernel"].a_shape
    with pytest.raises(ValueError, match=r"stacked_axes gives 0 for 'layers/up/kernel'.*set stacked_axes to 1"):
        jaxlora.plan(params, dataclasses.replace(config, stacked_axes={"layers/.*": 0}), model=model, example=x)


def test_bad_stacking_is_refused_naming_the_path_and_the_fix():
    model, x, params, plan, adapters = _setup(randomize=False)
    too_many = jaxlora.LoraConfig(rank=1, targets=("layers/up/kernel",), stacked_axes={"layers/up/kernel": 2})
    with pytest.raises(
        ValueError, match=r"'layers/up/kernel' of shape \(4, 24, 40\) with stacked_axes=2 .* use at most 1"
    ):
        jaxlora.plan(params, too_many)
    beyond = jaxlora.LoraConfig(
        rank=1, targets=("layers/up/kernel",), stacked_axes={"layers/.*": 1}, layers_to_transform={".*": (4,)}
    )
    with pytest.raises(ValueError, match=r"names layer 4, but it stacks 4 layers .* use indices 0\.\.3"):
        jaxlora.plan(params, beyond)
    flat = jaxlora.LoraConfig(rank=1, targets=("head/kernel",), layers_to_transform={"head/kernel": (0,)})
    with pytest.raises(ValueError, match=r"'head/kernel'.*is not stacked: set stacked_axes for it"):
        jaxlora.plan(params, flat)
    shorter = jax.tree.map(lambda a: a[:3], adapters)  # adapters of a 3-layer stack
    with pytest.raises(
        ValueError,
        match=r"layers/down/kernel/lora_a has shape \(3, 40, 3\), but the plan gives "
        r"\(4, 40, 3\) .*4 stacked layers",
    ):
        jaxlora.apply(model, {"params": params}, shorter, plan, x)


def test_stacked_adapters_keep_the_stack_axes_sharding_of_their_kernel():
    _, _, params, plan, _ = _setup(randomize=False)
    specs = jax.tree.map(lambda _: None, params)
    specs["layers"]["up"]["kernel"] = jax.P("pipe", "data", "model")
    specs["layers"]["down"]["kernel"] = jax.P("pipe", "model", None)
    out = jaxlora.adapter_specs(plan, specs)
    assert out["layers"]["up"]["kernel"] == {
        "lora_a": jax.P("pipe", "data", None),
        "lora_b": jax.P("pipe", None, "model"),
    }
    assert out["layers"]["down"]["kernel"] == {
        "lora_a": jax.P("pipe", "model", None),
        "lora_b": jax.P("pipe", None, None),
    }
