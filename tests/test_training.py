"""Training touches only what is trainable: no base-sized gradient exists, and frozen leaves keep their bits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from conftest import skip_unless_ci
from models import MLP, apply_in_mode, apply_merged

import jaxlora

KERNEL_SHAPES = {(784, 1000), (1000, 2000), (2000, 10)}


def _setup(mode):
    model = MLP((1000, 2000, 10))
    x = jax.random.normal(jax.random.key(0), (10, 784))
    y = jax.random.randint(jax.random.key(1), (10,), 0, 10)
    params = model.init(jax.random.key(2), x)["params"]
    config = jaxlora.LoraConfig(rank=1, alpha=1.0)
    _, adapters = jaxlora.init(jax.random.key(3), params, config)
    trainable, frozen = jaxlora.partition(params, adapters, config)
    tx = jaxlora.optimizer(optax.adam(1e-3), config)

    def step(trainable, frozen, opt_state, x, y):
        def loss_fn(trainable):
            p, a = jaxlora.combine(trainable, frozen)
            logits = apply_in_mode(mode, model, {"params": p}, a, config, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step, (trainable, frozen, tx.init(trainable), x, y)


def _kernel_shaped_values(jaxpr) -> list[tuple[int, ...]]:
    found = []
    for eqn in jaxpr.eqns:
        found += [tuple(v.aval.shape) for v in eqn.outvars if tuple(getattr(v.aval, "shape", ())) in KERNEL_SHAPES]
        for sub in jax.core.jaxprs_in_params(eqn.params):
            found += _kernel_shaped_values(sub)
    return found


def test_factored_step_never_computes_a_kernel_sized_array_but_the_merged_one_does():
    step, args = _setup("factored")
    assert _kernel_shaped_values(jax.make_jaxpr(step)(*args).jaxpr) == []
    merged_step, merged_args = _setup("merged")
    assert _kernel_shaped_values(jax.make_jaxpr(merged_step)(*merged_args).jaxpr)  # W + s·A B, and dW


def test_factored_step_needs_less_scratch_memory_than_one_frozen_kernel():
    step, args = _setup("factored")
    stats = jax.jit(step).lower(*args).compile().memory_analysis()
    if stats is None:
        skip_unless_ci("this backend reports no memory analysis")
    largest_kernel_bytes = 1000 * 2000 * 4
    assert stats.temp_size_in_bytes < largest_kernel_bytes / 4, stats


def test_optimizer_state_holds_only_trainable_leaves():
    _, (_, _, opt_state, _, _) = _setup("factored")
    assert jaxlora.count_params(opt_state) == 2 * 6_794 + 1  # Adam's mu and nu for the adapters, and its step count


def test_frozen_leaves_keep_their_bits_after_training_including_negative_zeros():
    model = MLP((64, 32, 4))
    x = jax.random.normal(jax.random.key(0), (16, 20))
    y = jax.random.randint(jax.random.key(1), (16,), 0, 4)
    params = model.init(jax.random.key(2), x)["params"]
    params["linear1"]["bias"] = params["linear1"]["bias"].at[:5].set(-0.0)
    config = jaxlora.LoraConfig(rank=2, alpha=4.0, exclude=("linear3/kernel",), modules_to_save=("linear3/.*",))
    _, adapters = jaxlora.init(jax.random.key(3), params, config)
    before = jax.tree.map(np.array, params)
    trainable, frozen = jaxlora.partition(params, adapters, config)
    tx = jaxlora.optimizer(optax.adamw(1e-2, weight_decay=0.1), config)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, opt_state):
        def loss_fn(trainable):
            p, a = jaxlora.combine(trainable, frozen)
            logits = jaxlora.apply(model, {"params": p}, a, config, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses = []
    for _ in range(20):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    after, adapters_after = jaxlora.combine(trainable, frozen)
    for path in ("linear1/kernel", "linear1/bias", "linear2/kernel", "linear2/bias"):
        layer, leaf = path.split("/")
        np.testing.assert_array_equal(
            np.asarray(after[layer][leaf]).view(np.uint32), before[layer][leaf].view(np.uint32)
        )
    assert not np.array_equal(after["linear3"]["kernel"], before["linear3"]["kernel"])  # trained in full
    assert adapters_after["linear1"]["kernel"]["lora_b"].any()


def test_optimizer_over_the_whole_tree_keeps_frozen_bits_including_negative_zeros():
    # jaxlora.optimizer's docstring allows a whole {"params", "lora"} tree, not only the trainable half
    model = MLP((8, 4))
    x = jax.random.normal(jax.random.key(0), (5, 3))
    params = model.init(jax.random.key(1), x)["params"]
    params["linear1"]["bias"] = params["linear1"]["bias"].at[:4].set(-0.0)
    params["linear1"]["kernel"] = params["linear1"]["kernel"].at[0].set(-0.0)
    config = jaxlora.LoraConfig(rank=1, modules_to_save=("linear2/bias",))
    _, adapters = jaxlora.init(jax.random.key(2), params, config)
    tree = {"params": params, "lora": adapters}
    before = jax.tree.map(np.array, tree)
    tx = jaxlora.optimizer(optax.adam(1e-2), config)
    opt_state = tx.init(tree)

    def loss_fn(tree):
        return jnp.sum(jaxlora.apply(model, {"params": tree["params"]}, tree["lora"], config, x) ** 2)

    for _ in range(3):
        updates, opt_state = tx.update(jax.grad(loss_fn)(tree), opt_state, tree)
        tree = optax.apply_updates(tree, updates)
    for layer, leaf in (("linear1", "kernel"), ("linear1", "bias"), ("linear2", "kernel")):
        np.testing.assert_array_equal(
            np.asarray(tree["params"][layer][leaf]).view(np.uint32), before["params"][layer][leaf].view(np.uint32)
        )
    assert not np.array_equal(tree["params"]["linear2"]["bias"], before["params"]["linear2"]["bias"])  # trains
    assert tree["lora"]["linear1"]["kernel"]["lora_b"].any()


def test_labels_cover_every_leaf_and_agree_with_partition():
    model = MLP((8, 4))
    params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    config = jaxlora.LoraConfig(rank=1, exclude=("linear2/kernel",), modules_to_save=("linear2/bias",))
    _, adapters = jaxlora.init(jax.random.key(1), params, config)
    labels = jaxlora.labels({"params": params, "lora": adapters}, config)
    assert jax.tree.structure(labels) == jax.tree.structure({"params": params, "lora": adapters})
    trainable, _ = jaxlora.partition(params, adapters, config)
    flat = dict(jax.tree_util.tree_flatten_with_path(labels)[0])
    trainable_paths = {kp for kp, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]}
    assert {kp for kp, label in flat.items() if label == "trainable"} == trainable_paths


def test_merging_inside_a_differentiated_step_needs_a_few_kernels_of_scratch_not_one_per_rank():
    # merge sums rank-one products in one pass; its gradient must still be two GEMMs, not r kernel-sized terms
    model = MLP((512, 512))
    x = jax.random.normal(jax.random.key(0), (8, 512))
    params = model.init(jax.random.key(1), x)["params"]
    config = jaxlora.LoraConfig(rank=16, alpha=8.0, targets=("linear1/kernel",))  # scale 0.5
    _, adapters = jaxlora.init(jax.random.key(2), params, config)
    pair = adapters["linear1"]["kernel"]
    pair["lora_b"] = 0.1 * jax.random.normal(jax.random.key(3), pair["lora_b"].shape)  # B != 0

    def loss(adapters, params):
        return jnp.sum(apply_merged(model, params, adapters, config, x) ** 2)

    def reference(a, b):  # plain jnp, differentiated by jax.grad
        h = jax.nn.relu(x @ (params["linear1"]["kernel"] + 0.5 * a @ b) + params["linear1"]["bias"])
        return jnp.sum((h @ params["linear2"]["kernel"] + params["linear2"]["bias"]) ** 2)

    grads = jax.grad(loss)(adapters, params)["linear1"]["kernel"]
    want_a, want_b = jax.grad(reference, argnums=(0, 1))(pair["lora_a"], pair["lora_b"])
    np.testing.assert_allclose(grads["lora_a"], want_a, rtol=1e-4, atol=1e-4 * float(jnp.abs(want_a).max()))
    np.testing.assert_allclose(grads["lora_b"], want_b, rtol=1e-4, atol=1e-4 * float(jnp.abs(want_b).max()))
    stats = jax.jit(jax.grad(loss)).lower(adapters, params).compile().memory_analysis()
    assert stats is not None, "this backend reports no memory analysis: the scratch bound cannot be checked"
    assert stats.temp_size_in_bytes < 4 * 512 * 512 * 4, stats


def test_a_jitted_step_can_report_that_the_adapters_went_non_finite():
    model = MLP((8, 2))
    x = jax.random.normal(jax.random.key(0), (4, 3))
    params = model.init(jax.random.key(1), x)["params"]
    config = jaxlora.LoraConfig(rank=1)
    _, adapters = jaxlora.init(jax.random.key(2), params, config)
    trainable, frozen = jaxlora.partition(params, adapters, config)
    tx = jaxlora.optimizer(optax.sgd(1.0), config)

    @jax.jit
    def step(trainable, opt_state, scale):
        def loss_fn(trainable):
            p, a = jaxlora.combine(trainable, frozen)
            return scale * jnp.sum(jaxlora.apply(model, {"params": p}, a, config, x) ** 2)

        updates, opt_state = tx.update(jax.grad(loss_fn)(trainable), opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, jaxlora.all_finite(trainable)  # merge's own check is silent in jit

    opt_state = tx.init(trainable)
    healthy, opt_state, finite = step(trainable, opt_state, 1e-3)
    assert finite.dtype == jnp.bool_ and bool(finite)
    diverged, _, finite = step(healthy, opt_state, jnp.inf)  # an infinite loss scale: NaN/Inf updates
    assert not bool(finite)
    assert jaxlora.nonfinite_paths(diverged) == [
        "lora/linear1/kernel/lora_a",
        "lora/linear1/kernel/lora_b",
        "lora/linear2/kernel/lora_a",
        "lora/linear2/kernel/lora_b",
    ]
    assert jaxlora.nonfinite_paths(healthy) == [] and bool(jaxlora.all_finite({"none": None, "i": jnp.arange(3)}))
