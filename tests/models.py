"""Small flax.linen models the core tests adapt."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

import jaxlora


class MLP(nn.Module):
    """Dense layers with ReLU between them, named linear1, linear2, ..."""

    features: Sequence[int]
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.features):
            x = nn.Dense(width, dtype=self.dtype, name=f"linear{i + 1}")(x)
            if i < len(self.features) - 1:
                x = nn.relu(x)
        return x


class Zoo(nn.Module):
    """One of every layer kind the factored path serves: Embed (call and attend), DenseGeneral, Einsum, Conv."""

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(32, 12, name="embed")
        x = embed(tokens)  # (b, t, 12)
        x = nn.DenseGeneral((3, 4), name="heads")(x)  # (b, t, 3, 4)
        x = nn.DenseGeneral(12, axis=(-2, -1), name="merge_heads")(x)  # (b, t, 12)
        x = nn.Einsum((12, 10), "btd,de->bte", name="einsum")(x)
        x = nn.Conv(12, kernel_size=(3,), padding="SAME", name="conv")(x)
        return embed.attend(x)


def apply_merged(model, params, adapters, plan, *args, **kwargs):
    """The model applied to the merged params (W + s·A B formed): what the factored path must equal."""
    return model.apply({"params": jaxlora.merge(params, adapters, plan)}, *args, **kwargs)


def apply_in_mode(mode, model, variables, adapters, plan, *args, **kwargs):
    """`jaxlora.apply` ("factored") or `apply_merged` ("merged") with the same arguments."""
    if mode == "merged":
        return apply_merged(model, variables["params"], adapters, plan, *args, **kwargs)
    assert mode == "factored", mode
    return jaxlora.apply(model, variables, adapters, plan, *args, **kwargs)
