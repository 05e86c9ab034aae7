"""Our Llama parameter paths <-> Hugging Face / PEFT names: the PEFT name map and the checkpoint key of each leaf."""

from __future__ import annotations

import re

from jaxlora._src.name_maps import ModuleName, torch_param
from jaxlora.models.llama.config import LlamaConfig

# Module paths inside one decoder layer, and which torch layout each has.
LAYER_MODULES: tuple[tuple[str, str], ...] = (
    ("input_layernorm", "layernorm"),
    ("self_attn/q_proj", "linear"),
    ("self_attn/k_proj", "linear"),
    ("self_attn/v_proj", "linear"),
    ("self_attn/o_proj", "linear"),
    ("post_attention_layernorm", "layernorm"),
    ("mlp/gate_proj", "linear"),
    ("mlp/up_proj", "linear"),
    ("mlp/down_proj", "linear"),
)
# PEFT's usual LoRA targets for Llama-family models, as our kernel paths (any layer, unrolled layout).
PEFT_TARGETS = r"layers/\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"
# The same targets in the scanned layout, whose kernels stack the layers: use with `STACKED_AXES`.
PEFT_TARGETS_SCANNED = r"layers/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel"
# `LoraConfig(stacked_axes=STACKED_AXES)` for the scanned layout: one adapter per layer, served inside nnx.scan.
STACKED_AXES = {r"layers/.*": 1}


def peft_name_map(config: LlamaConfig, scan_layers: bool = False) -> tuple[ModuleName, ...]:
    """Rows of a `jaxlora.name_maps` table for the unrolled layout (``layers/{i}/...``) or, with `scan_layers`,
    the scanned one (``layers/...``, one torch module per stacked layer through a ``{layer}`` template).

    Use it with ``jaxlora.peft_format.save_peft`` / ``load_peft``. With a tied head, ``embed_tokens`` is a
    ``tied_embedding`` (jaxlora refuses to export a LoRA on it, since PEFT would adapt only the lookup).

    Example:
        >>> rows = peft_name_map(LlamaConfig())
        >>> [r.module for r in rows if r.pattern.endswith("q_proj")]
        ['model.layers.\\\\1.self_attn.q_proj']
    """
    embedding = "tied_embedding" if config.tie_word_embeddings else "embedding"
    rows = [ModuleName(r"embed_tokens", "model.embed_tokens", embedding)]
    for module, layout in LAYER_MODULES:
        torch_name = module.replace("/", ".")
        if scan_layers:
            rows.append(ModuleName(rf"layers/{module}", f"model.layers.{{layer}}.{torch_name}", layout))
        else:
            rows.append(ModuleName(rf"layers/(\d+)/{module}", rf"model.layers.\1.{torch_name}", layout))
    rows.append(ModuleName(r"norm", "model.norm", "layernorm"))
    if not config.tie_word_embeddings:
        rows.append(ModuleName(r"lm_head", "lm_head", "linear"))
    return tuple(rows)


def hf_param_name(path: str) -> str:
    """The Hugging Face state-dict key of one of our unrolled "/"-joined parameter paths.

    Example:
        >>> hf_param_name("layers/3/self_attn/q_proj/kernel")
        'model.layers.3.self_attn.q_proj.weight'

    Raises:
        KeyError: `path` is no parameter of a Llama model.
    """
    module, _, leaf = path.rpartition("/")
    for pattern, template, layout in _EVERY_MODULE:
        if re.fullmatch(pattern, module):
            try:
                return f"{re.sub(pattern, template, module)}.{torch_param(leaf, layout)}"
            except ValueError:
                break
    raise KeyError(f"{path!r} is no Llama parameter (expected e.g. 'layers/0/self_attn/q_proj/kernel').")


# Every module a Llama checkpoint can hold, the untied head included: the rows that name checkpoint keys.
_EVERY_MODULE = peft_name_map(LlamaConfig(tie_word_embeddings=False))
