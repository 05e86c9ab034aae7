"""Adapters shard like their base weight, and a training step under a data x model mesh matches one device."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P
from models import MLP

import jaxlora

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jaxlora
    from models import MLP

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    model = MLP((64, 32, 8))
    x = jax.random.normal(jax.random.key(0), (16, 24))
    y = jax.random.randint(jax.random.key(1), (16,), 0, 8)
    params = model.init(jax.random.key(2), x)["params"]
    config = jaxlora.LoraConfig(rank=4, alpha=8.0, modules_to_save=("linear3/bias",), exclude=("linear3/kernel",))
    _, adapters = jaxlora.init(jax.random.key(3), params, config)
    adapters = jax.tree.map(lambda a: a + 0.05, adapters)
    specs = {
        "linear1": {"kernel": P(None, "model"), "bias": P("model")},
        "linear2": {"kernel": P("model", None), "bias": P()},
        "linear3": {"kernel": P(), "bias": P()},
    }
    param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))
    adapter_sh = jaxlora.adapter_shardings(params, param_sh, config)
    assert adapter_sh["linear1"]["kernel"]["lora_b"].spec == P(None, "model")
    assert adapter_sh["linear2"]["kernel"]["lora_a"].spec == P("model", None)
    tx = jaxlora.optimizer(optax.adam(1e-2), config)

    def step(trainable, frozen, opt_state, x, y):
        def loss_fn(trainable):
            p, a = jaxlora.combine(trainable, frozen)
            logits = jaxlora.apply(model, {"params": p}, a, config, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    def run(params, adapters, x, y):
        trainable, frozen = jaxlora.partition(params, adapters, config)
        opt_state = tx.init(trainable)
        jitted = jax.jit(step)
        losses = []
        for _ in range(3):
            trainable, opt_state, loss = jitted(trainable, frozen, opt_state, x, y)
            losses.append(float(loss))
        return trainable, losses

    single, single_losses = run(params, adapters, x, y)
    batch_sh = NamedSharding(mesh, P("data"))
    sharded, sharded_losses = run(
        jax.device_put(params, param_sh), jax.device_put(adapters, adapter_sh),
        jax.device_put(x, batch_sh), jax.device_put(y, batch_sh),
    )
    assert len(sharded["lora"]["linear1"]["kernel"]["lora_b"].sharding.device_set) == 8
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), sharded, single)
    print("SHARDED_OK", sharded_losses)
    """
)


@pytest.mark.slow  # end to end (see pyproject.toml: --all and .ci/run run it)
def test_sharded_training_step_on_8_simulated_devices_matches_one_device(tmp_path):
    env = dict(
        os.environ,
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
    )
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "SHARDED_OK" in result.stdout


def test_adapter_specs_follow_the_kernel_input_and_output_axes():
    params = jax.eval_shape(MLP((6, 4)).init, jax.random.key(0), jax.numpy.ones((1, 5)))["params"]
    specs = {"linear1": {"kernel": P("x", "y"), "bias": P("y")}, "linear2": {"kernel": P(None, "y"), "bias": P()}}
    out = jaxlora.adapter_specs(params, specs, jaxlora.LoraConfig(rank=2))
    assert out["linear1"]["kernel"] == {"lora_a": P("x", None), "lora_b": P(None, "y")}
    assert out["linear2"]["kernel"] == {"lora_a": P(None, None), "lora_b": P(None, "y")}
