"""Llama served with adapters through its KV cache: ``llama.generate(forward=, state=)`` driving
``jaxlora.apply_nnx`` (one unmerged adapter) and ``jaxlora.apply_bank_nnx`` (a mixed-adapter batch), scanned and
unrolled.

Property: every row of a left-padded batch gets the greedy tokens of the model with that row's adapter merged into
its weights (``jaxlora.merge``; the base model for -1), decoded alone without any cache (the plain forward over a
growing buffer, argmax at each step).
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

VOCAB = 48
NEW = 8
PROMPT_LENGTHS = (7, 1, 4, 5, 2)


def _config() -> llama.LlamaConfig:
    # A large initializer_range spreads the random logits out, so greedy decoding produces varied tokens.
    return llama.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, initializer_range=0.3,
    )  # fmt: skip


@functools.cache
def _model(scan: bool) -> llama.Llama:
    return llama.Llama(_config(), scan_layers=scan, rngs=nnx.Rngs(0))


def _trained(params, config: jaxlora.LoraConfig, seed: int):
    """A plan on `params` and adapters that look trained: every A and B non-zero."""
    plan = jaxlora.plan(params, config)
    _, adapters = jaxlora.init(jax.random.key(seed), params, plan)
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    noisy = [0.4 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(tree, noisy), plan


def _lora_configs(scan: bool) -> list[jaxlora.LoraConfig]:
    """Three adapter sets of different ranks and targets."""
    stacked = llama.STACKED_AXES if scan else {}
    return [
        jaxlora.LoraConfig(rank=2, alpha=4.0, targets=(r".*/(q|k|v|o)_proj/kernel",), stacked_axes=stacked),
        jaxlora.LoraConfig(
            rank=4, alpha=2.0, targets=(jaxlora.ALL_KERNELS, jaxlora.ALL_EMBEDDINGS), stacked_axes=stacked
        ),
        jaxlora.LoraConfig(rank=1, alpha=3.0, targets=(r".*/mlp/.*/kernel",), stacked_axes=stacked),
    ]


def _merged(model: llama.Llama, adapters, plan) -> llama.Llama:
    """A copy of `model` with the adapters merged into its weights (the model itself untouched)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, jaxlora.merge(params, adapters, plan), rest, copy=True)


@nnx.jit
def _logits(model: llama.Llama, buffer: jax.Array) -> jax.Array:
    return model(buffer)


def _greedy_alone(model: llama.Llama, prompt: np.ndarray, new: int) -> np.ndarray:
    """The `new` argmax tokens after `prompt`, with no cache: the plain forward over the whole buffer each step."""
    buffer = np.zeros((1, max(PROMPT_LENGTHS) + new), np.int32)  # one shape for every prompt; causal, so the tail
    buffer[0, : len(prompt)] = prompt  # changes nothing before it
    for n in range(len(prompt), len(prompt) + new):
        buffer[0, n] = np.argmax(np.asarray(_logits(model, jnp.asarray(buffer)))[0, n - 1])
    return buffer[0, len(prompt) : len(prompt) + new]


def _left_padded(rows: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Prompts of different lengths and their left-padded batch (ids, attention_mask)."""
    rng = np.random.RandomState(3)
    prompts = [rng.randint(0, VOCAB, n).astype(np.int32) for n in PROMPT_LENGTHS[:rows]]
    width = max(len(p) for p in prompts)
    ids, mask = np.zeros((rows, width), np.int32), np.zeros((rows, width), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
    return prompts, ids, mask


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_cached_generate_through_apply_nnx_equals_the_merged_model_decoded_alone_without_a_cache(scan):
    model = _model(scan)
    adapters, plan = _trained(nnx.state(model, nnx.Param), _lora_configs(scan)[1], seed=1)

    def lora(model, adapters, ids, cache):
        return jaxlora.apply_nnx(model, adapters, plan, ids, kv_cache=cache)

    prompts, ids, mask = _left_padded(3)
    got = np.asarray(llama.generate(model, ids, NEW, attention_mask=mask, forward=lora, state=adapters))
    np.testing.assert_array_equal(got[:, : ids.shape[1]], ids)
    merged = _merged(model, adapters, plan)
    for row, prompt in enumerate(prompts):
        want = _greedy_alone(merged, prompt, NEW)
        np.testing.assert_array_equal(got[row, ids.shape[1] :], want, err_msg=f"row {row}")
    base = np.asarray(llama.generate(model, ids, NEW, attention_mask=mask))
    assert not np.array_equal(got, base), "the adapter changes no token: the test could not tell it is applied"
    assert len(set(got[0, ids.shape[1] :].tolist())) > 2, "degenerate tokens: pick other seeds"


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_cached_generate_through_a_bank_equals_each_row_alone_with_its_adapter_merged(scan):
    model = _model(scan)
    params = nnx.state(model, nnx.Param)
    entries = [_trained(params, config, seed=10 + i) for i, config in enumerate(_lora_configs(scan))]
    bank = jaxlora.adapter_bank(entries, names=("attn", "all", "mlp"))
    slots = [2, -1, 1, 0, 1]  # every slot, the base model (-1), and one slot on two rows

    def served(model, state, ids, cache):
        bank, adapter_ids = state
        return jaxlora.apply_bank_nnx(model, bank, adapter_ids, ids, kv_cache=cache)

    prompts, ids, mask = _left_padded(len(slots))
    got = np.asarray(
        llama.generate(model, ids, NEW, attention_mask=mask, forward=served, state=(bank, bank.ids(slots)))
    )
    np.testing.assert_array_equal(got[:, : ids.shape[1]], ids)
    for row, (prompt, slot) in enumerate(zip(prompts, slots, strict=True)):
        alone = model if slot == -1 else _merged(model, *entries[slot])
        want = _greedy_alone(alone, prompt, NEW)
        np.testing.assert_array_equal(got[row, ids.shape[1] :], want, err_msg=f"row {row}, slot {slot}")
    base = np.asarray(llama.generate(model, ids, NEW, attention_mask=mask))
    changed = [row for row, slot in enumerate(slots) if slot != -1 and not np.array_equal(got[row], base[row])]
    assert len(changed) >= 3, f"only rows {changed} differ from the base model: the test could not tell slots apart"


def test_a_cache_with_an_attention_mask_is_refused_naming_the_fix():
    model = _model(False)
    cache = llama.init_cache(model.config, batch=1, max_length=4)
    with pytest.raises(ValueError, match="drop attention_mask"):
        model(jnp.ones((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32), kv_cache=cache)
