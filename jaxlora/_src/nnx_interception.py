"""Running a flax.nnx module with adapters applied factored: `x W + s·(x A) B`, W + s·A B never formed.

`apply_nnx` works on a private copy of the module (`nnx.merge(*nnx.split(module))`), never on the user's module.
In the copy, every layer whose type has a registered kind and whose W has an adapter is switched to a subclass
whose methods route through that kind. Unstacked adapters are looked up by the layer object; stacked ones
(`stacked_axes`) are attached to the stacked layer as `nnx.Param` variables (`kernel_lora_a`, `kernel_lora_b`,
`kernel_lora_rng`), so that `nnx.scan` hands each layer its own slice exactly as it slices the kernel.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora._src.adapter_module import AdapterModule
from jaxlora._src.config import LoraConfig
from jaxlora._src.interception import _dropout_rng, _leaf_rng
from jaxlora._src.layer_kinds import Adapter, LayerCall, LayerKind, kind_of
from jaxlora._src.merging import add_deltas, masked_b
from jaxlora._src.planning import Plan, resolve


class LoraVariable(nnx.Param):
    """An adapter factor attached to a stacked layer of jaxlora's private copy (sliced by nnx.scan like W)."""


class _Call:
    """What the served layers of one `apply_nnx` call share: unstacked adapters by layer, and the paths served.

    Stacked adapters count as served once attached to a layer whose kind fits them (their slices are served inside
    nnx.scan, whose trace may be reused from an earlier call, so they cannot report themselves).
    """

    def __init__(self, adapters: Mapping[int, Adapter], stacked_paths: set[str]):
        self.adapters = adapters
        self.served: set[str] = set(stacked_paths)


_current: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("jaxlora_nnx_call", default=None)


def _param_shape(module: Any, kind: LayerKind) -> tuple[int, ...]:
    return tuple(getattr(module, kind.param)[...].shape)


def _attached(module: Any, kind: LayerKind) -> Adapter | None:
    """The stacked adapter slice attached to `module` (a layer inside nnx.scan), if it is one layer's slice.

    Everything that may change from call to call (A, s·B, dropout keys and rate) comes from the layer's state, and
    the leaf plan kept on the layer has scale 1: transforms such as nnx.scan may reuse a trace made in an earlier
    call, and that trace must not hold an earlier call's values.
    """
    leaf = getattr(module, "jaxlora_leaf", None)
    if leaf is None:
        return None
    a, b = getattr(module, f"{kind.param}_lora_a")[...], getattr(module, f"{kind.param}_lora_b")[...]
    k = leaf.stacked_axes
    if a.shape != leaf.a_shape[k:] or b.shape != leaf.b_shape[k:] or _param_shape(module, kind) != leaf.layer_shape:
        return None  # the whole stack, not one layer of it: left to the layer itself
    rng_data = getattr(module, f"{kind.param}_lora_rng", None)
    if rng_data is None:
        return Adapter(a, b, leaf)
    rate = getattr(module, f"{kind.param}_lora_dropout")[...]
    return Adapter(a, b, leaf, rate, jax.random.wrap_key_data(rng_data[...]))


def _serve(module: Any, method: str, original: Callable, args: tuple, kwargs: dict) -> Any:
    """One method call of a served layer: through its kind when it has an adapter here, else the layer itself."""
    call = _current.get()
    kind = kind_of(module)
    base = functools.partial(original, module, *args, **kwargs)
    if call is None or kind is None or not args:
        return base()
    adapter = call.adapters.get(id(module))
    if adapter is not None and _param_shape(module, kind) != adapter.leaf.shape:
        adapter = None
    if adapter is None:
        adapter = _attached(module, kind)
    if adapter is None or (kind.contraction is not None and kind.contraction(module) != adapter.leaf.fan_in_ndim):
        return base()
    if adapter.magnitude is not None and not kind.supports_dora:
        layer_type = getattr(module, "jaxlora_layer_type", type(module))
        raise ValueError(
            f"DoRA (use_dora=True) is not supported yet for {layer_type.__qualname__} layers (at "
            f"{adapter.leaf.path!r}); jaxlora serves DoRA for nnx.Linear and linen nn.Dense: exclude this layer from "
            "the targets (LoraConfig.exclude) or use plain LoRA for it"
        )
    out = kind.serve(LayerCall(module, method, args, kwargs, adapter, base))
    if out is None:
        return base()
    call.served.add(adapter.leaf.path)
    return out


@functools.cache
def _served_type(layer_type: type, methods: tuple[str, ...]) -> type:
    """A subclass of `layer_type` whose `methods` route through `_serve` (made once per type)."""

    def route(name: str) -> Callable:
        original = getattr(layer_type, name)

        @functools.wraps(original)
        def method(self, *args, **kwargs):
            return _serve(self, name, original, args, kwargs)

        return method

    namespace = {name: route(name) for name in methods}
    namespace["jaxlora_layer_type"] = layer_type
    return type(f"LoRA{layer_type.__name__}", (layer_type,), namespace)


def _submodule(root: Any, module_path: str) -> Any:
    node = root
    for name in module_path.split("/") if module_path else ():
        node = node[int(name)] if isinstance(node, list | tuple | nnx.List) else getattr(node, name)
    return node


def _attach(copy: Any, flat: Mapping, plan: Plan, dropout_rng: jax.Array | None) -> _Call:
    """Switches the adapted layers of `copy` to their served types and gives them their adapters."""
    adapters, stacked = {}, set()
    for path, pair in flat.items():
        leaf = plan.leaves[path]
        module_path, _, param = path.rpartition("/")
        layer = _submodule(copy, module_path)
        kind = kind_of(layer)
        if kind is None or kind.param != param:
            continue  # no kind serves this leaf: the merge fallback takes it
        layer.__class__ = _served_type(getattr(layer, "jaxlora_layer_type", type(layer)), kind.methods)
        rng = _leaf_rng(dropout_rng, leaf)
        if not leaf.stacked_axes:
            magnitude = pair.get("magnitude")  # DoRA
            adapters[id(layer)] = Adapter(pair["lora_a"], pair["lora_b"], leaf, plan.config.dropout, rng, magnitude)
            continue
        fits = kind.contraction is None or kind.contraction(layer) == leaf.fan_in_ndim
        if not fits or _param_shape(layer, kind) != leaf.shape:
            continue  # the merge fallback takes it
        stacked.add(path)
        layer.jaxlora_leaf = dataclasses.replace(leaf, scale=1.0, alpha=1.0, layers=None)  # static: no values
        setattr(layer, f"{param}_lora_a", LoraVariable(pair["lora_a"]))
        setattr(layer, f"{param}_lora_b", LoraVariable(leaf.scale * masked_b(pair["lora_b"], leaf)))
        if rng is not None:
            setattr(layer, f"{param}_lora_rng", LoraVariable(jax.random.key_data(rng)))
            rate = jnp.full(leaf.stack_shape, plan.config.dropout, jnp.float32)
            setattr(layer, f"{param}_lora_dropout", LoraVariable(rate))
    return _Call(adapters, stacked)


def apply_nnx_fn(plan: Plan | LoraConfig, *, strict: bool = False) -> Callable[..., Any]:
    """A function `fn(module, adapters, *args, **kwargs)` calling an nnx module with the adapters applied factored.

    The plan is built on the module's params, `nnx.state(module, nnx.Param)`. The module itself is never
    modified: the call runs on a private copy. LoRA dropout acts when the call passes
    `rngs={"lora_dropout": key}` (that keyword is taken by jaxlora; every other one reaches the module).

    Args:
      plan: from `jaxlora.plan(nnx.state(module, nnx.Param), config)` (a `LoraConfig` is resolved each call).
      strict: refuse adapters no registered layer kind serves, instead of merging them for the call.

    Returns:
      The function; it raises ValueError if the adapters or the plan do not fit the module's params.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> from flax import nnx
      >>> layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> plan = jaxlora.plan(nnx.state(layer, nnx.Param), jaxlora.LoraConfig(rank=2))
      >>> _, adapters = jaxlora.init(jax.random.key(1), nnx.state(layer, nnx.Param), plan)
      >>> jaxlora.apply_nnx_fn(plan, strict=True)(layer, adapters, jnp.ones((1, 4))).shape
      (1, 3)
    """

    def run(module: nnx.Module, adapters: Mapping | AdapterModule, *args: Any, **kwargs: Any) -> Any:
        if isinstance(adapters, AdapterModule):
            adapters = adapters.tree()
        params = nnx.state(module, nnx.Param)
        resolved = resolve(params, plan)
        flat = resolved.check_adapters(adapters)
        rngs = kwargs.get("rngs")
        dropout_rng = _dropout_rng(kwargs)
        if isinstance(rngs, Mapping) and set(rngs) == {"lora_dropout"}:
            kwargs = {k: v for k, v in kwargs.items() if k != "rngs"}
        out, served = _call(module, None, flat, resolved, dropout_rng, args, kwargs)
        unserved = sorted(set(flat) - served)
        if not unserved:
            return out
        message = (
            f"adapters for {unserved} are not consumed by an nnx layer jaxlora can serve factored (a layer type "
            "without a registered kind, a scanned kernel not declared in stacked_axes, a layer rebuilt by a "
            "transform inside the model, or a fan_in_ndim that does not match the layer's contraction)"
        )
        if strict:
            raise ValueError(message + "; register the layer type with jaxlora.register_layer, or fix the config")
        warnings.warn(message + "; merging them into their weights for this call", stacklevel=2)
        merged = add_deltas(params, {p: flat[p] for p in unserved}, resolved.leaves)
        still = {p: pair for p, pair in flat.items() if p not in unserved}
        return _call(module, merged, still, resolved, dropout_rng, args, kwargs)[0]

    return run


def _call(module, merged_params, flat, plan, dropout_rng, args, kwargs) -> tuple[Any, set[str]]:
    """Calls a private copy of `module` (with `merged_params` put in, if given) serving the adapters in `flat`."""
    graphdef, state = nnx.split(module)
    copy = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))  # new Variables: the module's are never touched
    if merged_params is not None:
        nnx.update(copy, merged_params)
    state = _attach(copy, flat, plan, dropout_rng)
    token = _current.set(state)
    try:
        return copy(*args, **kwargs), state.served
    finally:
        _current.reset(token)


def apply_nnx(module: nnx.Module, adapters: Mapping, plan: Plan | LoraConfig, *args: Any, **kwargs: Any) -> Any:
    """`module(*args, **kwargs)` with the adapters in effect, computed factored; the module is not modified.

    The same as `apply_nnx_fn(plan)(module, adapters, *args, **kwargs)`.

    Args:
      module: an nnx module (Linear, LinearGeneral, Einsum, Conv and Embed layers are served factored, stacked
        ones inside `nnx.scan` too).
      adapters: from `jaxlora.init(key, nnx.state(module, nnx.Param), plan)` (or trained), or a
        `jaxlora.AdapterModule` holding them (for `nnx.Optimizer`).
      plan: from `jaxlora.plan(nnx.state(module, nnx.Param), config)`.
      *args: the module's positional arguments.
      **kwargs: its keyword arguments; `rngs={"lora_dropout": key}` switches on LoRA dropout.

    Returns:
      What the module returns.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> from flax import nnx
      >>> layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> params = nnx.state(layer, nnx.Param)
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
      >>> _, adapters = jaxlora.init(jax.random.key(1), params, plan)
      >>> bool(jnp.array_equal(jaxlora.apply_nnx(layer, adapters, plan, jnp.ones((1, 4))), layer(jnp.ones((1, 4)))))
      True
    """
    return apply_nnx_fn(plan)(module, adapters, *args, **kwargs)
