"""PEFT files between Google DeepMind's `gemma` library (linen Gemma3) and torch peft on Hugging Face's
Gemma3ForCausalLM, both ways, with `gemma_name_map()`.

The gemma library has no Hugging Face loader, so this test converts the tiny torch model's weights into gemma's
parameter tree itself (scaffolding: `_gemma_params`) and first asserts that the base logits agree, which checks
that conversion. Then, as in test_tunix_peft.py: jaxlora's adapter in torch peft gives jaxlora's logits; torch
peft's adapter (every A and B random; gate_proj and up_proj, one gemma kernel, with different A's; k_proj only
in layer 1 beside v_proj) read by `load_peft(..., layouts=plan)` gives torch's logits in jaxlora; and save_peft
then load_peft gives back the very adapters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from test_gemma import HEAD_DIM, HEADS, HIDDEN, VOCAB, D, tiny_gemma3
from test_tunix_peft import assert_logits_close
from torch_side import logits_both_ways

import jaxlora
from jaxlora.name_maps import gemma_name_map
from jaxlora.peft_format import load_peft, save_peft

pytestmark = pytest.mark.zoo

HF_CONFIG = dict(  # tiny_gemma3's architecture: one local (window 4, RoPE base 1e4) and one global (1e6) layer
    vocab_size=VOCAB, hidden_size=D, intermediate_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
    num_key_value_heads=1, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM, sliding_window=4,
    layer_types=["sliding_attention", "full_attention"], initializer_range=0.3, tie_word_embeddings=True,
    final_logit_softcapping=None, attn_logit_softcapping=None,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
    },
)  # fmt: skip
TORCH_LORA = dict(
    r=2, lora_alpha=5, rank_pattern={"o_proj": 3}, alpha_pattern={"up_proj": 3}, init_lora_weights=False,
    target_modules=r".*\.(q_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)|model\.layers\.1\.self_attn\.k_proj",
    task_type="CAUSAL_LM",
)  # fmt: skip
TARGETS = (r".*/attn/(q_einsum|kv_einsum|attn_vec_einsum)/w", r".*/mlp/(gating_einsum|linear)")


def _gemma_params(checkpoint) -> dict:
    """The Hugging Face Gemma3 weights in gemma's tree: q (N, D, H), kv (2, K, D, H), attn_vec (N, H, D), gating
    (2, F, D) holding gate then up, linear (F, D); the (1 + w) RMSNorm scales and the tied embedding as they are."""
    hf = load_file(checkpoint / "model.safetensors")
    heads = lambda w, n: w.reshape(n, HEAD_DIM, D).transpose(0, 2, 1)  # torch (n·H, D) -> (n, D, H)
    params = {"embedder": {"input_embedding": hf["model.embed_tokens.weight"]}}
    params["final_norm"] = {"scale": hf["model.norm.weight"]}
    for i in range(HF_CONFIG["num_hidden_layers"]):
        t = lambda name: hf[f"model.layers.{i}.{name}.weight"]  # noqa: B023
        params[f"layer_{i}"] = {
            "attn": {
                "q_einsum": {"w": heads(t("self_attn.q_proj"), HEADS)},
                "kv_einsum": {"w": np.stack([heads(t("self_attn.k_proj"), 1), heads(t("self_attn.v_proj"), 1)])},
                "attn_vec_einsum": {"w": t("self_attn.o_proj").T.reshape(HEADS, HEAD_DIM, D)},
                "_query_norm": {"scale": t("self_attn.q_norm")},
                "_key_norm": {"scale": t("self_attn.k_norm")},
            },
            "mlp": {"gating_einsum": np.stack([t("mlp.gate_proj"), t("mlp.up_proj")]), "linear": t("mlp.down_proj").T},
            "pre_attention_norm": {"scale": t("input_layernorm")},
            "post_attention_norm": {"scale": t("post_attention_layernorm")},
            "pre_ffw_norm": {"scale": t("pre_feedforward_layernorm")},
            "post_ffw_norm": {"scale": t("post_feedforward_layernorm")},
        }
    return jax.tree.map(jnp.asarray, params)


def test_gemma_adapters_cross_to_torch_peft_and_back(tmp_path):
    model = tiny_gemma3()
    tokens = np.asarray(jax.random.randint(jax.random.key(0), (2, 6), 1, VOCAB))  # gemma reads token 0 as padding
    shaped_params = model.init(jax.random.key(1), tokens)["params"]
    lora = jaxlora.LoraConfig(rank=2, alpha=4.0, targets=TARGETS, alpha_pattern={r"layer_0/.*": 6.0})
    plan = jaxlora.plan(shaped_params, lora, model=model, example=tokens)
    _, adapters = jaxlora.init(jax.random.key(2), shaped_params, plan)
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    adapters = jax.tree.unflatten(
        tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )
    save_peft(tmp_path / "from_jax", shaped_params, adapters, plan, name_map=gemma_name_map(), task_type="CAUSAL_LM")

    np.save(tmp_path / "tokens.npy", tokens)
    torch_base, torch_with_jax, torch_with_torch = logits_both_ways(tmp_path, "gemma3", HF_CONFIG, TORCH_LORA, 4)

    params = _gemma_params(tmp_path / "hf")
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), params, shaped_params)
    base = np.asarray(model.apply({"params": params}, tokens).logits)
    err = np.abs(base - torch_base).max()
    assert err <= 1e-4 * np.abs(torch_base).max(), f"the converted gemma base model is off torch's by {err}"

    served = np.asarray(jaxlora.apply(model, {"params": params}, adapters, plan, tokens).logits)
    assert_logits_close(torch_with_jax, served, base, "jaxlora's adapter in torch peft")

    _, loaded, loaded_plan = load_peft(tmp_path / "from_torch", params, name_map=gemma_name_map(), layouts=plan)
    got = jaxlora.apply_fn(model, loaded_plan, strict=True)({"params": params}, loaded, tokens).logits
    assert_logits_close(got, torch_with_torch, base, "torch peft's adapter in jaxlora")
    assert loaded_plan.leaves["layer_0/mlp/gating_einsum"].rank == 4  # gate and up A's differ: rank 2r, exact
    assert loaded_plan.leaves["layer_0/attn/kv_einsum/w"].rank == 2  # v_proj alone
    assert loaded_plan.leaves["layer_1/attn/kv_einsum/w"].rank == 4

    _, again, again_plan = load_peft(tmp_path / "from_jax", params, name_map=gemma_name_map(), layouts=plan)
    jax.tree.map(np.testing.assert_array_equal, again, adapters)
    for path, leaf in plan.leaves.items():
        back = again_plan.leaves[path]
        assert (back.rank, back.scale, back.layer_in_axes) == (leaf.rank, leaf.scale, leaf.layer_in_axes), path
