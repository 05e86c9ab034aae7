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

import warnings
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax

from jaxlora._src.builtin_layers import inside_adapter
from jaxlora._src.config import LoraConfig
from jaxlora._src.layer_kinds import Adapter, LayerCall, LayerKind, kind_of
from jaxlora._src.merging import add_deltas, masked_b
from jaxlora._src.paths import PyTree
from jaxlora._src.planning import LeafPlan, Plan, resolve

DROPOUT_RNG = "lora_dropout"


def _holds(module: nn.Module, param: str, shape: tuple[int, ...]) -> bool:
    """True if the module's own `param` has the shape the adapter was planned for."""
    if not module.has_variable("params", param):
        return False
    return tuple(module.get_variable("params", param).shape) == shape


def _slot(param: str, name: str) -> str:
    """The params entry that carries a stacked adapter's `name` ("lora_a", ...) next to the kernel `param`."""
    return f"{param}:{name}"


def intercepted(context: Any, args: tuple) -> tuple[LayerKind, str] | None:
    """The registered kind and the path of W for an intercepted method call that a kind serves, else None."""
    kind = None if inside_adapter.get() else kind_of(context.module)
    if kind is None or context.method_name not in kind.methods or not args:
        return None
    return kind, "/".join((*context.module.path, kind.param))


class _Interceptor:
    """The `nn.intercept_methods` hook that serves registered layers factored and records which it served.

    `adapters` holds the unstacked adapters by path; `stacked` the plans of the stacked ones, whose per-layer
    slices the module finds in its own params (see `_with_stacked_adapters`).
    """

    def __init__(self, adapters: Mapping[str, Adapter], stacked: Mapping[str, LeafPlan], dropout: float, fast_dense):
        self.adapters = adapters
        self.stacked = stacked
        self.dropout = dropout
        self.fast_dense = fast_dense
        self.served: set[str] = set()

    def _layer_slice(self, module: nn.Module, param: str, path: str) -> Adapter | None:
        """The adapter slice of the stacked layer `module` computes (inside nn.scan), or None if it has none."""
        leaf = self.stacked.get(path)
        if leaf is None or not module.has_variable("params", _slot(param, "lora_a")):
            return None
        a = module.get_variable("params", _slot(param, "lora_a"))
        b = module.get_variable("params", _slot(param, "lora_b"))
        k = leaf.stacked_axes
        if a.shape != leaf.a_shape[k:] or b.shape != leaf.b_shape[k:] or not _holds(module, param, leaf.layer_shape):
            return None  # the whole stack, not one layer of it: left to the merge fallback
        rng = None
        if module.has_variable("params", _slot(param, "lora_rng")):
            rng = jax.random.wrap_key_data(module.get_variable("params", _slot(param, "lora_rng")))
        return Adapter(a, b, leaf, self.dropout, rng)

    def __call__(self, next_fun, args, kwargs, context):
        module, method = context.module, context.method_name
        found = intercepted(context, args)
        if found is None:
            return next_fun(*args, **kwargs)
        kind, path = found
        adapter = self.adapters.get(path)
        if adapter is not None and not _holds(module, kind.param, adapter.leaf.shape):
            adapter = None  # e.g. a slice of a kernel stacked by nn.scan, not declared in stacked_axes
        if adapter is None:
            adapter = self._layer_slice(module, kind.param, path)
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


def _leaf_rng(dropout_rng: jax.Array | None, leaf: LeafPlan) -> jax.Array | None:
    """The dropout key of one adapted leaf: one key per stacked layer, shaped like the stack."""
    if dropout_rng is None:
        return None
    key = jax.random.fold_in(dropout_rng, zlib.crc32(leaf.path.encode()))
    if not leaf.stacked_axes:
        return key
    return jax.random.split(key, leaf.num_layers).reshape(leaf.stack_shape)


def _with_stacked_adapters(params: PyTree, entries: Mapping[str, Any]) -> PyTree:
    """`params` (nested mappings) with extra leaves at the "/"-joined paths of `entries`, in new dicts."""
    out = dict(params)
    children: dict[str, dict[str, Any]] = {}
    for path, value in entries.items():
        head, _, rest = path.partition("/")
        if rest:
            children.setdefault(head, {})[rest] = value
        else:
            out[head] = value
    for head, sub in children.items():
        out[head] = _with_stacked_adapters(params[head], sub)
    return out


def _stacked_entries(flat: Mapping, plan: Plan, dropout_rng: jax.Array | None, paths) -> dict[str, Any]:
    """The params entries carrying the stacked adapters at `paths`: A, B (masked to layers_to_transform), keys."""
    entries = {}
    for path in paths:
        leaf = plan.leaves[path]
        entries[_slot(path, "lora_a")] = flat[path]["lora_a"]
        entries[_slot(path, "lora_b")] = masked_b(flat[path]["lora_b"], leaf)
        rng = _leaf_rng(dropout_rng, leaf)
        if rng is not None:
            entries[_slot(path, "lora_rng")] = jax.random.key_data(rng)
    return entries


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
        dropout_rng, dropout = _dropout_rng(kwargs), resolved.config.dropout
        stacked = {path: leaf for path, leaf in resolved.leaves.items() if leaf.stacked_axes}

        def adapter(path: str) -> Adapter:
            leaf, pair = resolved.leaves[path], flat[path]
            rng = _leaf_rng(dropout_rng, leaf)
            return Adapter(pair["lora_a"], pair["lora_b"], leaf, dropout, rng, pair.get("magnitude"))

        def run_with(params, unstacked, stacked_paths):
            entries = _stacked_entries(flat, resolved, dropout_rng, stacked_paths)
            served_stacked = {p: stacked[p] for p in stacked_paths}
            interceptor = _Interceptor(unstacked, served_stacked, dropout, fast_dense)
            with nn.intercept_methods(interceptor):
                out = model.apply({**variables, "params": _with_stacked_adapters(params, entries)}, *args, **kwargs)
            return out, interceptor.served

        adapters_by_path = {path: adapter(path) for path in flat if path not in stacked}
        out, served = run_with(params, adapters_by_path, list(stacked))
        unserved = sorted(set(flat) - served)
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
        still = {p: a for p, a in adapters_by_path.items() if p not in unserved}
        return run_with(merged, still, [p for p in stacked if p not in unserved])[0]

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
