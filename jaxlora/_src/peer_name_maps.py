"""Name maps for the peer model libraries' language models: google-tunix's NNX Qwen3, Llama3 and Gemma3, and Google
DeepMind's `gemma` library (linen Gemma3), to the Hugging Face `transformers` models with the same weights
(``Qwen3ForCausalLM``, ``LlamaForCausalLM``, ``Gemma3ForCausalLM``), for PEFT files both ways.

They name the projections LoRA targets (attention and MLP). Their kernels' layouts are read from the model
(`jaxlora.plan(params, config, model=..., example=...)`), so `save_peft` and `load_peft` need that plan
(``load_peft(..., layouts=plan)``). Gemma's fused kernels are several torch modules each (a ``{a,b}`` group, see
`jaxlora.name_maps`): the key-value kernel (2, kv_heads, features, head_dim) is ``k_proj`` and ``v_proj``, the
gating kernel (2, hidden, features) ``gate_proj`` and ``up_proj``.
"""

from __future__ import annotations

from jaxlora._src.name_maps import ModuleName

_LAYER = r"model.layers.\1"  # the decoder layers of a ...ForCausalLM
_LLAMA_LIKE = (  # tunix's Qwen3 and Llama3: q/k/v/o_proj Einsum kernels `w`, nnx.Linear MLP kernels
    ModuleName(r"layers/(\d+)/attn/(q|k|v|o)_proj", rf"{_LAYER}.self_attn.\2_proj", "linear"),
    ModuleName(r"layers/(\d+)/mlp/(gate|up|down)_proj", rf"{_LAYER}.mlp.\2_proj", "linear"),
)
_TUNIX_GEMMA3 = (  # Einsum kernels `w`: q (N, D, H), kv (2, K, D, H) or qkv (3, N, D, H), attn_vec (N, H, D)
    ModuleName(r"layers/(\d+)/attn/q_einsum", rf"{_LAYER}.self_attn.q_proj", "linear"),
    ModuleName(r"layers/(\d+)/attn/kv_einsum", rf"{_LAYER}.self_attn.{{k,v}}_proj", "linear"),
    ModuleName(r"layers/(\d+)/attn/qkv_einsum", rf"{_LAYER}.self_attn.{{q,k,v}}_proj", "linear"),
    ModuleName(r"layers/(\d+)/attn/attn_vec_einsum", rf"{_LAYER}.self_attn.o_proj", "linear"),
    ModuleName(r"layers/(\d+)/mlp/(gate|up|down)_proj", rf"{_LAYER}.mlp.\2_proj", "linear"),
)
TUNIX_FAMILIES = {"qwen3": _LLAMA_LIKE, "llama3": _LLAMA_LIKE, "gemma3": _TUNIX_GEMMA3}


def tunix_name_map(family: str) -> tuple[ModuleName, ...]:
    """The name map of a google-tunix NNX language model to its Hugging Face model, for PEFT files.

    Args:
      family: "qwen3" (``tunix.models.qwen3``, to ``Qwen3ForCausalLM``), "llama3" (``tunix.models.llama3``, to
        ``LlamaForCausalLM``) or "gemma3" (``tunix.models.gemma3``, text only, to ``Gemma3ForCausalLM``).

    Returns:
      Rows for every attention and MLP projection of the decoder layers (``layers/{i}/...``), the parameters
      of ``nnx.state(model, nnx.Param)``. Use them with a plan read from the model, which knows each einsum
      kernel's input axes: ``save_peft(dir, params, adapters, plan, name_map=...)`` and ``load_peft(dir, params,
      name_map=..., layouts=plan)``.

    Raises:
      ValueError: for a family not listed above.

    Example:
      >>> rows = tunix_name_map("gemma3")
      >>> [r.module for r in rows if r.pattern.endswith("/kv_einsum")]
      ['model.layers.\\\\1.self_attn.{k,v}_proj']
    """
    if family not in TUNIX_FAMILIES:
        raise ValueError(
            f"tunix_name_map has no name map for family {family!r}; pass one of {sorted(TUNIX_FAMILIES)} "
            "(the tunix.models module of your model), or write the rows with jaxlora.name_maps.ModuleName"
        )
    return TUNIX_FAMILIES[family]


def gemma_name_map() -> tuple[ModuleName, ...]:
    """The name map of Google DeepMind's `gemma` library's linen transformer (``gemma.gm.nn``, Gemma3 text
    models) to Hugging Face's ``Gemma3ForCausalLM``, for PEFT files.

    Returns:
      Rows for every attention and MLP kernel of the ``layer_{i}`` blocks: ``attn/q_einsum/w`` is ``q_proj``,
      ``attn/kv_einsum/w`` ``k_proj`` and ``v_proj`` (``qkv_einsum`` also ``q_proj``), ``attn/attn_vec_einsum/w``
      ``o_proj``, ``mlp/gating_einsum`` ``gate_proj`` and ``up_proj`` (entry 0 of its first axis is the gelu'd
      gate), ``mlp/linear`` ``down_proj``; the two MLP kernels share the scope ``mlp``, so their rows name the
      leaves. Use them with a plan read from the model (``jaxlora.plan(params, config, model=..., example=...)``):
      ``save_peft(..., name_map=gemma_name_map())`` and ``load_peft(..., name_map=gemma_name_map(),
      layouts=plan)``.

    Example:
      >>> [r.module for r in gemma_name_map() if r.pattern.endswith("gating_einsum")]
      ['model.layers.\\\\1.mlp.{gate,up}_proj']
    """
    return (
        ModuleName(r"layer_(\d+)/attn/q_einsum", rf"{_LAYER}.self_attn.q_proj", "linear"),
        ModuleName(r"layer_(\d+)/attn/kv_einsum", rf"{_LAYER}.self_attn.{{k,v}}_proj", "linear"),
        ModuleName(r"layer_(\d+)/attn/qkv_einsum", rf"{_LAYER}.self_attn.{{q,k,v}}_proj", "linear"),
        ModuleName(r"layer_(\d+)/attn/attn_vec_einsum", rf"{_LAYER}.self_attn.o_proj", "linear"),
        ModuleName(r"layer_(\d+)/mlp/gating_einsum", rf"{_LAYER}.mlp.{{gate,up}}_proj", "linear"),
        ModuleName(r"layer_(\d+)/mlp/linear", rf"{_LAYER}.mlp.down_proj", "linear"),
    )
