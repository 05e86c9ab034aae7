"""Running a flax.linen model with adapters applied factored: `x W + s·(x A) B`, W + s·A B never formed.

`apply` intercepts the calls of every module whose type has a registered layer kind (see `layer_kinds`) and
whose W has an adapter, and lets the kind compute the call. An adapter that no kind serves (a custom module
reading its kernel itself, a kernel stacked by `nn.scan`, ...) is reported and merged into its weight for that
call, or refused with `strict=True`. jaxlora's own options are arguments of `apply_fn`, never keywords of the
call, so every keyword reaches the model; LoRA dropout draws from the `lora_dropout` rng stream.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from jaxlora._src.builtin_layers import inside_adapter
from jaxlora._src.config import LoraConfig
from jaxlora._src.layer_kinds import Adapter, LayerCall, kind_of
from jaxlora._src.merging import add_deltas
from jaxlora._src.planning import Plan, resolve

DROPOUT_RNG = "lora_dropout"


def _holds(module: nn.Module, param: str, shape: tuple[int, ...]) -> bool:
    """True if the module's own `param` has the shape the adapter was planned for."""
    if not module.has_variable("params", param):
        return False
    return tuple(module.get_variable("params", param).shape) == shape


class _Interceptor:
    """The `nn.intercept_methods` hook that serves registered layers factored and records which it served."""

    def __init__(self, adapters: Mapping[str, Adapter], fast_dense: bool):
        self.adapters = adapters
        self.fast_dense = fast_dense
        self.served: set[str] = set()

    def __call__(self, next_fun, args, kwargs, context):
        module, method = context.module, context.method_name
        kind = None if inside_adapter.get() else kind_of(module)
        if kind is None or method not in kind.methods or not args:
            return next_fun(*args, **kwargs)
        path = "/".join((*module.path, kind.param))
        adapter = self.adapters.get(path)
        if adapter is not None and not _holds(module, kind.param, adapter.leaf.shape):
            adapter = None  # e.g. a slice of a kernel stacked by nn.scan: left to the merge fallback
        planned_axes = None if adapter is None else adapter.leaf.fan_in_ndim
        if kind.contraction is not None and adapter is not None and kind.contraction(module) != planned_axes:
            return next_fun(*args, **kwargs)  # the layer contracts other axes than the adapter was planned for
        if adapter is None and not (kind.serves_frozen and self.fast_dense):
            return next_fun(*args, **kwargs)
        if adapter is not None and adapter.magnitude is not None and not kind.supports_dora:
            raise ValueError(unsupported_dora_message(path, module))
        call = LayerCall(module, method, args, kwargs, adapter, base=lambda: next_fun(*args, **kwargs))
        out = kind.serve(call)
        if out is None:
            return next_fun(*args, **kwargs)
        if adapter is not None:
            self.served.add(path)
        return out


def unsupported_dora_message(path: str, module: nn.Module) -> str:
    return (
        f"DoRA (use_dora=True) is not supported yet for {type(module).__qualname__} layers (at {path!r}); "
        "jaxlora serves DoRA for flax.linen.Dense: exclude this layer from the targets (LoraConfig.exclude) or "
        "use plain LoRA for it"
    )


def _dropout_rng(kwargs: Mapping[str, Any]) -> jax.Array | None:
    rngs = kwargs.get("rngs")
    return rngs.get(DROPOUT_RNG) if isinstance(rngs, Mapping) else None


def apply_fn(
    model: nn.Module, plan: Plan | LoraConfig, *, strict: bool = False, fast_dense: bool = True
) -> Callable[..., Any]:
    """A function `fn(variables, adapters, *args, **kwargs)` running `model` with the adapters applied factored.

    Every positional and keyword argument after `adapters` goes to `model.apply` unchanged (so a model keyword
    named like a jaxlora option reaches the model). LoRA dropout (`config.dropout`) acts when the call passes an
    rng for the `"lora_dropout"` stream: `fn(variables, adapters, x, rngs={"lora_dropout": key})`.

    Args:
      model: a flax.linen module.
      plan: from `jaxlora.plan(params, config)` (a `LoraConfig` is resolved on each call).
      strict: refuse adapters no registered layer kind serves, instead of merging them for the call.
      fast_dense: route frozen `nn.Dense` layers through the same hand-written backward pass.

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
        dropout_rng = _dropout_rng(kwargs)

        def adapter(path: str) -> Adapter:
            rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, zlib.crc32(path.encode()))
            pair = flat[path]
            leaf = resolved.leaves[path]
            return Adapter(pair["lora_a"], pair["lora_b"], leaf, resolved.config.dropout, rng, pair.get("magnitude"))

        adapters_by_path = {path: adapter(path) for path in flat}
        interceptor = _Interceptor(adapters_by_path, fast_dense)
        with nn.intercept_methods(interceptor):
            out = model.apply(variables, *args, **kwargs)
        unserved = sorted(set(flat) - interceptor.served)
        if not unserved:
            return out
        message = (
            f"adapters for {unserved} are not consumed by a layer jaxlora can serve factored (a module type "
            "without a registered layer kind, a kernel stacked by nn.scan, DenseGeneral batch_dims, a grouped "
            "conv, or a fan_in_ndim that does not match the layer's contraction)"
        )
        if strict:
            raise ValueError(
                message + "; register the module type with jaxlora.register_layer(ModuleType, ...), fix "
                "`fan_in_ndim`/`targets`, or merge explicitly with jaxlora.merge"
            )
        warnings.warn(
            message + "; merging them into their weights for this call (register the module type with "
            "jaxlora.register_layer to serve it factored)",
            stacklevel=3,
        )
        merged = add_deltas(params, {p: flat[p] for p in unserved}, resolved.leaves)
        served = {p: a for p, a in adapters_by_path.items() if p not in unserved}
        with nn.intercept_methods(_Interceptor(served, fast_dense)):
            return model.apply({**variables, "params": merged}, *args, **kwargs)

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
