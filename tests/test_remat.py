"""The models' `remat` option (``Llama(remat=)``, ``GPT2Config(remat=)``): each decoder block rematerialised in the
backward pass under a jax.checkpoint policy.

Properties, for both families:
* the loss and every gradient (LoRA adapters through ``jaxlora.apply_nnx`` / ``jaxlora.apply``, and for Llama the
  base weights of a plain full fine-tuning loss) equal ``jax.grad`` of the same model built without remat, scanned
  and unrolled; cached decoding is unchanged;
* it does what it is for: the compiled LoRA step's XLA scratch (``memory_analysis``) of the scanned layout shrinks
  when the blocks' activations dominate (unrolled, XLA:CPU schedules the recomputation early and saves nothing);
* an unknown policy name is refused naming it and the choices; ``convert_layout`` keeps the option.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlora
from jaxlora.models import gpt2, llama


def _config(**overrides) -> llama.LlamaConfig:
    shape = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2,
    )  # fmt: skip
    return llama.LlamaConfig(**{**shape, **overrides})


def _same_weights(model: llama.Llama, remat) -> llama.Llama:
    """`model`'s weights in a Llama built with `remat` (the reference keeps remat=None)."""
    twin = llama.Llama(model.config, scan_layers=model.scan_layers, remat=remat, rngs=nnx.Rngs(1))
    nnx.update(twin, nnx.state(model, nnx.Param))
    return twin


def _close(got, want) -> None:
    """Equal up to float32 reordering (sums in another order): within 1e-4, relative to the leaf's largest."""
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def _lm_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


@pytest.mark.parametrize(
    ("scan", "remat"),
    [(True, "nothing_saveable"), (False, "dots_with_no_batch_dims_saveable")],
    ids=["scanned", "unrolled"],
)
def test_loss_and_gradients_equal_the_model_without_remat(scan, remat):
    reference = llama.Llama(_config(), scan_layers=scan, rngs=nnx.Rngs(0))
    rematted = _same_weights(reference, remat)
    ids = jax.random.randint(jax.random.key(2), (2, 12), 0, 64)
    params = nnx.state(reference, nnx.Param)
    stacked = llama.STACKED_AXES if scan else {}
    plan = jaxlora.plan(
        params, jaxlora.LoraConfig(rank=4, alpha=8.0, targets=(jaxlora.ALL_KERNELS,), stacked_axes=stacked)
    )
    _, adapters = jaxlora.init(jax.random.key(3), params, plan)
    adapters = jax.tree.map(lambda x: 0.3 * jax.random.normal(jax.random.key(4), x.shape, x.dtype), adapters)

    def lora_loss(adapters, model):
        return _lm_loss(jaxlora.apply_nnx(model, adapters, plan, ids), ids)

    want_loss, want_grads = jax.jit(jax.value_and_grad(lora_loss))(adapters, reference)
    got_loss, got_grads = jax.jit(jax.value_and_grad(lora_loss))(adapters, rematted)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    jax.tree.map(_close, got_grads, want_grads)

    def full_loss(model):
        return _lm_loss(model(ids), ids)

    want = nnx.jit(nnx.grad(full_loss))(reference)
    got = nnx.jit(nnx.grad(full_loss))(rematted)
    jax.tree.map(_close, nnx.state(got, nnx.Param), nnx.state(want, nnx.Param))


def _step_scratch(model: llama.Llama, ids: jax.Array) -> int:
    """XLA scratch bytes of a compiled LoRA r4 gradient step on `model`."""
    params = nnx.state(model, nnx.Param)
    plan = jaxlora.plan(
        params, jaxlora.LoraConfig(rank=4, targets=(jaxlora.ALL_KERNELS,), stacked_axes=llama.STACKED_AXES)
    )
    _, adapters = jaxlora.init(jax.random.key(0), params, plan)
    step = jax.jit(jax.grad(lambda a, m: _lm_loss(jaxlora.apply_nnx(m, a, plan, ids), ids)))
    return step.lower(adapters, model).compile().memory_analysis().temp_size_in_bytes


def test_remat_shrinks_the_step_scratch():
    # Long sequences and many layers: the attention weights and MLP activations every block keeps dominate.
    model = llama.Llama(_config(num_hidden_layers=4, intermediate_size=256), rngs=nnx.Rngs(0))
    ids = jnp.zeros((4, 128), jnp.int32)
    plain = _step_scratch(model, ids)
    rematted = _step_scratch(_same_weights(model, "nothing_saveable"), ids)
    assert rematted < 0.5 * plain, (rematted, plain)


def test_unknown_policy_is_refused_by_name():
    with pytest.raises(ValueError, match=r"remat='dots'.*nothing_saveable.*None"):
        llama.Llama(_config(), remat="dots", rngs=nnx.Rngs(0))


def test_convert_layout_keeps_remat():
    model = llama.Llama(_config(), remat="nothing_saveable", rngs=nnx.Rngs(0))
    assert llama.convert_layout(model, scan_layers=False).remat == "nothing_saveable"
    policy = jax.checkpoint_policies.dots_saveable
    assert llama.Llama(_config(), remat=policy, rngs=nnx.Rngs(0)).remat is policy


GPT2_CONFIG = gpt2.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, dropout=0.0)


@pytest.mark.parametrize(
    ("scan", "remat"),
    [(True, "dots_with_no_batch_dims_saveable"), (False, "nothing_saveable")],
    ids=["scanned", "unrolled"],
)
def test_gpt2_loss_and_adapter_gradients_equal_the_model_without_remat(scan, remat):
    config = dataclasses.replace(GPT2_CONFIG, scan_layers=scan)
    reference, rematted = gpt2.GPT2(config), gpt2.GPT2(dataclasses.replace(config, remat=remat))
    ids = jax.random.randint(jax.random.key(2), (2, 12), 0, 64)
    params = reference.init(jax.random.key(0), ids)["params"]
    blocks = "h" if scan else r"h_\d+"
    lora = jaxlora.LoraConfig(
        rank=4, alpha=8.0, targets=(rf"{blocks}/(attn|mlp)/.*/kernel",), stacked_axes={r"h/.*": 1} if scan else {}
    )
    plan = jaxlora.plan(params, lora)
    _, adapters = jaxlora.init(jax.random.key(3), params, plan)
    adapters = jax.tree.map(lambda x: 0.3 * jax.random.normal(jax.random.key(4), x.shape, x.dtype), adapters)

    def loss(adapters, model):
        return _lm_loss(jaxlora.apply(model, {"params": params}, adapters, plan, ids), ids)

    want_loss, want_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(adapters, reference)
    got_loss, got_grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(adapters, rematted)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    jax.tree.map(_close, got_grads, want_grads)
    want = gpt2.generate(reference, params, ids[:, :5], 4)
    np.testing.assert_array_equal(gpt2.generate(rematted, params, ids[:, :5], 4), want)


def test_gpt2_remat_shrinks_the_step_scratch_and_names_a_bad_policy():
    config = dataclasses.replace(GPT2_CONFIG, n_layer=4, n_positions=128, scan_layers=True)
    ids = jnp.zeros((4, 128), jnp.int32)
    params = gpt2.GPT2(config).init(jax.random.key(0), ids[:, :1])["params"]
    lora = jaxlora.LoraConfig(rank=4, targets=(r"h/(attn|mlp)/.*/kernel",), stacked_axes={r"h/.*": 1})
    plan = jaxlora.plan(params, lora)
    _, adapters = jaxlora.init(jax.random.key(0), params, plan)

    def scratch(model):
        step = jax.jit(jax.grad(lambda a: _lm_loss(jaxlora.apply(model, {"params": params}, a, plan, ids), ids)))
        return step.lower(adapters).compile().memory_analysis().temp_size_in_bytes

    plain = scratch(gpt2.GPT2(config))
    rematted = scratch(gpt2.GPT2(dataclasses.replace(config, remat="nothing_saveable")))
    assert rematted < 0.5 * plain, (rematted, plain)
    with pytest.raises(ValueError, match=r"remat='all'.*nothing_saveable"):
        dataclasses.replace(config, remat="all")
    with pytest.raises(ValueError, match=r"policy name \(it is saved with the config\)"):
        dataclasses.replace(config, remat=jax.checkpoint_policies.nothing_saveable)
