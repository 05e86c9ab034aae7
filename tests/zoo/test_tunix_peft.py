"""PEFT files between google-tunix's NNX models and torch peft on the matching Hugging Face model, both ways.

Per family, a tiny Hugging Face model (torch, in the main environment: tests/zoo/torch_side.py) is loaded into the
tunix model by tunix's own safetensors loader (the independent reference for the base weights), and:
- the base logits agree (the first step: else nothing after it means anything);
- a jaxlora adapter written by `save_peft(..., name_map=tunix_name_map(family))` and loaded by
  ``peft.PeftModel.from_pretrained`` gives the logits jaxlora serves;
- an adapter torch peft made (every A and B random, a rank and an alpha pattern) read by `load_peft(...,
  layouts=plan)` gives, served by jaxlora, the logits torch computes with it; for Gemma3 its k_proj and v_proj
  (one tunix kernel) have different A's in layer 1 (read exactly at rank 2r) and only v_proj in layer 0;
- save_peft then load_peft gives back the very adapters and plan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from torch_side import logits_both_ways
from tunix.models.gemma3 import model as gemma3
from tunix.models.gemma3 import params_safetensors as gemma3_params
from tunix.models.llama3 import model as llama3
from tunix.models.llama3 import params as llama3_params
from tunix.models.qwen3 import model as qwen3
from tunix.models.qwen3 import params as qwen3_params

import jaxlora
from jaxlora.name_maps import tunix_name_map
from jaxlora.peft_format import load_peft, save_peft

pytestmark = pytest.mark.zoo

LAYERS, VOCAB, D, HIDDEN, HEADS, HEAD_DIM, KV_HEADS = 2, 32, 16, 24, 2, 8, 1
B, L = 2, 6
HF = dict(
    vocab_size=VOCAB, hidden_size=D, intermediate_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, initializer_range=0.3, tie_word_embeddings=False,
)  # fmt: skip
TUNIX = dict(
    num_layers=LAYERS, embed_dim=D, hidden_dim=HIDDEN, num_heads=HEADS, head_dim=HEAD_DIM, num_kv_heads=KV_HEADS
)
ROPE = 1_000_000  # tunix 0.1.7's Qwen3 and Llama3 apply RoPE with this base whatever their config's rope_theta
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GEMMA3_HF = dict(
    HF, tie_word_embeddings=True, sliding_window=4, query_pre_attn_scalar=HEAD_DIM,
    layer_types=["sliding_attention"] * LAYERS,  # tunix's pattern: five local layers, then a global one
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    },
)  # fmt: skip
FAMILIES = {  # family: (model, its loader, its tunix config, the torch family and config, the jaxlora targets)
    "qwen3": (
        qwen3.Qwen3,
        qwen3_params,
        qwen3.ModelConfig(**TUNIX, vocab_size=VOCAB, rope_theta=ROPE, norm_eps=1e-6),
        ("qwen3", dict(HF, rope_theta=ROPE, rms_norm_eps=1e-6)),
        (r".*/attn/(q|k|v|o)_proj/w", r".*/mlp/(gate|up|down)_proj/kernel"),
    ),
    "llama3": (
        llama3.Llama3,
        llama3_params,
        llama3.ModelConfig(**TUNIX, vocab_size=VOCAB, rope_theta=ROPE, norm_eps=1e-5),
        ("llama", dict(HF, rope_theta=ROPE, rms_norm_eps=1e-5)),
        (r".*/attn/(q|k|v|o)_proj/w", r".*/mlp/(gate|up|down)_proj/kernel"),
    ),
    "gemma3": (
        gemma3.Gemma3,
        gemma3_params,
        gemma3.ModelConfig(**TUNIX, num_embed=VOCAB, sliding_window_size=4, param_dtype=jnp.float32),
        ("gemma3", GEMMA3_HF),
        (r".*/attn/(q|kv|attn_vec)_einsum/w", r".*/mlp/(gate|up|down)_proj/kernel"),
    ),
}
# Gemma3's torch adapter: k_proj only in layer 1, so tunix's kv kernel has both halves there and only v in layer 0
GEMMA3_TARGETS = r".*\.(q_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|model\.layers\.1\.self_attn\.k_proj"


def _example():
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (B, L), 0, VOCAB))
    positions = jnp.broadcast_to(jnp.arange(L), (B, L))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((L, L), bool)), (B, L, L))
    return tokens, (jnp.asarray(tokens), positions, None, mask)


def _randomised(adapters, seed):
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noise = [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(tree, noise)


def assert_logits_close(got, want, base, what):
    """`got` equals `want` to float32 rounding (relative 1e-4), and `want` differs from `base` (a real check)."""
    got, want, base = (np.asarray(x, np.float64) for x in (got, want, base))
    assert np.abs(want - base).max() > 1e-2 * np.abs(base).max(), f"{what}: the adapter changes nothing"
    err = np.abs(got - want).max()
    assert err <= 1e-4 * np.abs(want).max(), f"{what}: logits off by {err} (largest {np.abs(want).max()})"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tunix_adapters_cross_to_torch_peft_and_back(family, tmp_path):
    model_class, loader, config, (torch_family, hf_config), targets = FAMILIES[family]
    tokens, example = _example()
    name_map = tunix_name_map(family)
    # jaxlora's adapter needs only the shapes: made on a randomly initialised model, before torch runs once
    shaped = model_class(config, rngs=nnx.Rngs(0))
    shaped_params = nnx.state(shaped, nnx.Param)
    patterns = dict(rank_pattern={r".*/1/mlp/up_proj/kernel": 3}, alpha_pattern={r".*/0/.*": 6.0})
    lora = jaxlora.LoraConfig(rank=2, alpha=4.0, targets=targets, **patterns)
    plan = jaxlora.plan(shaped_params, lora, model=shaped, example=example)
    _, adapters = jaxlora.init(jax.random.key(1), shaped_params, plan)
    adapters = _randomised(adapters, 2)
    save_peft(tmp_path / "from_jax", shaped_params, adapters, plan, name_map=name_map, task_type="CAUSAL_LM")

    np.save(tmp_path / "tokens.npy", tokens)
    peft_targets = GEMMA3_TARGETS if family == "gemma3" else ALL
    torch_lora = dict(
        r=2, lora_alpha=5, target_modules=peft_targets, rank_pattern={"up_proj": 3}, alpha_pattern={"v_proj": 3},
        init_lora_weights=False, task_type="CAUSAL_LM",
    )  # fmt: skip
    torch_base, torch_with_jax, torch_with_torch = logits_both_ways(tmp_path, torch_family, hf_config, torch_lora, 3)

    model = loader.create_model_from_safe_tensors(str(tmp_path / "hf"), config, dtype=jnp.float32)
    params = nnx.state(model, nnx.Param)
    base = np.asarray(model(*example)[0])
    err = np.abs(base - torch_base).max()
    assert err <= 1e-4 * np.abs(torch_base).max(), f"tunix's loaded base model is off torch's by {err}"

    served = np.asarray(jaxlora.apply_nnx(model, adapters, plan, *example)[0])
    assert_logits_close(torch_with_jax, served, base, "jaxlora's adapter in torch peft")

    _, loaded, loaded_plan = load_peft(tmp_path / "from_torch", params, name_map=name_map, layouts=plan)
    got = np.asarray(jaxlora.apply_nnx_fn(loaded_plan, strict=True)(model, loaded, *example)[0])
    assert_logits_close(got, torch_with_torch, base, "torch peft's adapter in jaxlora")
    if family == "gemma3":  # layer 1's k_proj and v_proj A's differ: one rank-4 adapter; layer 0 has v alone
        assert loaded_plan.leaves["layers/1/attn/kv_einsum/w"].rank == 4
        assert loaded_plan.leaves["layers/0/attn/kv_einsum/w"].rank == 2

    _, again, again_plan = load_peft(tmp_path / "from_jax", params, name_map=name_map, layouts=plan)
    jax.tree.map(np.testing.assert_array_equal, again, adapters)
    for path, leaf in plan.leaves.items():
        back = again_plan.leaves[path]
        assert (back.rank, back.scale, back.layer_in_axes) == (leaf.rank, leaf.scale, leaf.layer_in_axes), path
