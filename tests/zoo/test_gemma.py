"""Google DeepMind's `gemma` library: its linen Gemma3 transformer (nn.jit around __call__, einsum layers, an MLP
sharing its scope) served by the operation with a config of path patterns only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from drop_in import check_bank, check_drop_in
from gemma import gm

import jaxlora

pytestmark = pytest.mark.zoo

D, HEADS, HEAD_DIM, HIDDEN, VOCAB = 16, 2, 8, 24, 32


def tiny_gemma3() -> gm.nn.Transformer:
    """Gemma3's architecture (qk-norm, local and global layers, transposed gating) at toy sizes, one KV head (so
    that q and kv are separate einsums, as in every Gemma3)."""
    attention = gm.nn.config.AttentionType
    config = gm.nn.config.TransformerConfig(
        num_embed=VOCAB,
        embed_dim=D,
        hidden_dim=HIDDEN,
        num_heads=HEADS,
        head_dim=HEAD_DIM,
        num_kv_heads=1,
        final_logit_softcap=None,
        use_post_attn_norm=True,
        use_post_ffw_norm=True,
        use_qk_norm=True,
        attention_types=(attention.LOCAL_SLIDING, attention.GLOBAL),
        sliding_window_size=4,
        transpose_gating_einsum=True,
        local_base_frequency=10_000,
        global_base_frequency=1_000_000,
    )
    return gm.nn.Transformer(config=config, dtype=jnp.float32)  # float32 parameters: the contract's 1e-5 tolerance


def test_gemma3_attention_and_mlp_einsums_are_drop_in():
    model = tiny_gemma3()
    tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, VOCAB)
    params = model.init(jax.random.key(1), tokens)["params"]
    targets = (r".*/attn/(q_einsum|kv_einsum|attn_vec_einsum)/w", r".*/mlp/(gating_einsum|linear)")
    plan = check_drop_in(model, params, tokens, jaxlora.LoraConfig(rank=2, alpha=4.0, targets=targets))
    want = {  # A contracts the kernel axes that meet x; B maps r to the others, in the kernel's order
        "layer_0/attn/q_einsum/w": ((D, 2), (2, HEADS, HEAD_DIM)),  # (N, D, H)
        "layer_0/attn/kv_einsum/w": ((D, 2), (2, 2, 1, HEAD_DIM)),  # (2, K, D, H)
        "layer_1/attn/attn_vec_einsum/w": ((HEADS, HEAD_DIM, 2), (2, D)),  # (N, H, D)
        "layer_1/mlp/gating_einsum": ((D, 2), (2, 2, HIDDEN)),  # transposed: (2, F, D)
        "layer_0/mlp/linear": ((HIDDEN, 2), (2, D)),  # (F, D)
    }
    assert len(plan.leaves) == 10
    for path, shapes in want.items():
        assert (plan.leaves[path].a_shape, plan.leaves[path].b_shape) == shapes, path


def test_gemma3_serves_a_mixed_adapter_batch():
    """An adapter bank over gemma's linen Gemma3 (nn.jit, einsum layouts read from the operations): each row
    equals that row alone with its adapter merged, the base row the base."""
    model = tiny_gemma3()
    tokens = jax.random.randint(jax.random.key(0), (3, 6), 0, VOCAB)
    params = model.init(jax.random.key(1), tokens)["params"]
    attention = r".*/attn/(q_einsum|kv_einsum|attn_vec_einsum)/w"
    configs = [
        jaxlora.LoraConfig(rank=2, alpha=4.0, targets=(attention, r".*/mlp/(gating_einsum|linear)")),
        jaxlora.LoraConfig(rank=3, alpha=3.0, targets=(attention,)),
    ]
    check_bank(model, params, tokens, configs, [0, -1, 1])
