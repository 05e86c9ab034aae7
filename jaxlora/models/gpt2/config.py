"""GPT-2's hyperparameters (Hugging Face's field names) and the four published sizes."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from typing import Any

import flax.linen as nn

from jaxlora.models.rematerialization import POLICIES, checkpoint_policy

ACTIVATIONS = {
    "gelu_new": partial(nn.gelu, approximate=True),
    "gelu": partial(nn.gelu, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """GPT-2 hyperparameters (Hugging Face field names); ``dropout`` is used for embeddings, attention and residuals."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None -> 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.1
    activation: str = "gelu_new"  # "gelu_new" (tanh approximation, GPT-2's) or "gelu" (exact)
    initializer_range: float = 0.02
    scan_layers: bool = False  # blocks stacked by nn.scan under "h" (kernels (n_layer, in, out)), not h_0, h_1, ...
    remat: str | None = None  # recompute each block in the backward pass: a jaxlora.models.rematerialization policy

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}.")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is not one of {sorted(ACTIVATIONS)}.")
        if self.remat is not None and not isinstance(self.remat, str):
            raise ValueError(
                f"remat={self.remat!r}: GPT2Config takes a policy name (it is saved with the config), one of "
                f"{list(POLICIES)}, or None."
            )
        checkpoint_policy(self.remat)

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> GPT2Config:
        """One of the four published sizes ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"), optionally modified."""
        key = name.removeprefix("openai-community/")
        if key not in PRESETS:
            raise ValueError(f"Unknown GPT-2 size {name!r}; choose one of {sorted(PRESETS)}.")
        return dataclasses.replace(PRESETS[key], **overrides)

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> GPT2Config:
        """Read a Hugging Face ``config.json`` dictionary."""
        activation = hf.get("activation_function", "gelu_new")
        return cls(
            vocab_size=hf["vocab_size"],
            n_positions=hf["n_positions"],
            n_embd=hf["n_embd"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_inner=hf.get("n_inner"),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            dropout=hf.get("resid_pdrop", 0.1),
            activation="gelu_new" if activation in ("gelu_new", "gelu_pytorch_tanh") else activation,
            initializer_range=hf.get("initializer_range", 0.02),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(n_embd=768, n_layer=12, n_head=12),  # 124M
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),  # 355M
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),  # 774M
    "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25),  # 1558M
}
