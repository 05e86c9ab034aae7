"""google-tunix's NNX models (Qwen3, Llama3, Gemma3) served by the operation with a config of path patterns only,
with each of its rematerialisation settings (none, the attention block, the whole decoder layer: nnx.remat)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from drop_in import check_bank, check_drop_in, runners
from flax import nnx
from tunix.models.gemma3 import model as gemma3
from tunix.models.llama3 import model as llama3
from tunix.models.qwen3 import model as qwen3

import jaxlora

pytestmark = pytest.mark.zoo

LAYERS, VOCAB, D, HIDDEN, HEADS, HEAD_DIM, KV_HEADS = 2, 32, 16, 24, 2, 8, 1
B, L = 2, 6


def _qwen3(remat):
    config = qwen3.ModelConfig(
        num_layers=LAYERS, vocab_size=VOCAB, embed_dim=D, hidden_dim=HIDDEN, num_heads=HEADS, head_dim=HEAD_DIM,
        num_kv_heads=KV_HEADS, rope_theta=10_000, norm_eps=1e-6, remat_config=getattr(qwen3.RematConfig, remat),
    )  # fmt: skip
    return qwen3.Qwen3(config, rngs=nnx.Rngs(0))


def _llama3(remat):
    config = llama3.ModelConfig(
        num_layers=LAYERS, vocab_size=VOCAB, embed_dim=D, hidden_dim=HIDDEN, num_heads=HEADS, head_dim=HEAD_DIM,
        num_kv_heads=KV_HEADS, rope_theta=10_000, norm_eps=1e-5, remat_config=getattr(llama3.RematConfig, remat),
    )  # fmt: skip
    return llama3.Llama3(config, rngs=nnx.Rngs(0))


def _gemma3(remat):
    config = gemma3.ModelConfig(
        num_layers=LAYERS, num_embed=VOCAB, embed_dim=D, hidden_dim=HIDDEN, num_heads=HEADS, head_dim=HEAD_DIM,
        num_kv_heads=KV_HEADS, sliding_window_size=4, remat_config=getattr(gemma3.RematConfig, remat),
        param_dtype=jnp.float32,  # float32 parameters: the contract's 1e-5 tolerance
    )  # fmt: skip
    return gemma3.Gemma3(config, rngs=nnx.Rngs(0))


_PROJECTIONS = (r".*/attn/(q|k|v|o)_proj/w", r".*/mlp/(gate|up|down)_proj/kernel")
_MLP = {  # (F, D) down and (D, F) gate/up nnx.Linear kernels: A on the axis that meets x, B on the other
    "layers/1/mlp/down_proj/kernel": ((HIDDEN, 2), (2, D)),
    "layers/1/mlp/gate_proj/kernel": ((D, 2), (2, HIDDEN)),
}
_EINSUM_QKVO = {  # tunix's Einsum kernels q (D, N, H), k/v (D, K, H), o (N, H, D)
    "layers/0/attn/q_proj/w": ((D, 2), (2, HEADS, HEAD_DIM)),
    "layers/0/attn/v_proj/w": ((D, 2), (2, KV_HEADS, HEAD_DIM)),
    "layers/1/attn/o_proj/w": ((HEADS, HEAD_DIM, 2), (2, D)),
    **_MLP,
}
MODELS = {  # name: (constructor, the targets a user writes, expected (A, B) shapes of some kernels, how many)
    "qwen3": (_qwen3, _PROJECTIONS, _EINSUM_QKVO, 7 * LAYERS),
    "llama3": (_llama3, _PROJECTIONS, _EINSUM_QKVO, 7 * LAYERS),
    "gemma3": (
        _gemma3,
        (r".*/attn/(q|kv|attn_vec)_einsum/w", r".*/mlp/(gate|up|down)_proj/kernel"),
        {  # gemma's layouts: q (N, D, H), kv (2, K, D, H), attn_vec (N, H, D)
            "layers/0/attn/q_einsum/w": ((D, 2), (2, HEADS, HEAD_DIM)),
            "layers/0/attn/kv_einsum/w": ((D, 2), (2, 2, KV_HEADS, HEAD_DIM)),
            "layers/1/attn/attn_vec_einsum/w": ((HEADS, HEAD_DIM, 2), (2, D)),
            **_MLP,
        },
        6 * LAYERS,
    ),
}


def _example(batch=B):
    tokens = jax.random.randint(jax.random.key(0), (batch, L), 0, VOCAB)
    positions = jnp.broadcast_to(jnp.arange(L), (batch, L))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((L, L), bool)), (batch, L, L))
    return tokens, positions, None, mask


@pytest.mark.parametrize("remat", ["NONE", "BLOCK", "DECODER"])
@pytest.mark.parametrize("name", list(MODELS))
def test_tunix_model_is_drop_in(name, remat):
    make, targets, shapes, count = MODELS[name]
    model = make(remat)
    params = nnx.state(model, nnx.Param)
    plain, _ = runners(model, params)
    rematerialised = "remat" in str(jax.make_jaxpr(plain)(params, *_example()))
    assert rematerialised == (remat != "NONE"), "the model's call does not rematerialise as its config says"
    plan = check_drop_in(model, params, _example(), jaxlora.LoraConfig(rank=2, targets=targets))
    assert len(plan.leaves) == count, sorted(plan.leaves)
    for path, want in shapes.items():
        assert (plan.leaves[path].a_shape, plan.leaves[path].b_shape) == want, path


@pytest.mark.parametrize(("name", "remat"), [("qwen3", "DECODER"), ("gemma3", "BLOCK")])
def test_tunix_model_serves_a_mixed_adapter_batch(name, remat):
    """An adapter bank over tunix's model (its einsum layouts read from the operations, rematerialised): each row
    equals that row alone with its adapter merged, the base row the base."""
    make, targets, _, _ = MODELS[name]
    model = make(remat)
    params = nnx.state(model, nnx.Param)
    configs = [
        jaxlora.LoraConfig(rank=2, alpha=4.0, targets=targets),
        jaxlora.LoraConfig(rank=3, alpha=3.0, targets=targets[:1]),
    ]
    check_bank(model, params, _example(3), configs, [1, -1, 0])
