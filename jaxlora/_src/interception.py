"""Running a flax.linen model with adapters applied factored: `x W + s·(x A) B`, W + s·A B never formed.

`apply` intercepts the calls of every module whose type has a registered layer kind (see `layer_kinds`) and
whose W has an adapter, and lets the kind compute the call. Adapters of stacked kernels (`stacked_axes`) travel
inside the params collection, next to their kernel (`kernel:lora_a`, `kernel:lora_b`, and `kernel:lora_rng` for
dropout), so that `nn.scan` / `nn.vmap` hand each layer its own slice exactly as they slice the kernel; the layer
then computes `x W_l + s·(x A_l) B_l`, and no stacked or merged kernel is ever formed. An adapter that no kind
serves (a custom module reading its kernel itself, a scanned kernel not declared in `stacked_axes`, ...) is
reported and merged into its weight for that call, or refused with `strict=True`. jaxlora's own options are
arguments of `apply_fn`, never keywords of the call, so every keyword reaches the model; LoRA dropout draws from
the `lora_dropout` rng stream.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from jaxlora._src.config import LoraConfig
from jaxlora._src.layer_kinds import (
    _BUILTIN,
    Adapter,
    LayerCall,
    LayerKind,
    kind_of,
    registered_layers,
    unsupported_dora,
    user_kind_of,
)
from jaxlora._src.model_trace import linen_call
from jaxlora._src.planning import Plan, resolve
from jaxlora._src.serving import DROPOUT_RNG, dropout_rng, leaf_rng, serve_call

__all__ = ["DROPOUT_RNG", "apply", "apply_fn"]


def holds(module: nn.Module, param: str, shape: tuple[int, ...]) -> bool:
    """True if the module's own `param` has the shape the adapter was planned for."""
    if not module.has_variable("params", param):
        return False
    return tuple(module.get_variable("params", param).shape) == shape


def intercepted(
    context: Any, args: tuple, kinds: Callable[[Any], LayerKind | None] = kind_of
) -> tuple[LayerKind, str] | None:
    """The registered kind and the path of W for an intercepted method call that a kind serves, else None."""
    kind = kinds(context.module)
    if kind is None or context.method_name not in kind.methods or not args:
        return None
    return kind, "/".join((*context.module.path, kind.param))


class _Interceptor:
    """The `nn.intercept_methods` hook that serves modules of user-registered kinds while the model is traced.

    `adapters` holds the unstacked adapters by path (a stacked kernel in such a module is served by its operations).
    """

    def __init__(self, adapters: Mapping[str, Adapter]):
        self.adapters = adapters
        self.served: set[str] = set()

    def __call__(self, next_fun, args, kwargs, context):
        module, method = context.module, context.method_name
        found = intercepted(context, args, user_kind_of)
        if found is None:
            return next_fun(*args, **kwargs)
        kind, path = found
        adapter = self.adapters.get(path)
        if adapter is None or not holds(module, kind.param, adapter.leaf.shape):
            return next_fun(*args, **kwargs)  # no adapter here, or a slice of a stacked kernel
        if kind.contraction is not None and kind.contraction(module) != adapter.leaf.fan_in_ndim:
            return next_fun(*args, **kwargs)  # the layer contracts other axes than the adapter was planned for
        if adapter.magnitude is not None and not kind.supports_dora:
            raise ValueError(unsupported_dora(path, type(module)))
        out = kind.serve(LayerCall(module, method, args, kwargs, adapter, base=lambda: next_fun(*args, **kwargs)))
        if out is None:
            return next_fun(*args, **kwargs)
        self.served.add(path)
        return out


def _user_kinds_registered() -> bool:
    return any(kind.module_type not in _BUILTIN for kind in registered_layers().values())


def apply_fn(
    model: nn.Module, plan: Plan | LoraConfig, *, strict: bool = False, fast_dense: bool = True
) -> Callable[..., Any]:
    """A function `fn(variables, adapters, *args, **kwargs)` running `model` with the adapters applied factored.

    The model's call is traced as it is (nothing intercepted, so flax's transforms and their caches see a plain
    call), and each adapted kernel is served by the operation that consumes it: `jnp.einsum`, `lax.dot_general`,
    `jnp.dot`, `@`, flax's Dense/DenseGeneral/Einsum, `lax.conv_general_dilated`, or an embedding lookup, inside
    `nn.jit`, `nn.remat`, `nn.scan`, `nn.vmap`, `nn.share_scope` and `nnx.bridge` layers alike. A use of a kernel
    that has no factored form (the kernel reshaped, masked or passed into a custom_vjp function first, ...) gets
    W + s·A B for that use, with a warning naming the leaf and the cause; `strict=True` refuses instead.

    Every positional and keyword argument after `adapters` goes to `model.apply` unchanged (so a model keyword
    named like a jaxlora option reaches the model). LoRA dropout (`config.dropout`) acts when the call passes an
    rng for the `"lora_dropout"` stream: `fn(variables, adapters, x, rngs={"lora_dropout": key})`.

    Args:
      model: a flax.linen module.
      plan: from `jaxlora.plan(params, config)` (a `LoraConfig` is resolved on each call); build it with
        `model=` and `example=` for kernels whose inputs are not their leading axes.
      strict: refuse adapters that would have to be merged for some use, naming each leaf and its cause.
      fast_dense: route frozen Dense-like products through the same hand-written backward pass.

    Returns:
      The function; it raises ValueError if the adapters or the plan do not fit `variables["params"]`.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxlora
      >>> model = nn.Dense(3)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
      >>> params, adapters = jaxlora.init(jax.random.key(1), params, plan)
      >>> forward = jaxlora.apply_fn(model, plan, strict=True)
      >>> forward({"params": params}, adapters, jnp.ones((1, 4))).shape
      (1, 3)
    """

    def run(variables: Mapping[str, Any], adapters: Mapping, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(variables, Mapping) or "params" not in variables:
            raise ValueError(
                "variables must be a dict with a 'params' collection, as for model.apply({'params': params}, ...)"
            )
        params = variables["params"]
        resolved = resolve(params, plan)
        flat = resolved.check_adapters(adapters)
        context, served = contextlib.nullcontext, set
        key = dropout_rng(kwargs)
        if _user_kinds_registered():  # modules of user-registered kinds are served by their kind while traced
            dropout = resolved.config.dropout
            unstacked = {
                path: Adapter(pair["lora_a"], pair["lora_b"], resolved.leaves[path], dropout,
                              leaf_rng(key, resolved.leaves[path]), pair.get("magnitude"))
                for path, pair in flat.items() if not resolved.leaves[path].stacked_axes
            }  # fmt: skip
            interceptor = _Interceptor(unstacked)
            context, served = (lambda: nn.intercept_methods(interceptor)), (lambda: interceptor.served)
        call = linen_call(model, variables)
        return serve_call(
            call, params, args, kwargs, resolved, flat, key=key, strict=strict, fast=fast_dense, context=context,
            served_by_kinds=served,
        )  # fmt: skip

    return run


def apply(model: nn.Module, variables: Mapping[str, Any], adapters: Mapping, plan: Plan | LoraConfig, *args, **kwargs):
    """`model.apply(variables, *args, **kwargs)` with the adapters in effect, computed factored.

    The same as `apply_fn(model, plan)(variables, adapters, *args, **kwargs)`; use `apply_fn` for jaxlora's
    options (`strict`, `fast_dense`). LoRA dropout draws from `rngs={"lora_dropout": key}`.

    Args:
      model: a flax.linen module.
      variables: `{"params": params, ...}` as for `model.apply`.
      adapters: from `jaxlora.init` (or trained).
      plan: from `jaxlora.plan(params, config)` (a `LoraConfig` is resolved here).
      *args: the model's positional arguments.
      **kwargs: the model's keyword arguments and `model.apply`'s own (`rngs`, `mutable`, `method`, ...).

    Returns:
      What `model.apply` returns.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxlora
      >>> model = nn.Dense(3)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
      >>> params, adapters = jaxlora.init(jax.random.key(1), params, plan)
      >>> y = jaxlora.apply(model, {"params": params}, adapters, plan, jnp.ones((1, 4)))
      >>> bool(jnp.array_equal(y, model.apply({"params": params}, jnp.ones((1, 4)))))  # B = 0
      True
    """
    return apply_fn(model, plan)(variables, adapters, *args, **kwargs)
