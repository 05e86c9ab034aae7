"""Hugging Face PEFT's LoRA file format: file names, tensor keys, and the features jaxlora does not read.

PEFT stores, per adapted torch module ``m``, ``base_model.model.m.lora_A.weight`` (r, in) and
``...lora_B.weight`` (out, r) for Linear / Conv1D layers, ``...lora_embedding_A`` (r, num) and
``...lora_embedding_B`` (dim, r) for Embedding layers, and the full weights of modules_to_save under their plain
names (``base_model.model.head.weight``). Its scale is lora_alpha/r (lora_alpha/sqrt(r) with rsLoRA), with
per-module rank_pattern / alpha_pattern. Our A is (*in, r) and B (r, *out), so lora_A = Aᵀ and lora_B = Bᵀ.
Module names come from a name map (see `jaxlora.name_maps`).
"""

from __future__ import annotations

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."
# DoRA (use_dora=True): the magnitude vector of module m is stored as ``base_model.model.m.lora_magnitude_vector``
# (out,), one entry per output feature, PEFT's ``lora_magnitude_vector[adapter].weight``.
MAGNITUDE_KEY = "lora_magnitude_vector"
