"""NNX modules served factored: every layer kind, stacked layers inside nnx.scan, training with optax, the frozen
base bit-for-bit unchanged. References are plain jnp formulas differentiated by `jax.grad`."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxlora


def _randomize(adapters, seed=3, size=0.3):
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [x + size * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


def _merged_call(module, adapters, plan, *args):
    """The reference for factored serving: the module with W + s·A B written into a copy of its params."""
    graphdef, state = nnx.split(module)
    copy = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))  # fresh Variables, not the module's own
    nnx.update(copy, jaxlora.merge(nnx.state(module, nnx.Param), adapters, plan))
    return copy(*args)


class Zoo(nnx.Module):
    """One of every nnx layer kind: Embed (lookup and attend), LinearGeneral, Einsum, Conv, Linear."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(32, 12, rngs=rngs)
        self.heads = nnx.LinearGeneral(12, (3, 4), rngs=rngs)
        self.merge_heads = nnx.LinearGeneral((3, 4), 12, axis=(-2, -1), rngs=rngs)
        self.einsum = nnx.Einsum("btd,de->bte", (12, 10), rngs=rngs)
        self.conv = nnx.Conv(10, 12, kernel_size=(3,), padding="SAME", rngs=rngs)
        self.linear = nnx.Linear(12, 12, rngs=rngs)

    def __call__(self, tokens):
        x = self.merge_heads(self.heads(self.embed(tokens)))
        x = self.linear(self.conv(self.einsum(x)))
        return self.embed.attend(x)


ZOO_CONFIG = jaxlora.LoraConfig(
    rank=2,
    alpha=3.0,
    targets=(jaxlora.ALL_KERNELS, jaxlora.ALL_EMBEDDINGS),
    fan_in_ndim={"heads/kernel": 1, "merge_heads/kernel": 2},
)


def test_every_nnx_layer_kind_is_served_factored_and_matches_merged():
    zoo = Zoo(nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 5), 0, 32)
    params = nnx.state(zoo, nnx.Param)
    plan = jaxlora.plan(params, ZOO_CONFIG)
    _, adapters = jaxlora.init(jax.random.key(2), params, plan)
    np.testing.assert_array_equal(jaxlora.apply_nnx(zoo, adapters, plan, tokens), zoo(tokens))  # B = 0
    adapters = _randomize(adapters)
    out = jaxlora.apply_nnx_fn(plan, strict=True)(zoo, adapters, tokens)
    merged = _merged_call(zoo, adapters, plan, tokens)
    assert float(jnp.abs(merged - zoo(tokens)).max()) > 1e-2
    np.testing.assert_allclose(out, merged, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(nnx.state(zoo, nnx.Param)["linear"]["kernel"][...], params["linear"]["kernel"][...])


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(8, 16, rngs=rngs)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def _mlp_reference(params, adapters, x, scale):
    def linear(p, a, x):
        y = x @ p["kernel"] + p["bias"]
        return y if a is None else y + scale * (x @ a["kernel"]["lora_a"]) @ a["kernel"]["lora_b"]

    h = jax.nn.relu(linear(params["hidden"], adapters.get("hidden"), x))
    return linear(params["out"], adapters.get("out"), h)


def _values(state):
    return jax.tree.map(lambda v: v, nnx.to_pure_dict(state))


def test_nnx_gradients_equal_autodiff_of_a_plain_jnp_reference():
    model = MLP(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (5, 8))
    params = nnx.state(model, nnx.Param)
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, alpha=6.0))
    _, adapters = jaxlora.init(jax.random.key(2), params, plan)
    adapters = _randomize(adapters)
    forward = jaxlora.apply_nnx_fn(plan, strict=True)
    pure = _values(params)
    np.testing.assert_allclose(forward(model, adapters, x), _mlp_reference(pure, adapters, x, 3.0), atol=1e-5)
    got = jax.grad(lambda a, x: jnp.sum(jnp.sin(forward(model, a, x))), argnums=(0, 1))(adapters, x)
    want = jax.grad(lambda a, x: jnp.sum(jnp.sin(_mlp_reference(pure, a, x, 3.0))), argnums=(0, 1))(adapters, x)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5), got, want)


def test_training_with_optax_leaves_the_frozen_nnx_base_bit_for_bit_unchanged():
    model = MLP(nnx.Rngs(0))
    model.hidden.bias[...] = model.hidden.bias[...].at[:4].set(-0.0)
    before = jax.tree.map(np.array, _values(nnx.state(model)))
    x = jax.random.normal(jax.random.key(1), (16, 8))
    y = jax.random.randint(jax.random.key(2), (16,), 0, 3)
    params = nnx.state(model, nnx.Param)
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, alpha=4.0))
    _, adapters = jaxlora.init(jax.random.key(3), params, plan)
    graphdef, state = nnx.split(model)
    tx = optax.adam(3e-2)
    opt_state = tx.init(adapters)

    @jax.jit
    def step(adapters, opt_state, state):
        def loss_fn(adapters):
            logits = jaxlora.apply_nnx(nnx.merge(graphdef, state), adapters, plan, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(adapters, updates), opt_state, loss

    losses = []
    for _ in range(20):
        adapters, opt_state, loss = step(adapters, opt_state, state)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0]
    after = jax.tree.map(np.array, _values(nnx.state(model)))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert a.tobytes() == b.tobytes()  # bit for bit, -0.0 included


LAYERS, WIDTH = 3, 16


class ScannedMLP(nnx.Module):
    """Blocks stacked with nnx.vmap and run with nnx.scan, as modern NNX LLMs do."""

    def __init__(self, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return Block(rngs)

        self.layers = create(rngs)
        self.head = nnx.Linear(WIDTH, 2, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(h, block):
            return block(h)

        return self.head(body(x, self.layers))


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(WIDTH, 2 * WIDTH, rngs=rngs)
        self.down = nnx.Linear(2 * WIDTH, WIDTH, rngs=rngs)

    def __call__(self, h):
        return h + self.down(jnp.tanh(self.up(h)))


def _scanned_reference(params, adapters, x, scale):
    def linear(p, a, h, layer):
        y = h @ p["kernel"][layer] + p["bias"][layer]
        return y + scale * (h @ a["kernel"]["lora_a"][layer]) @ a["kernel"]["lora_b"][layer]

    p, a, h = params["layers"], adapters["layers"], x
    for layer in range(LAYERS):
        h = h + linear(p["down"], a["down"], jnp.tanh(linear(p["up"], a["up"], h, layer)), layer)
    return h @ params["head"]["kernel"] + params["head"]["bias"]


SCAN_CONFIG = jaxlora.LoraConfig(rank=2, alpha=4.0, targets=("layers/.*/kernel",), stacked_axes={"layers/.*": 1})


def test_an_nnx_scan_model_is_served_per_layer_and_matches_the_unrolled_reference():
    model = ScannedMLP(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, WIDTH))
    params = nnx.state(model, nnx.Param)
    plan = jaxlora.plan(params, SCAN_CONFIG)
    _, adapters = jaxlora.init(jax.random.key(2), params, plan)
    assert adapters["layers"]["up"]["kernel"]["lora_b"].shape == (LAYERS, 2, 2 * WIDTH)
    np.testing.assert_array_equal(jaxlora.apply_nnx(model, adapters, plan, x), model(x))  # B = 0
    adapters = _randomize(adapters)
    forward = jaxlora.apply_nnx_fn(plan, strict=True)
    pure = _values(params)
    np.testing.assert_allclose(forward(model, adapters, x), _scanned_reference(pure, adapters, x, 2.0), atol=1e-5)
    # Both gradients under jit: one compile each (eagerly, each op of the scans compiles on its own: most of the time).
    got = jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(forward(model, a, x)))))(adapters)
    want = jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(_scanned_reference(pure, a, x, 2.0)))))(adapters)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5), got, want)
    kernels = {(WIDTH, 2 * WIDTH), (2 * WIDTH, WIDTH), (LAYERS, WIDTH, 2 * WIDTH), (LAYERS, 2 * WIDTH, WIDTH)}
    jaxpr = jax.make_jaxpr(jax.grad(lambda a: jnp.sum(forward(model, a, x))))(adapters).jaxpr
    assert _shaped(jaxpr, kernels) == []


def _shaped(jaxpr, shapes):
    found = []
    for eqn in jaxpr.eqns:
        found += [tuple(v.aval.shape) for v in eqn.outvars if tuple(getattr(v.aval, "shape", ())) in shapes]
        for sub in jax.core.jaxprs_in_params(eqn.params):
            found += _shaped(sub, shapes)
    return found


class Custom(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (6, 4)))

    def __call__(self, x):
        return jnp.einsum("bi,io->bo", x, self.kernel[...])


class Reshaping(nnx.Module):  # reads its kernel through a reshape, which has no factored form
    def __init__(self, rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (6, 4)))

    def __call__(self, x):
        return x @ self.kernel[...].reshape(3, 2, 4).reshape(6, 4)


def test_an_unregistered_nnx_layer_is_served_by_its_einsum_and_an_unservable_one_is_merged_or_refused():
    class Holder(nnx.Module):
        def __init__(self, rngs):
            self.custom = Custom(rngs)
            self.odd = Reshaping(rngs)

        def __call__(self, x):
            return self.odd(x) + self.custom(x)

    model = Holder(nnx.Rngs(0))
    x = jnp.ones((2, 6))
    params = nnx.state(model, nnx.Param)
    served = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, targets=("custom/kernel",)))
    _, adapters = jaxlora.init(jax.random.key(1), params, served)
    adapters = _randomize(adapters)
    out = jaxlora.apply_nnx_fn(served, strict=True)(model, adapters, x)  # no register_layer needed
    np.testing.assert_allclose(out, _merged_call(model, adapters, served, x), atol=1e-5)

    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
    _, adapters = jaxlora.init(jax.random.key(1), params, plan)
    adapters = _randomize(adapters)
    before = np.array(model.odd.kernel[...])
    with pytest.warns(UserWarning, match=r"\n  odd/kernel: it goes through `reshape`"):
        out = jaxlora.apply_nnx(model, adapters, plan, x)
    np.testing.assert_array_equal(model.odd.kernel[...], before)  # merged for that use, never into the module
    np.testing.assert_allclose(out, _merged_call(model, adapters, plan, x), atol=1e-5)
    with pytest.raises(ValueError, match=r"strict=True.*\n  odd/kernel: it goes through `reshape`") as refused:
        jaxlora.apply_nnx_fn(plan, strict=True)(model, adapters, x)
    assert "custom/kernel" not in str(refused.value)  # only the leaf that cannot be served is named


@nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
def _module_level_body(h, block):  # one function object for every call: nnx.scan may reuse its trace
    return block(h)


class ReusedScan(ScannedMLP):
    def __call__(self, x):
        return self.head(_module_level_body(x, self.layers))


def test_a_reused_scan_trace_serves_each_call_with_its_own_adapters_and_scale():
    model = ReusedScan(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, WIDTH))
    params = nnx.state(model, nnx.Param)
    pure = _values(params)
    first = jaxlora.plan(params, SCAN_CONFIG)
    _, adapters = jaxlora.init(jax.random.key(2), params, first)
    adapters = _randomize(adapters)
    for alpha, seed in ((4.0, 0), (12.0, 1), (12.0, 2)):  # the same shapes each time: a trace may be reused
        plan = jaxlora.plan(params, dataclasses.replace(SCAN_CONFIG, alpha=alpha))
        these = _randomize(adapters, seed=seed)
        out = jaxlora.apply_nnx_fn(plan, strict=True)(model, these, x)
        np.testing.assert_allclose(out, _scanned_reference(pure, these, x, alpha / 2), rtol=1e-5, atol=1e-5)


def test_nnx_optimizer_on_an_adapter_module_trains_like_optax_on_the_pytree():
    model = MLP(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (16, 8))
    y = jax.random.randint(jax.random.key(2), (16,), 0, 3)
    params = nnx.state(model, nnx.Param)
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, alpha=4.0))
    _, adapters = jaxlora.init(jax.random.key(3), params, plan)
    before = jax.tree.map(np.array, _values(nnx.state(model)))

    def loss_fn(adapters):
        logits = jaxlora.apply_nnx(model, adapters, plan, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    tx = optax.adam(3e-2)
    tree, opt_state = adapters, tx.init(adapters)
    for _ in range(3):  # the optax route on the plain pytree: the reference
        updates, opt_state = tx.update(jax.grad(loss_fn)(tree), opt_state)
        tree = optax.apply_updates(tree, updates)

    module = jaxlora.AdapterModule(adapters)
    optimizer = nnx.Optimizer(module, tx, wrt=nnx.Param)
    for _ in range(3):
        optimizer.update(module, nnx.grad(loss_fn)(module))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), module.tree(), tree)
    assert not np.allclose(module.tree()["hidden"]["kernel"]["lora_b"], 0.0)
    after = jax.tree.map(np.array, _values(nnx.state(model)))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        assert a.tobytes() == b.tobytes()
