"""Running a flax.linen model with adapters applied factored: `x W + s·(x A) B`, W + s·A B never formed.

`apply` intercepts the calls of Dense, DenseGeneral, Einsum, Conv and Embed modules whose kernel
has an adapter. An adapter that no intercepted module consumes (a custom module reading the kernel
itself, say) is reported and merged into its weight for that call, or refused with `strict=True`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import string
import warnings
import zlib
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from jaxlora.config import LoraConfig
from jaxlora.linear import lora_linear
from jaxlora.merge import add_deltas, merge
from jaxlora.plan import LeafPlan, plan

# Set while jaxlora computes an adapter term with a helper module, so that its calls are not intercepted.
_inside_adapter = contextvars.ContextVar("jaxlora_inside_adapter", default=False)


@dataclasses.dataclass
class _Adapter:
    """An adapter as the interceptor uses it: the pair, its plan, and the dropout applied to its input."""

    a: jax.Array
    b: jax.Array
    leaf: LeafPlan
    dropout: float
    rng: jax.Array | None

    def drop(self, x: jax.Array) -> jax.Array:
        if self.rng is None or self.dropout == 0.0:
            return x
        keep = jax.random.bernoulli(self.rng, 1.0 - self.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros((), x.dtype))

    def up(self, xa: jax.Array, out_dtype) -> jax.Array:
        """s·(xa) B with xa of shape (..., r), cast to the base output's dtype."""
        return (self.leaf.scale * jnp.tensordot(xa, self.b, axes=1)).astype(out_dtype)


def _module_path(module: nn.Module, leaf: str) -> str:
    return "/".join((*module.path, leaf))


def _holds(module: nn.Module, leaf: str, shape: tuple[int, ...]) -> bool:
    """True if the module's own `leaf` param has the shape the adapter was planned for."""
    if not module.has_variable("params", leaf):
        return False
    return tuple(module.get_variable("params", leaf).shape) == shape


def _plain_dense(module: nn.Dense) -> bool:
    """True for an nn.Dense whose arithmetic `lora_linear` reproduces exactly."""
    return (
        type(module).__call__ is nn.Dense.__call__
        and module.precision is None
        and module.dot_general is None
        and module.dot_general_cls is None
    )


def _dense(module: nn.Dense, x: jax.Array, adapter: _Adapter | None) -> jax.Array:
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=module.dtype)
    if adapter is None:
        return lora_linear(x, x, kernel, bias, None, None, 1.0)
    return lora_linear(x, adapter.drop(x), kernel, bias, adapter.a, adapter.b, adapter.leaf.scale)


def _dense_general_term(module: nn.Module, x: jax.Array, adapter: _Adapter, out_dtype) -> jax.Array | None:
    axis = getattr(module, "axis", -1)
    axis = tuple(axis) if isinstance(axis, tuple | list) else (axis,)
    if getattr(module, "batch_dims", ()) or len(axis) != adapter.leaf.fan_in_ndim:
        return None
    axis = tuple(ax % x.ndim for ax in axis)
    xl = adapter.drop(x).astype(adapter.a.dtype)
    xa = lax.dot_general(xl, adapter.a, ((axis, tuple(range(len(axis)))), ((), ())))
    return adapter.up(xa, out_dtype)


def _einsum_term(module: nn.Einsum, x: jax.Array, adapter: _Adapter, out_dtype) -> jax.Array | None:
    spec = module.einsum_str.replace(" ", "")
    if "..." in spec or spec.count("->") != 1 or spec.count(",") != 1:
        return None
    inputs, out = spec.split("->")
    x_sub, k_sub = inputs.split(",")
    k_in = "".join(c for c in k_sub if c in x_sub)
    k_out = "".join(c for c in k_sub if c not in x_sub)
    # Factorable only when the kernel's leading axes are contracted away and the rest are outputs.
    if k_sub != k_in + k_out or len(k_in) != adapter.leaf.fan_in_ndim or any(c in out for c in k_in):
        return None
    r = next(c for c in string.ascii_letters if c not in spec)
    x_kept = "".join(c for c in x_sub if c not in k_in)
    xa = jnp.einsum(f"{x_sub},{k_in}{r}->{x_kept}{r}", adapter.drop(x).astype(adapter.a.dtype), adapter.a)
    return jnp.einsum(f"{x_kept}{r},{r}{k_out}->{out}", adapter.leaf.scale * xa, adapter.b).astype(out_dtype)


def _conv_term(module: nn.Conv, x: jax.Array, adapter: _Adapter, out_dtype) -> jax.Array | None:
    if module.feature_group_count != 1 or adapter.leaf.fan_in_ndim != len(adapter.leaf.shape) - 1:
        return None
    down = module.clone(parent=None, features=adapter.leaf.rank, use_bias=False, dtype=adapter.a.dtype)
    token = _inside_adapter.set(True)
    try:
        xa = down.apply({"params": {"kernel": adapter.a}}, adapter.drop(x).astype(adapter.a.dtype))
    finally:
        _inside_adapter.reset(token)
    return adapter.up(xa, out_dtype)


def _embed_term(module: nn.Embed, method: str, x: jax.Array, adapter: _Adapter, out_dtype) -> jax.Array | None:
    if adapter.leaf.fan_in_ndim != 1:
        return None
    if method == "__call__":
        return adapter.up(jnp.take(adapter.a, x, axis=0), out_dtype)
    # attend: q Eᵀ, so the update adds s·(q Bᵀ) Aᵀ.
    q = adapter.drop(x).astype(adapter.b.dtype)
    qb = lax.dot_general(q, adapter.b, (((q.ndim - 1,), (1,)), ((), ())))
    return (adapter.leaf.scale * lax.dot_general(qb, adapter.a, (((qb.ndim - 1,), (1,)), ((), ())))).astype(out_dtype)


class _Interceptor:
    """The `nn.intercept_methods` hook that serves adapted layers factored and records which it served."""

    def __init__(self, adapters: dict[str, _Adapter], fast_dense: bool):
        self.adapters = adapters
        self.fast_dense = fast_dense
        self.served: set[str] = set()

    def __call__(self, next_fun, args, kwargs, context):
        module, method = context.module, context.method_name
        if _inside_adapter.get() or not isinstance(module, nn.Dense | nn.DenseGeneral | nn.Einsum | nn.Conv | nn.Embed):
            return next_fun(*args, **kwargs)
        leaf = "embedding" if isinstance(module, nn.Embed) else "kernel"
        path = _module_path(module, leaf)
        adapter = self.adapters.get(path)
        if adapter is not None and not _holds(module, leaf, adapter.leaf.shape):
            adapter = None  # e.g. a slice of a kernel stacked by nn.scan: left to the merge fallback
        plain_call = method == "__call__" and len(args) == 1 and not kwargs
        if plain_call and isinstance(module, nn.Dense) and _plain_dense(module) and (adapter or self.fast_dense):
            if adapter is not None:
                self.served.add(path)
            return _dense(module, args[0], adapter)
        if adapter is None or not args:
            return next_fun(*args, **kwargs)
        base = next_fun(*args, **kwargs)
        if isinstance(module, nn.Embed):
            term = (
                _embed_term(module, method, args[0], adapter, base.dtype) if method in ("__call__", "attend") else None
            )
        elif method != "__call__":
            term = None
        elif isinstance(module, nn.Dense | nn.DenseGeneral):
            term = _dense_general_term(module, args[0], adapter, base.dtype)
        elif isinstance(module, nn.Einsum):
            term = _einsum_term(module, args[0], adapter, base.dtype)
        else:
            term = _conv_term(module, args[0], adapter, base.dtype)
        if term is None:
            return base
        self.served.add(path)
        return base + term


def apply(
    model: nn.Module,
    variables: dict[str, Any],
    adapters: dict,
    config: LoraConfig,
    *args: Any,
    dropout_rng: jax.Array | None = None,
    mode: Literal["factored", "merged"] = "factored",
    strict: bool = False,
    fast_dense: bool = True,
    **kwargs: Any,
) -> Any:
    """`model.apply(variables, *args, **kwargs)` with the adapters in effect.

    mode="factored" (default) computes `x W + s·(x A) B` layer by layer; mode="merged" applies
    `merge(params, adapters)` first. LoRA dropout (`config.dropout`) acts only when `dropout_rng`
    is given. Adapters that cannot be served factored are merged for this call with a warning,
    or refused with `strict=True`. `fast_dense` routes frozen nn.Dense layers through the same
    hand-written backward pass (identical forward arithmetic).
    """
    if "params" not in variables:
        raise ValueError(
            "variables must be a dict with a 'params' collection, as for model.apply({'params': params}, ...)"
        )
    params = variables["params"]
    resolved = plan(params, config)
    flat = resolved.check_adapters(adapters)
    if mode == "merged":
        return model.apply({**variables, "params": merge(params, adapters, config)}, *args, **kwargs)
    if mode != "factored":
        raise ValueError(f"mode must be 'factored' or 'merged', got {mode!r}")

    def adapter(path: str) -> _Adapter:
        rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, zlib.crc32(path.encode()))
        pair = flat[path]
        return _Adapter(pair["lora_a"], pair["lora_b"], resolved.leaves[path], config.dropout, rng)

    interceptor = _Interceptor({path: adapter(path) for path in flat}, fast_dense)
    with nn.intercept_methods(interceptor):
        out = model.apply(variables, *args, **kwargs)
    unserved = sorted(set(flat) - interceptor.served)
    if not unserved:
        return out
    message = (
        f"adapters for {unserved} are not consumed by a Dense/DenseGeneral/Einsum/Conv/Embed call that "
        "jaxlora can serve factored (custom module, batch_dims, grouped conv, or a fan_in_ndim that does not "
        "match the layer's contraction)"
    )
    if strict:
        raise ValueError(message + "; use mode='merged' or fix `fan_in_ndim`/`targets`")
    warnings.warn(message + "; merging them into their weights for this call", stacklevel=2)
    merged = add_deltas(params, {p: flat[p] for p in unserved}, resolved.leaves)
    served = {p: a for p, a in interceptor.adapters.items() if p not in unserved}
    with nn.intercept_methods(_Interceptor(served, fast_dense)):
        return model.apply({**variables, "params": merged}, *args, **kwargs)
