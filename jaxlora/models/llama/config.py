"""Llama-family hyperparameters, read from and written to Hugging Face ``config.json`` dictionaries."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# model_type -> which projections carry a bias: Llama's `attention_bias` covers q/k/v/o; Qwen2 has q/k/v only.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shapes and constants of a Llama / Qwen2 decoder (Hugging Face field names where they exist).

    ``rope_scaling`` is None or a dict with ``rope_type`` "linear" (``factor``) or "llama3" (``factor``,
    ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``), as in Llama 3.1+.
    ``qkv_bias`` / ``o_bias`` / ``mlp_bias`` say which linear layers have a bias (Qwen2: q, k, v only).

    Example:
        >>> config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                      num_attention_heads=4, num_key_value_heads=2)
        >>> config.head_dim, config.kv_groups
        (8, 2)
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> num_attention_heads (no grouping)
    head_dim_override: int | None = None  # HF `head_dim` when it is not hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # a dict is accepted and stored as sorted items
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        # Stored hashable, so that the config can be a static (compile-time) part of an NNX graph.
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of num_key_value_heads="
                f"{self.num_key_value_heads} (grouped-query attention shares each KV head among a group)."
            )
        if self.head_dim_override is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}; "
                "give head_dim_override (HF `head_dim`) explicitly."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings.")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not one of {SUPPORTED_MODEL_TYPES}.")
        _check_rope_scaling(self.rope_scaling_dict)

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def kv_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> LlamaConfig:
        """Read a Hugging Face ``LlamaConfig`` / ``Qwen2Config`` dictionary (``config.json``), old or new rope keys.

        Raises:
            ValueError: the model type or a feature (sliding windows, partial rotary, another activation) is
                not supported.
        """
        model_type = hf.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"config.json has model_type={model_type!r}; jaxlora.models.llama reads {SUPPORTED_MODEL_TYPES}."
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported; Llama and Qwen2 use 'silu'.")
        if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or ()):
            raise ValueError("sliding-window attention (use_sliding_window / layer_types) is not supported.")
        theta, scaling = _rope_from_hf(hf)
        qwen2 = model_type == "qwen2"
        attention_bias = bool(hf.get("attention_bias", False))
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim_override=None if head_dim in (None, hf["hidden_size"] // heads) else head_dim,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=True if qwen2 else attention_bias,
            o_bias=False if qwen2 else attention_bias,
            mlp_bias=False if qwen2 else bool(hf.get("mlp_bias", False)),
            initializer_range=hf.get("initializer_range", 0.02),
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dictionary that transformers' ``AutoConfig`` reads back to the same model."""
        if self.model_type == "qwen2" and (not self.qkv_bias or self.o_bias or self.mlp_bias):
            raise ValueError("a qwen2 model has biases on q/k/v only; set qkv_bias=True, o_bias=mlp_bias=False.")
        if self.model_type == "llama" and self.qkv_bias != self.o_bias:
            raise ValueError("HF Llama's attention_bias covers q/k/v/o together; set qkv_bias == o_bias.")
        scaling = self.rope_scaling_dict
        rope = {"rope_type": "default", **(scaling or {}), "rope_theta": self.rope_theta}
        hf = {
            "architectures": ["Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,  # read by transformers 4.x
            "rope_scaling": scaling,
            "rope_parameters": rope,  # read by transformers 5.x
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "llama":
            hf.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        return hf


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from transformers 5's ``rope_parameters`` or 4's ``rope_theta``/``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = params or legacy
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={scaling['partial_rotary_factor']} is not supported.")
    scaling.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return float(theta), None
    return float(theta), {"rope_type": rope_type, **scaling}


def _check_rope_scaling(scaling: Mapping[str, Any] | None) -> None:
    if scaling is None:
        return
    rope_type = scaling.get("rope_type")
    if rope_type not in ROPE_TYPES[1:]:
        raise ValueError(
            f"rope_scaling rope_type={rope_type!r} is not supported; use None or one of {ROPE_TYPES[1:]} "
            "(Llama 3.1+ checkpoints use 'llama3')."
        )
    needed = ("factor",) if rope_type == "linear" else _LLAMA3_KEYS
    missing = [key for key in needed if key not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} lacks {missing}; got {dict(scaling)}.")
