"""Llama-family decoders (Hugging Face ``LlamaForCausalLM`` and ``Qwen2ForCausalLM``) in flax NNX.

Load a checkpoint, generate, and LoRA-tune the unrolled layout with jaxlora; adapters go to and come from PEFT
with :func:`peft_name_map`::

    from jaxlora.models import llama
    model = llama.load_hf_weights("path/or/repo-id", scan_layers=False)
    tokens = llama.generate(model, prompt_ids, max_new_tokens=32)

``generate(..., forward=, state=)`` decodes through ``jaxlora.apply_nnx`` (adapters unmerged) or
``jaxlora.apply_bank_nnx`` (a different adapter per row): the model's call takes the KV cache as ``kv_cache=``.
"""

from jaxlora.models.kv_cache import KVCache
from jaxlora.models.llama.cache import init_cache
from jaxlora.models.llama.config import LlamaConfig
from jaxlora.models.llama.generation import call_model, generate
from jaxlora.models.llama.hf_checkpoint import config_from_hf, load_hf_weights, save_hf_weights
from jaxlora.models.llama.layout import convert_layout, stack_layers, unstack_layers
from jaxlora.models.llama.model import Llama
from jaxlora.models.llama.names import (
    PEFT_TARGETS,
    PEFT_TARGETS_SCANNED,
    STACKED_AXES,
    hf_param_name,
    peft_name_map,
)
from jaxlora.models.rematerialization import POLICIES as REMAT_POLICIES
from jaxlora.models.sampling import filter_logits

__all__ = [
    "PEFT_TARGETS",
    "PEFT_TARGETS_SCANNED",
    "REMAT_POLICIES",
    "STACKED_AXES",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "call_model",
    "config_from_hf",
    "convert_layout",
    "filter_logits",
    "generate",
    "hf_param_name",
    "init_cache",
    "load_hf_weights",
    "peft_name_map",
    "save_hf_weights",
    "stack_layers",
    "unstack_layers",
]
