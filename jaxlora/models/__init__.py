"""Reference models written in plain flax.linen, so jaxlora's factored LoRA path applies to them."""

from jaxlora.models.gpt2 import (
    GPT2,
    PEFT_NAME_MAP,
    PEFT_NAME_MAP_SCANNED,
    PRESETS,
    GPT2Classifier,
    GPT2Config,
    config_from_hf,
    generate_greedy,
    load_hf_weights,
    stack_layers,
    torch_module_name,
    torch_param_name,
    unstack_layers,
)

__all__ = [
    "GPT2",
    "PEFT_NAME_MAP",
    "PEFT_NAME_MAP_SCANNED",
    "PRESETS",
    "GPT2Classifier",
    "GPT2Config",
    "config_from_hf",
    "generate_greedy",
    "load_hf_weights",
    "stack_layers",
    "torch_module_name",
    "torch_param_name",
    "unstack_layers",
]
