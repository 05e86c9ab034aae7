"""GPT-2's parameter paths and their PyTorch / PEFT names (``transformers``' ``GPT2Model`` and
``GPT2ForSequenceClassification``)."""

from __future__ import annotations

import re

from jaxlora._src.name_maps import ModuleName, torch_module, torch_param

# Rows are jaxlora.name_maps.ModuleName(pattern over our module path, torch module ``re.sub`` template, layout).
# Hugging Face keeps GPT-2's linears as ``Conv1D`` with weight ``(in, out)``, identical to our kernel ("conv1d";
# PEFT calls these ``fan_in_fan_out=True``); the classifier head maps to GPT2ForSequenceClassification's
# ``score``, an ``nn.Linear`` whose weight is our kernel transposed ("linear").
PEFT_NAME_MAP: tuple[ModuleName, ...] = (
    ModuleName(r"wte", "transformer.wte", "tied_embedding"),  # also the LM head (wte.attend)
    ModuleName(r"wpe", "transformer.wpe", "embedding"),
    ModuleName(r"h_(\d+)/ln_1", r"transformer.h.\1.ln_1", "layernorm"),
    ModuleName(r"h_(\d+)/attn/c_attn", r"transformer.h.\1.attn.c_attn", "conv1d"),
    ModuleName(r"h_(\d+)/attn/c_proj", r"transformer.h.\1.attn.c_proj", "conv1d"),
    ModuleName(r"h_(\d+)/ln_2", r"transformer.h.\1.ln_2", "layernorm"),
    ModuleName(r"h_(\d+)/mlp/c_fc", r"transformer.h.\1.mlp.c_fc", "conv1d"),
    ModuleName(r"h_(\d+)/mlp/c_proj", r"transformer.h.\1.mlp.c_proj", "conv1d"),
    ModuleName(r"ln_f", "transformer.ln_f", "layernorm"),
    ModuleName(r"head", "score", "linear"),  # GPT2ForSequenceClassification's head
)

# The same for scan_layers=True: one module path "h/..." holds every block; {layer} becomes each block's index.
PEFT_NAME_MAP_SCANNED: tuple[ModuleName, ...] = tuple(
    ModuleName(row.pattern.replace(r"h_(\d+)", "h"), row.module.replace(r"\1", "{layer}"), row.layout)
    for row in PEFT_NAME_MAP
)


def torch_module_name(module_path: str) -> tuple[str, str]:
    """Torch module name and layout for one of our module paths, e.g. "h_0/attn/c_attn" -> ("transformer.h.0...")."""
    if not any(re.fullmatch(row.pattern, module_path) for row in PEFT_NAME_MAP):
        raise KeyError(
            f"No torch name for GPT-2 module {module_path!r}; known patterns: {[r.pattern for r in PEFT_NAME_MAP]}"
        )
    return torch_module(module_path, "kernel", PEFT_NAME_MAP)


def torch_param_name(param_path: str) -> str:
    """Torch state-dict key of one of our "/"-joined parameter paths: "ln_f/scale" -> "transformer.ln_f.weight"."""
    module_path, _, leaf = param_path.rpartition("/")
    name, layout = torch_module_name(module_path)
    try:
        return f"{name}.{torch_param(leaf, layout)}"
    except ValueError:
        raise KeyError(f"Unknown GPT-2 parameter leaf {leaf!r} in {param_path!r}.") from None
