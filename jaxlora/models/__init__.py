"""Reference models: GPT-2 in plain flax.linen (jaxlora's factored LoRA path applies), Llama/Qwen2 in flax NNX.

Both families share what they do alike: attention with a lean backward pass (grouped-query included), norms with
lean backward passes, sampling, one KV cache with a length per row (``jaxlora.models.kv_cache``), one decoding
loop (``jaxlora.models.decoding``) and continuous batching over it (``jaxlora.models.continuous_batching``)."""

from jaxlora.models import llama
from jaxlora.models.gpt2 import (
    GPT2,
    PEFT_NAME_MAP,
    PEFT_NAME_MAP_SCANNED,
    PRESETS,
    GPT2Classifier,
    GPT2Config,
    KVCache,
    apply_model,
    config_from_hf,
    generate,
    generate_greedy,
    init_cache,
    left_pad,
    load_hf_weights,
    stack_layers,
    torch_module_name,
    torch_param_name,
    unstack_layers,
)
from jaxlora.models.sampling import filter_logits, sample_token

__all__ = [
    "GPT2",
    "PEFT_NAME_MAP",
    "PEFT_NAME_MAP_SCANNED",
    "PRESETS",
    "GPT2Classifier",
    "GPT2Config",
    "KVCache",
    "apply_model",
    "config_from_hf",
    "filter_logits",
    "generate",
    "generate_greedy",
    "init_cache",
    "left_pad",
    "llama",
    "load_hf_weights",
    "sample_token",
    "stack_layers",
    "torch_module_name",
    "torch_param_name",
    "unstack_layers",
]
