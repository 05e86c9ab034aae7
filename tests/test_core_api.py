"""The core's shape: an immutable, hashable config; one plan resolved once and checked against its params; a
registry of layer kinds that a user extends; `apply` keywords that always reach the model; a layout in which no
public module is named like a public function."""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import inspect
import pkgutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from models import MLP

import jaxlora

# ---------------------------------------------------------------------------------------------------------------
# LoraConfig: immutable and hashable


def test_config_is_hashable_immutable_and_a_valid_static_jit_argument():
    config = jaxlora.LoraConfig(rank=2, alpha=4.0, rank_pattern={"a/kernel": 1}, fan_in_ndim={"b/kernel": 2})
    same = jaxlora.LoraConfig(rank=2, alpha=4.0, rank_pattern={"a/kernel": 1}, fan_in_ndim={"b/kernel": 2})
    assert config == same and hash(config) == hash(same)
    traces = []

    @jax.jit
    def scaled(x):
        return x

    def f(x, config):
        traces.append(config)
        return x * config.alpha

    jitted = jax.jit(f, static_argnums=1)
    assert float(jitted(jnp.float32(2.0), config)) == 8.0
    assert float(jitted(jnp.float32(3.0), same)) == 12.0
    assert len(traces) == 1  # an equal config hits the same compiled function
    jitted(jnp.float32(3.0), dataclasses.replace(config, alpha=2.0))
    assert len(traces) == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rank = 3
    with pytest.raises(TypeError):
        config.rank_pattern["c/kernel"] = 4  # a FrozenMapping, not a dict
    with pytest.raises(AttributeError):
        config.rank_pattern.update({"c/kernel": 4})


def test_config_equality_sees_every_field_that_changes_behaviour():
    base = jaxlora.LoraConfig(rank=2, rank_pattern={"a": 1, "b": 3})
    # first-match pattern tables: another order is another behaviour
    assert base != jaxlora.LoraConfig(rank=2, rank_pattern={"b": 3, "a": 1})
    keep = lambda path, leaf: True
    assert jaxlora.LoraConfig(predicate=keep) != jaxlora.LoraConfig(predicate=lambda path, leaf: False)
    assert jaxlora.LoraConfig(predicate=keep) == jaxlora.LoraConfig(predicate=keep)
    for field, value in [("dropout", 0.1), ("use_rslora", True), ("init", "gaussian"), ("fan_in_ndim", {"a": 1})]:
        assert base != dataclasses.replace(base, **{field: value}), field


# ---------------------------------------------------------------------------------------------------------------
# One plan, resolved once


def _mlp():
    model = MLP((8, 4))
    x = jax.random.normal(jax.random.key(0), (3, 6))
    return model, x, model.init(jax.random.key(1), x)["params"]


def test_a_held_plan_is_accepted_everywhere_and_never_resolved_again(monkeypatch):
    model, x, params = _mlp()
    config = jaxlora.LoraConfig(rank=2, alpha=4.0, modules_to_save=("linear2/bias",), exclude=("linear2/kernel",))
    plan = jaxlora.plan(params, config)
    from jaxlora._src import planning

    def no_resolving(*args, **kwargs):
        raise AssertionError("the plan was resolved again")

    monkeypatch.setattr(planning, "plan", no_resolving)
    params, adapters = jaxlora.init(jax.random.key(2), params, plan)
    adapters = jax.tree.map(lambda a: a + 0.1, adapters)
    merged = jaxlora.merge(params, adapters, plan)
    np.testing.assert_allclose(
        jaxlora.unmerge(merged, adapters, plan)["linear1"]["kernel"], params["linear1"]["kernel"], atol=1e-6
    )
    out = jaxlora.apply(model, {"params": params}, adapters, plan, x)
    np.testing.assert_allclose(out, model.apply({"params": merged}, x), rtol=1e-5, atol=1e-6)
    trainable, _ = jaxlora.partition(params, adapters, plan)
    labels = jaxlora.labels(trainable, plan)
    assert labels["params"]["linear2"]["bias"] == "trainable" and labels["lora"]["linear1"]["kernel"]["lora_a"]
    jaxlora.optimizer(__import__("optax").sgd(0.1), plan).init(trainable)
    specs = {"linear1": {"kernel": jax.P(None, "model"), "bias": None}, "linear2": {"kernel": None, "bias": None}}
    assert jaxlora.adapter_specs(plan, specs)["linear1"]["kernel"]["lora_b"] == jax.P(None, "model")


def test_a_plan_is_hashable_and_usable_as_a_static_argument():
    model, x, params = _mlp()
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
    assert hash(plan) == hash(jaxlora.plan(params, jaxlora.LoraConfig(rank=2)))
    _, adapters = jaxlora.init(jax.random.key(2), params, plan)
    step = jax.jit(lambda p, a, x, plan: jaxlora.apply(model, {"params": p}, a, plan, x), static_argnums=3)
    np.testing.assert_array_equal(step(params, adapters, x, plan), model.apply({"params": params}, x))


def test_a_plan_built_for_other_params_is_refused_naming_the_leaf():
    model, x, params = _mlp()
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
    _, adapters = jaxlora.init(jax.random.key(2), params, plan)
    wider = MLP((8, 5)).init(jax.random.key(1), x)["params"]
    with pytest.raises(
        ValueError,
        match=r"Plan was built for other params: at 'linear2/bias' .*\(4,\).*\(5,\).*"
        r"jaxlora\.plan\(params, config\)",
    ):
        jaxlora.merge(wider, adapters, plan)
    half = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
    with pytest.raises(ValueError, match=r"at 'linear1/bias' it expects a float32 array .* have a bfloat16 array"):
        jaxlora.apply(model, {"params": half}, adapters, plan, x)
    deeper = {"extra": {"kernel": jnp.ones((2, 2))}, **params}
    with pytest.raises(ValueError, match=r"at 'extra/kernel' it expects no such leaf"):
        jaxlora.partition(deeper, adapters, plan)


# ---------------------------------------------------------------------------------------------------------------
# The registry of layer kinds


class Projection(nn.Module):
    """A user layer computing x W with its own dot_general, which jaxlora knows nothing about."""

    features: int

    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ()))) + 1.0


class UsesProjection(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Projection(3, name="proj")(jnp.tanh(Projection(5, name="inner")(x)))


@pytest.fixture
def projection_registered():
    jaxlora.register_layer(Projection)
    yield
    jaxlora.unregister_layer(Projection)


def _user_setup():
    model = UsesProjection()
    x = jax.random.normal(jax.random.key(0), (4, 6))
    params = model.init(jax.random.key(1), x)["params"]
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, alpha=3.0))
    params, adapters = jaxlora.init(jax.random.key(2), params, plan)
    keys = iter(jax.random.split(jax.random.key(3), 8))
    adapters = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(next(keys), a.shape), adapters)
    return model, x, params, plan, adapters


def _reference(params, adapters, x, scale):
    """UsesProjection in plain jnp with the LoRA update written out: x W + 1 + s·(x A) B, per layer."""

    def layer(p, a, x):
        return x @ p["kernel"] + 1.0 + scale * (x @ a["kernel"]["lora_a"]) @ a["kernel"]["lora_b"]

    h = jnp.tanh(layer(params["inner"], adapters["inner"], x))
    return layer(params["proj"], adapters["proj"], h)


def test_an_unregistered_user_layer_is_served_by_its_dot_general_under_strict():
    model, x, params, plan, adapters = _user_setup()
    out = jaxlora.apply_fn(model, plan, strict=True)({"params": params}, adapters, x)
    np.testing.assert_allclose(out, _reference(params, adapters, x, 1.5), rtol=1e-5, atol=1e-5)


def test_a_registered_user_layer_is_served_factored_with_reference_gradients(projection_registered):
    model, x, params, plan, adapters = _user_setup()
    strict = jaxlora.apply_fn(model, plan, strict=True)  # refuses anything it would have to merge
    out = strict({"params": params}, adapters, x)
    merged = model.apply({"params": jaxlora.merge(params, adapters, plan)}, x)
    np.testing.assert_allclose(out, merged, rtol=1e-5, atol=1e-5)

    def loss(adapters, params, x):
        return jnp.sum(jnp.sin(strict({"params": params}, adapters, x)))

    def reference_loss(adapters, params, x):
        return jnp.sum(jnp.sin(_reference(params, adapters, x, 1.5)))

    got = jax.grad(loss, argnums=(0, 1, 2))(adapters, params, x)
    want = jax.grad(reference_loss, argnums=(0, 1, 2))(adapters, params, x)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5), got, want)
    # factored: the compiled step never builds W + s·A B (no (6, 5) array beyond W itself in the jaxpr's dots)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(adapters, params, x)
    assert "add" not in {str(e.primitive) for e in jaxpr.eqns if e.outvars and e.outvars[0].aval.shape == (6, 5)}


class NnxProjection(nnx.Module):
    """Projection's NNX twin: x W through its own dot_general."""

    def __init__(self, fan_in: int, features: int, rngs: nnx.Rngs):
        self.kernel = nnx.Param(nn.initializers.lecun_normal()(rngs.params(), (fan_in, features)))

    def __call__(self, x):
        return jax.lax.dot_general(x, self.kernel[...], (((x.ndim - 1,), (0,)), ((), ())))


def test_a_registered_kind_without_dora_support_refuses_a_dora_adapter_naming_layer_path_and_fix():
    """A kind that does not declare supports_dora must refuse DoRA, not serve it as plain LoRA (dropping m)."""
    dora = jaxlora.LoraConfig(rank=2, use_dora=True)
    model, x = UsesProjection(), jnp.ones((2, 6))
    params = model.init(jax.random.key(0), x)["params"]
    plan = jaxlora.plan(params, dora)
    _, adapters = jaxlora.init(jax.random.key(1), params, plan)
    layer = NnxProjection(6, 3, nnx.Rngs(0))
    nnx_plan = jaxlora.plan(nnx.state(layer, nnx.Param), dora)
    _, nnx_adapters = jaxlora.init(jax.random.key(1), nnx.state(layer, nnx.Param), nnx_plan)
    for registered in (Projection, NnxProjection):
        jaxlora.register_layer(registered)
    try:
        want = r"DoRA \(use_dora=True\) is not supported for {} layers \(at '{}'\).*exclude this layer from the targets"
        with pytest.raises(ValueError, match=want.format("Projection", "inner/kernel")):
            jaxlora.apply(model, {"params": params}, adapters, plan, x)
        with pytest.raises(ValueError, match=want.format("NnxProjection", "kernel")):
            jaxlora.apply_nnx(layer, nnx_adapters, nnx_plan, x)
    finally:
        for registered in (Projection, NnxProjection):
            jaxlora.unregister_layer(registered)


def test_registering_bad_input_is_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"needs a flax module class .* got <function"):
        jaxlora.register_layer(lambda x: x)
    with pytest.raises(TypeError, match="needs a flax module class"):
        jaxlora.register_layer(Projection(3))  # an instance, not the class
    with pytest.raises(ValueError, match=r"Dense is registered already; call jaxlora\.unregister_layer\(Dense\)"):
        jaxlora.register_layer(nn.Dense)
    with pytest.raises(KeyError, match="no layer kind is registered"):
        jaxlora.unregister_layer(Projection)


def test_built_in_kinds_are_registered_through_the_same_registry():
    kinds = jaxlora.layers.registered_layers()
    assert {nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.Embed} <= set(kinds)
    assert kinds[nn.Embed].param == "embedding" and "attend" in kinds[nn.Embed].methods


# ---------------------------------------------------------------------------------------------------------------
# Model keywords always reach the model


class Keywords(nn.Module):
    @nn.compact
    def __call__(self, x, mode="plain", strict=False, dropout_rng=None, fast_dense=None):
        y = nn.Dense(3)(x)
        return y * (2.0 if mode == "double" else 1.0) + (10.0 if strict else 0.0)


def test_a_model_keyword_named_like_a_jaxlora_option_reaches_the_model():
    model = Keywords()
    x = jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)["params"]
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=1))
    _, adapters = jaxlora.init(jax.random.key(1), params, plan)
    plain = jaxlora.apply(model, {"params": params}, adapters, plan, x)
    got = jaxlora.apply(model, {"params": params}, adapters, plan, x, mode="double", strict=True)
    np.testing.assert_allclose(got, 2 * plain + 10.0)
    want = model.apply({"params": params}, x, mode="double", strict=True, dropout_rng=1, fast_dense=2)
    got = jaxlora.apply(
        model, {"params": params}, adapters, plan, x, mode="double", strict=True, dropout_rng=1, fast_dense=2
    )
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------------------------
# Layout and documentation


def _public_modules():
    yield jaxlora
    for info in pkgutil.walk_packages(jaxlora.__path__, "jaxlora."):
        if "._" not in info.name and info.name != "jaxlora.peft":  # jaxlora.peft: 0.1's deprecated alias
            yield importlib.import_module(info.name)


def test_no_public_module_shares_a_name_with_a_public_function():
    functions = {
        name
        for module in _public_modules()
        for name, value in vars(module).items()
        if not name.startswith("_") and inspect.isfunction(value)
    }
    modules = {module.__name__.rpartition(".")[2] for module in _public_modules()}
    assert not modules & functions, modules & functions
    assert "peft" not in modules  # it would shadow the `peft` package in `from jaxlora import *` users
    assert "peft" not in jaxlora.__all__  # the deprecated alias jaxlora.peft is not exported either


def test_every_public_function_documents_args_and_has_a_runnable_example_that_runs():
    core = [jaxlora, jaxlora.checkpoint, jaxlora.peft_format, jaxlora.layers]
    documented = 0
    for module in core:
        for name in getattr(module, "__all__", ()):
            value = getattr(module, name)
            if not inspect.isfunction(value):
                continue
            doc = inspect.getdoc(value) or ""
            takes_args = bool(inspect.signature(value).parameters)
            assert "Args:" in doc or not takes_args, f"{module.__name__}.{name} lacks Args"
            assert "Returns:" in doc, f"{module.__name__}.{name} lacks Returns"
            assert ">>>" in doc or "Example:\n  See `" in doc, f"{module.__name__}.{name} has no example"
            documented += 1
    assert documented >= 25
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for module in core:
        for name in getattr(module, "__all__", ()):
            for test in finder.find(getattr(module, name), name, globs={}):
                runner.run(test)
    assert runner.failures == 0 and runner.tries >= 15, (runner.failures, runner.tries)


def _forget_the_old_peft_module(monkeypatch):
    """As in a fresh process: jaxlora.peft not imported yet (the shim warns when it is first imported)."""
    if "peft" in vars(jaxlora):  # not hasattr: jaxlora.__getattr__ would import the shim
        monkeypatch.delattr(jaxlora, "peft")
    monkeypatch.delitem(sys.modules, "jaxlora.peft", raising=False)


@pytest.mark.parametrize(
    "statement",
    [
        "from jaxlora.peft import load_peft, save_peft",  # the forms the migration note promises
        "import jaxlora.peft; load_peft, save_peft = jaxlora.peft.load_peft, jaxlora.peft.save_peft",
        "from jaxlora import peft; load_peft, save_peft = peft.load_peft, peft.save_peft",
        "import jaxlora; load_peft, save_peft = jaxlora.peft.load_peft, jaxlora.peft.save_peft",
    ],
)
def test_the_old_peft_module_name_still_works_with_a_deprecation_warning(monkeypatch, statement):
    _forget_the_old_peft_module(monkeypatch)
    names = {}
    with pytest.warns(DeprecationWarning, match=r"jaxlora.peft is now jaxlora.peft_format"):
        exec(statement, names)
    assert names["load_peft"] is jaxlora.peft_format.load_peft
    assert names["save_peft"] is jaxlora.peft_format.save_peft
    assert "peft" not in jaxlora.__all__  # `from jaxlora import *` never shadows the `peft` package
