"""The flax.nnx layer kinds jaxlora serves factored: Linear, LinearGeneral, Einsum, Conv, Embed.

Registered with `register_layer` like the linen kinds; the LoRA terms of LinearGeneral, Einsum and Embed are the
linen ones (they read only the layer's configuration and its input), Linear goes through the same hand-written
`lora_linear` backward pass (DoRA adapters through `dora_linear`, as linen's Dense), and Conv runs the layer's
own convolution with A as its kernel.
"""

from __future__ import annotations

import types
from typing import Any

import jax
from flax import nnx

from jaxlora._src.builtin_layers import (
    _dense_general_term,
    _einsum_axes,
    _einsum_term,
    _embed_term,
    serve_dora_dense,
)
from jaxlora._src.layer_kinds import LayerCall, additive, linear_term, mark_builtin, register_layer
from jaxlora._src.linear import lora_linear


def _plain_linear(module: nnx.Linear) -> bool:
    """True for an nnx.Linear whose arithmetic `lora_linear` reproduces exactly."""
    return (
        getattr(module, "jaxlora_layer_type", type(module)).__call__ is nnx.Linear.__call__
        and module.dot_general is jax.lax.dot_general
        and module.precision is None
        and module.preferred_element_type is None
    )


def _serve_linear(call: LayerCall) -> Any:
    module, adapter = call.module, call.adapter
    plain = _plain_linear(module) and len(call.args) == 1 and not call.kwargs
    if adapter is not None and adapter.magnitude is not None and not plain:
        raise ValueError(
            f"DoRA is served for a plain nnx.Linear call; the layer adapted at {adapter.leaf.path!r} sets "
            "dot_general/precision/preferred_element_type or is called with extra arguments: exclude it from the "
            "targets or use plain LoRA for it"
        )
    if adapter is None or not plain:
        return additive(linear_term)(call)
    kernel = module.kernel[...]
    bias = module.bias[...] if module.bias is not None else None
    x, kernel, bias = module.promote_dtype((call.x, kernel, bias), dtype=module.dtype)
    if adapter.magnitude is not None:
        return serve_dora_dense(x, kernel, bias, adapter)
    return lora_linear(x, adapter.drop(x), kernel, bias, adapter.a, adapter.b, adapter.scale)


def _linear_general_contraction(module: nnx.LinearGeneral) -> int | None:
    return None if module.batch_axis else len(module.axis)


def _einsum_contraction(module: nnx.Einsum) -> int | None:
    axes = _einsum_axes(module)
    return None if axes is None else len(axes[1])


def _einsum_served_term(call: LayerCall) -> jax.Array | None:
    if len(call.args) != 1 or call.kwargs:  # an einsum_str given at call time overrides the planned one
        return None
    return _einsum_term(call)


def _conv_contraction(module: nnx.Conv) -> int | None:
    return None if module.feature_group_count != 1 else len(module.kernel_size) + 1


def _conv_term(call: LayerCall) -> jax.Array:
    """The layer's own convolution with A (window, in, r) as its kernel, then the 1x1 up-projection by B."""
    module, adapter = call.module, call.adapter
    overrides = {
        "kernel": adapter.a,
        "bias": None,
        "use_bias": False,
        "mask": None,
        "out_features": adapter.leaf.rank,
        "kernel_shape": adapter.a.shape,
        "dtype": adapter.a.dtype,
    }
    down = types.SimpleNamespace(**{**vars(module), **overrides})
    xa = nnx.Conv.__call__(down, adapter.drop(call.x).astype(adapter.a.dtype))
    return adapter.up(xa, adapter.a.dtype)


def register_builtin_nnx_layers() -> None:
    """Registers the five nnx kinds (once; called when jaxlora is imported)."""
    register_layer(nnx.Linear, _serve_linear, contraction=lambda module: 1, supports_dora=True)
    register_layer(nnx.LinearGeneral, additive(_dense_general_term), contraction=_linear_general_contraction)
    register_layer(nnx.Einsum, additive(_einsum_served_term), contraction=_einsum_contraction)
    register_layer(nnx.Conv, additive(_conv_term), contraction=_conv_contraction)
    register_layer(
        nnx.Embed, additive(_embed_term), param="embedding", methods=("__call__", "attend"), contraction=lambda m: 1
    )
    mark_builtin(nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Embed)
