"""The flax.linen layer kinds jaxlora serves factored out of the box: Dense, DenseGeneral, Einsum, Conv, Embed.

Each is registered with `register_layer`, exactly as a user registers a module type of their own.
"""

from __future__ import annotations

import contextvars
import string
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from jaxlora._src.dora import dora_linear, dora_linear_dropout
from jaxlora._src.layer_kinds import Adapter, LayerCall, additive, linear_term, mark_builtin, register_layer
from jaxlora._src.linear import lora_linear
from jaxlora._src.quantization import embedding_rows, is_quantized, quantized_attend, quantized_linear

# Set while jaxlora computes an adapter term with a helper module, so that its calls are not intercepted.
inside_adapter = contextvars.ContextVar("jaxlora_inside_adapter", default=False)


def _plain_dense(module: nn.Dense) -> bool:
    """True for an nn.Dense whose arithmetic `lora_linear` reproduces exactly."""
    return (
        type(module).__call__ is nn.Dense.__call__
        and module.precision is None
        and module.dot_general is None
        and module.dot_general_cls is None
    )


def serve_dense(call: LayerCall) -> Any:
    """nn.Dense through the hand-written `lora_linear` VJP (frozen ones too); other Dense variants additively."""
    module = call.module
    if not (_plain_dense(module) and len(call.args) == 1 and not call.kwargs):
        if call.adapter is not None and call.adapter.magnitude is not None:
            raise ValueError(
                f"DoRA is served for a plain flax.linen.Dense call; {type(module).__qualname__} at "
                f"{'/'.join(module.path)!r} sets precision/dot_general or is called with extra arguments: "
                "exclude it from the targets or use plain LoRA for it"
            )
        return additive(linear_term)(call)
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    if is_quantized(kernel):
        return serve_quantized_dense(call, kernel, bias)
    x, kernel, bias = promote_dtype(call.x, kernel, bias, dtype=module.dtype)
    adapter = call.adapter
    if adapter is not None and adapter.magnitude is not None:
        return serve_dora_dense(x, kernel, bias, adapter)
    if adapter is None:
        return lora_linear(x, x, kernel, bias, None, None, 1.0)
    return lora_linear(x, adapter.drop(x), kernel, bias, adapter.a, adapter.b, adapter.scale)


def serve_dora_dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, adapter: Adapter) -> jax.Array:
    """DoRA through the hand-written `dora_linear` VJP; with LoRA dropout active, PEFT's training-mode form."""
    x_lora = adapter.drop(x)
    if x_lora is x:
        return dora_linear(x, kernel, bias, adapter.a, adapter.b, adapter.magnitude, adapter.scale)
    return dora_linear_dropout(x, x_lora, kernel, bias, adapter.a, adapter.b, adapter.magnitude, adapter.scale)


def serve_quantized_dense(call: LayerCall, kernel: Any, bias: jax.Array | None) -> jax.Array:
    """nn.Dense over a quantized kernel: `quantized_linear` dequantizes it inside the forward and backward pass."""
    adapter, module = call.adapter, call.module
    if adapter is not None and adapter.magnitude is not None:
        raise ValueError(
            f"DoRA on a quantized kernel ({'/'.join(module.path)!r}) is not supported yet: use plain LoRA on the "
            "quantized base (use_dora=False), or keep this kernel in float"
        )
    dtype = module.dtype or jnp.result_type(call.x, kernel.dtype)
    x = jnp.asarray(call.x, dtype)
    bias = None if bias is None else jnp.asarray(bias, dtype)
    if adapter is None:
        return quantized_linear(x, x, kernel, bias, None, None, 1.0)
    return quantized_linear(x, adapter.drop(x), kernel, bias, adapter.a, adapter.b, adapter.scale)


def _dense_general_contraction(module: nn.DenseGeneral) -> int | None:
    if module.batch_dims:
        return None
    return len(module.axis) if isinstance(module.axis, tuple | list) else 1


def _dense_general_term(call: LayerCall) -> jax.Array:
    module, adapter = call.module, call.adapter
    axis = module.axis if isinstance(module.axis, tuple | list) else (module.axis,)
    x = adapter.drop(call.x).astype(adapter.a.dtype)
    axis = tuple(ax % x.ndim for ax in axis)
    xa = lax.dot_general(x, adapter.a, ((axis, tuple(range(len(axis)))), ((), ())))
    return adapter.up(xa, adapter.a.dtype)


def _einsum_axes(module: nn.Einsum) -> tuple[str, str, str, str] | None:
    """(x subscripts, contracted kernel subscripts, kept kernel subscripts, output) if LoRA factors, else None."""
    spec = module.einsum_str.replace(" ", "")
    if "..." in spec or spec.count("->") != 1 or spec.count(",") != 1:
        return None
    inputs, out = spec.split("->")
    x_sub, k_sub = inputs.split(",")
    k_in = "".join(c for c in k_sub if c in x_sub)
    k_out = "".join(c for c in k_sub if c not in x_sub)
    # Factorable only when the kernel's leading axes are contracted away and the rest are outputs.
    if k_sub != k_in + k_out or not k_in or any(c in out for c in k_in):
        return None
    return x_sub, k_in, k_out, out


def _einsum_contraction(module: nn.Einsum) -> int | None:
    axes = _einsum_axes(module)
    return None if axes is None else len(axes[1])


def _einsum_term(call: LayerCall) -> jax.Array:
    adapter = call.adapter
    x_sub, k_in, k_out, out = _einsum_axes(call.module)
    r = next(c for c in string.ascii_letters if c not in x_sub + k_in + k_out + out)
    x_kept = "".join(c for c in x_sub if c not in k_in)
    xa = jnp.einsum(f"{x_sub},{k_in}{r}->{x_kept}{r}", adapter.drop(call.x).astype(adapter.a.dtype), adapter.a)
    return jnp.einsum(f"{x_kept}{r},{r}{k_out}->{out}", adapter.scale * xa, adapter.b)


def _conv_contraction(module: nn.Conv) -> int | None:
    if module.feature_group_count != 1:
        return None
    window = module.kernel_size if isinstance(module.kernel_size, tuple | list) else (module.kernel_size,)
    return len(window) + 1


def _conv_term(call: LayerCall) -> jax.Array:
    """The same convolution with A as its kernel (features = r), then the 1x1 up-projection by B."""
    adapter = call.adapter
    down = call.module.clone(parent=None, features=adapter.leaf.rank, use_bias=False, dtype=adapter.a.dtype)
    token = inside_adapter.set(True)
    try:
        xa = down.apply({"params": {"kernel": adapter.a}}, adapter.drop(call.x).astype(adapter.a.dtype))
    finally:
        inside_adapter.reset(token)
    return adapter.up(xa, adapter.a.dtype)


def _embed_term(call: LayerCall) -> jax.Array:
    adapter = call.adapter
    if call.method == "__call__":
        return adapter.up(jnp.take(adapter.a, call.x, axis=0), adapter.a.dtype)
    # attend: q Eᵀ, so the update adds s·(q Bᵀ) Aᵀ.
    q = adapter.drop(call.x).astype(adapter.b.dtype)
    qb = lax.dot_general(q, adapter.b, (((q.ndim - 1,), (1,)), ((), ())))
    return adapter.scale * lax.dot_general(qb, adapter.a, (((qb.ndim - 1,), (1,)), ((), ())))


def serve_embed(call: LayerCall) -> Any:
    """nn.Embed: the LoRA term added to the lookup / attend; over a quantized table, the base is computed here
    (a lookup decodes only its rows, `attend` decodes the table inside its forward and backward pass)."""
    module = call.module
    table = module.get_variable("params", "embedding")
    if not is_quantized(table):
        return additive(_embed_term)(call)
    if call.method == "__call__":
        if not jnp.issubdtype(jnp.asarray(call.x).dtype, jnp.integer):
            raise ValueError("Input type must be an integer or unsigned integer.")  # flax's own check
        base = embedding_rows(table, call.x, module.dtype or table.scale.dtype)
    else:
        dtype = module.dtype or jnp.result_type(call.x, table.scale.dtype)
        base = quantized_attend(jnp.asarray(call.x, dtype), table)
    if call.adapter is None:
        return base
    return base + _embed_term(call).astype(base.dtype)


def register_builtin_layers() -> None:
    """Registers the five linen kinds (once; called when jaxlora is imported)."""
    register_layer(nn.Dense, serve_dense, contraction=lambda module: 1, serves_frozen=True, supports_dora=True)
    register_layer(nn.DenseGeneral, additive(_dense_general_term), contraction=_dense_general_contraction)
    register_layer(nn.Einsum, additive(_einsum_term), contraction=_einsum_contraction)
    register_layer(nn.Conv, additive(_conv_term), contraction=_conv_contraction)
    register_layer(
        nn.Embed,
        serve_embed,
        param="embedding",
        methods=("__call__", "attend"),
        contraction=lambda m: 1,
        serves_frozen=True,  # a quantized table needs serving without adapter too
    )
    mark_builtin(nn.Dense, nn.DenseGeneral, nn.Einsum, nn.Conv, nn.Embed)
