"""Reference models: GPT-2 in plain flax.linen (jaxlora's factored LoRA path applies), Llama/Qwen2 in flax NNX."""

from jaxlora.models import llama
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
    "llama",
    "load_hf_weights",
    "stack_layers",
    "torch_module_name",
    "torch_param_name",
    "unstack_layers",
]
