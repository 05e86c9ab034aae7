"""The adapter bank on NNX models (`jaxlora.apply_bank_nnx`): nnx Linear, LinearGeneral, Einsum and Embed (lookup
and tied `attend`), in a plain module and in the Llama decoder, scanned by `nnx.scan` or unrolled.

Properties: a mixed batch equals each row run alone through the model with its adapter merged (the base model for
-1); the gradient each slot receives equals `jax.grad` of the merged model on that slot's rows, and unused slots get
exactly zero; uses with no per-example form are refused, naming the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlora
from jaxlora.models import llama


class Tower(nnx.Module):
    """Every nnx layer kind a bank serves: Embed lookup, LinearGeneral to heads and back, Einsum, Linear, attend."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(32, 12, rngs=rngs)
        self.heads = nnx.LinearGeneral(12, (3, 4), rngs=rngs)
        self.merge_heads = nnx.LinearGeneral((3, 4), 12, axis=(-2, -1), rngs=rngs)
        self.mix = nnx.Einsum("btd,de->bte", (12, 12), (12,), rngs=rngs)
        self.dense = nnx.Linear(12, 12, rngs=rngs)

    def __call__(self, tokens):
        x = self.heads(self.embed(tokens))
        x = self.dense(self.mix(self.merge_heads(nnx.relu(x))))
        return self.embed.attend(x)


def _noisy(adapters, seed: int):
    """Trained-looking adapters: every A and B non-zero."""
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noise = [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(tree, noise)


def _entries(params, configs, seed: int):
    entries = []
    for i, config in enumerate(configs):
        plan = jaxlora.plan(params, config)
        _, adapters = jaxlora.init(jax.random.key(seed + i), params, plan)
        entries.append((_noisy(adapters, seed + 100 + i), plan))
    return entries


@functools.cache
def _tower():
    model = Tower(nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    heads = {r"heads/kernel": 1}  # (12,) -> (3, 4); merge_heads contracts its two leading axes (the default)
    configs = [
        jaxlora.LoraConfig(rank=2, alpha=4.0, targets=(jaxlora.ALL_KERNELS, jaxlora.ALL_EMBEDDINGS), fan_in_ndim=heads),
        jaxlora.LoraConfig(rank=4, alpha=2.0, targets=(r"heads/kernel", r"mix/kernel"), fan_in_ndim=heads),
        jaxlora.LoraConfig(rank=1, alpha=3.0, targets=(r"embed/embedding", r"merge_heads/kernel", r"dense/kernel")),
    ]
    tokens = jax.random.randint(jax.random.key(4), (6, 5), 0, 32)
    return model, params, tuple(_entries(params, configs, 10)), tokens


@functools.cache
def _llama(scan: bool):
    config = llama.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = llama.Llama(config, scan_layers=scan, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    stacked = llama.STACKED_AXES if scan else {}
    configs = [
        jaxlora.LoraConfig(rank=2, alpha=4.0, targets=(r".*/(q|k|v|o)_proj/kernel",), stacked_axes=stacked),
        jaxlora.LoraConfig(
            rank=4, alpha=2.0, targets=(jaxlora.ALL_KERNELS, jaxlora.ALL_EMBEDDINGS), stacked_axes=stacked
        ),
        jaxlora.LoraConfig(rank=1, alpha=3.0, targets=(r".*/mlp/.*/kernel",), stacked_axes=stacked),
    ]
    tokens = jax.random.randint(jax.random.key(5), (5, 7), 0, 40)
    return model, params, tuple(_entries(params, configs, 20)), tokens


def _merged_call(model, params, merged_params, tokens):
    """The model with `merged_params` in place of its params, called on `tokens` (the user's module untouched)."""
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, merged_params, rest)(tokens)


def _rowwise(model, params, entries, slots, tokens):
    """Each row run alone with its adapter merged into the params (the base params for -1)."""
    rows = []
    for row, slot in enumerate(slots):
        merged = params if slot == -1 else jaxlora.merge(params, *entries[slot])
        rows.append(_merged_call(model, params, merged, tokens[row : row + 1])[0])
    return np.stack(rows)


def _cases():
    return [pytest.param(_tower, id="nnx-layers"), pytest.param(lambda: _llama(False), id="llama-unrolled"),
            pytest.param(lambda: _llama(True), id="llama-scanned")]  # fmt: skip


@pytest.mark.parametrize("case", _cases())
def test_a_mixed_batch_equals_each_row_alone_with_its_adapter_merged(case):
    model, params, entries, tokens = case()
    bank = jaxlora.adapter_bank(list(entries), names=("a", "b", "c"))
    slots = [0, -1, 2, 1, 0][: tokens.shape[0]] + [1] * (tokens.shape[0] - 5)
    forward = jax.jit(lambda bank, ids, x: jaxlora.apply_bank_nnx(model, bank, ids, x))
    got = forward(bank, bank.ids(slots), tokens)
    want = _rowwise(model, params, entries, slots, tokens)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    eager = jaxlora.apply_bank_nnx(model, bank, bank.ids(slots), tokens)  # op by op: base rows bit for bit
    np.testing.assert_array_equal(eager[1], model(tokens)[1])


def _row_loss(logits, targets):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1).sum()


@pytest.mark.parametrize("case", _cases())
def test_each_slot_gets_the_gradient_of_its_own_rows_and_unused_slots_none(case):
    model, params, entries, tokens = case()
    entries = list(entries[:2])
    bank = jaxlora.adapter_bank([*entries, entries[0]])  # slot 2 unused by the batch
    slots = [0, 1, -1, 0, 1][: tokens.shape[0]] + [1] * (tokens.shape[0] - 5)
    targets = jnp.roll(tokens, 1, axis=1)
    loss = lambda bank: _row_loss(jaxlora.apply_bank_nnx(model, bank, bank.ids(slots), tokens), targets)
    grads = jax.jit(jax.grad(loss))(bank)
    for slot, (adapters, plan) in enumerate(entries):
        rows = np.array([s == slot for s in slots])

        def merged_loss(adapters, plan=plan, rows=rows):  # plain autodiff through W + s·A B
            merged = jaxlora.merge(params, adapters, plan)
            return _row_loss(_merged_call(model, params, merged, tokens[rows]), targets[rows])

        want = plan.check_adapters(jax.grad(merged_loss)(adapters))  # {path: {"lora_a": ..., "lora_b": ...}}
        for path, leaf in plan.leaves.items():
            r, k = leaf.rank, leaf.stacked_axes
            np.testing.assert_allclose(grads.a[path][slot][..., :r], want[path]["lora_a"], atol=1e-4, rtol=1e-4)
            b = grads.b[path][slot][(slice(None),) * k + (slice(0, r),)]
            np.testing.assert_allclose(b, want[path]["lora_b"], atol=1e-4, rtol=1e-4)
        for path in set(bank.plan.leaves) - set(plan.leaves):  # paths this slot does not adapt: A = B = 0
            assert not np.any(grads.a[path][slot]) and not np.any(grads.b[path][slot])
    for path in bank.plan.leaves:  # the unused slot
        assert not np.any(grads.a[path][2]) and not np.any(grads.b[path][2])


def test_uses_with_no_per_example_form_are_refused_naming_the_kernel():
    model, _, entries, tokens = _tower()
    bank = jaxlora.adapter_bank(list(entries))
    with pytest.raises(ValueError, match=r"'embed/embedding'.*leading axis is not the batch of 5 examples"):
        jaxlora.apply_bank_nnx(model, bank, bank.ids([0] * 5), tokens)  # 6 rows, 5 indices

    class Flat(nnx.Module):  # flattens the examples into the rows of one matrix before the product
        def __init__(self, rngs):
            self.dense = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.dense(x.reshape(-1, 4)).reshape(x.shape[0], -1, 3)

    flat = Flat(nnx.Rngs(0))
    flat_params = nnx.state(flat, nnx.Param)
    flat_bank = jaxlora.adapter_bank(_entries(flat_params, [jaxlora.LoraConfig(rank=1)], 3))
    with pytest.raises(ValueError, match=r"'dense/kernel' cannot be served per example.*shape \(6, 4\).*batch of 2"):
        jaxlora.apply_bank_nnx(flat, flat_bank, flat_bank.ids([0, None]), jnp.ones((2, 3, 4)))

    conv = nnx.Conv(3, 4, kernel_size=(3,), rngs=nnx.Rngs(0))
    conv_params = nnx.state(conv, nnx.Param)
    conv_bank = jaxlora.adapter_bank(_entries(conv_params, [jaxlora.LoraConfig(rank=1)], 4))
    with pytest.raises(ValueError, match=r"'kernel' cannot be served per example: it is a convolution's kernel"):
        jaxlora.apply_bank_nnx(conv, conv_bank, conv_bank.ids([0, None]), jnp.ones((2, 5, 3)))
    with pytest.raises(TypeError, match=r"takes a jaxlora\.AdapterBank"):
        jaxlora.apply_bank_nnx(model, entries[0][0], [0] * 6, tokens)
