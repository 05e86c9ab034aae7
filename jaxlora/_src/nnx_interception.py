"""Running a flax.nnx module with adapters applied factored: `x W + s·(x A) B`, W + s·A B never formed.

`apply_nnx` traces a call of a fresh copy of the module (never the user's module) and serves each adapted kernel by
the operation that consumes it (see `serving`), inside `nnx.jit`, `nnx.remat`, `nnx.scan`, `nnx.vmap` and
`nnx.bridge` layers alike. Layers of a type a user registered with `register_layer` are switched, in that copy, to
a subclass whose methods route through the kind.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx

from jaxlora._src.adapter_module import AdapterModule
from jaxlora._src.config import LoraConfig
from jaxlora._src.layer_kinds import (
    _BUILTIN,
    Adapter,
    LayerCall,
    LayerKind,
    registered_layers,
    unsupported_dora,
    user_kind_of,
)
from jaxlora._src.model_trace import nnx_call
from jaxlora._src.planning import Plan, resolve
from jaxlora._src.serving import dropout_rng, leaf_rng, serve_call


class _Call:
    """The adapters of the user-registered layers of one call, by layer object, and the paths their kinds served."""

    def __init__(self, adapters: Mapping[int, Adapter]):
        self.adapters = adapters
        self.served: set[str] = set()


_current: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("jaxlora_nnx_call", default=None)


def _param_shape(module: Any, kind: LayerKind) -> tuple[int, ...]:
    return tuple(getattr(module, kind.param)[...].shape)


def _serve(module: Any, method: str, original: Callable, args: tuple, kwargs: dict) -> Any:
    """One method call of a user-registered layer: through its kind when it has an adapter here, else as it is."""
    call = _current.get()
    kind = user_kind_of(module)
    base = functools.partial(original, module, *args, **kwargs)
    if call is None or kind is None or not args:
        return base()
    adapter = call.adapters.get(id(module))
    if adapter is None or _param_shape(module, kind) != adapter.leaf.shape:
        return base()
    if kind.contraction is not None and kind.contraction(module) != adapter.leaf.fan_in_ndim:
        return base()
    if adapter.magnitude is not None and not kind.supports_dora:
        layer_type = getattr(module, "jaxlora_layer_type", type(module))
        raise ValueError(unsupported_dora(adapter.leaf.path, layer_type))
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


def _attach(copy: Any, flat: Mapping, plan: Plan, key: jax.Array | None) -> _Call:
    """Switches the layers of `copy` with a user-registered kind and an (unstacked) adapter to their served types."""
    adapters = {}
    for path, pair in flat.items():
        leaf = plan.leaves[path]
        module_path, _, param = path.rpartition("/")
        layer = _submodule(copy, module_path)
        kind = user_kind_of(layer)
        if kind is None or kind.param != param or leaf.stacked_axes:
            continue  # served by its operations
        layer.__class__ = _served_type(getattr(layer, "jaxlora_layer_type", type(layer)), kind.methods)
        rng = leaf_rng(key, leaf)
        adapters[id(layer)] = Adapter(
            pair["lora_a"], pair["lora_b"], leaf, plan.config.dropout, rng, pair.get("magnitude")
        )
    return _Call(adapters)


def apply_nnx_fn(plan: Plan | LoraConfig, *, strict: bool = False) -> Callable[..., Any]:
    """A function `fn(module, adapters, *args, **kwargs)` calling an nnx module with the adapters applied factored.

    The plan is built on the module's params, `nnx.state(module, nnx.Param)` (with `model=module, example=...` for
    kernels whose inputs are not their leading axes). The module itself is never modified: the call runs on a
    fresh copy, whose state changes are dropped. Each adapted kernel is served by the operation that consumes it,
    inside any nnx transform; a use with no factored form gets W + s·A B for that use, with a warning naming the
    leaf and the cause (`strict=True` refuses instead). LoRA dropout acts when the call passes
    `rngs={"lora_dropout": key}` (that keyword is taken by jaxlora; every other one reaches the module).

    Args:
      plan: from `jaxlora.plan(nnx.state(module, nnx.Param), config)` (a `LoraConfig` is resolved each call).
      strict: refuse adapters that would have to be merged for some use, naming each leaf and its cause.

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
        call, params = nnx_call(module)
        resolved = resolve(params, plan)
        flat = resolved.check_adapters(adapters)
        rngs = kwargs.get("rngs")
        key = dropout_rng(kwargs)
        if isinstance(rngs, Mapping) and set(rngs) == {"lora_dropout"}:
            kwargs = {k: v for k, v in kwargs.items() if k != "rngs"}
        state = _Call({})
        if any(kind.module_type not in _BUILTIN for kind in registered_layers().values()):

            def call(params, *args, **kwargs):  # the copy's user-registered layers route through their kinds
                return _call_with_kinds(module, params, flat, resolved, key, state, args, kwargs)

        return serve_call(
            call, params, args, kwargs, resolved, flat, key=key, strict=strict, served_by_kinds=lambda: state.served
        )

    return run


def _call_with_kinds(module, params, flat, plan, key, state: _Call, args, kwargs) -> Any:
    graphdef, _, rest = nnx.split(module, nnx.Param, ...)
    copy = nnx.merge(graphdef, params, rest)
    attached = _attach(copy, flat, plan, key)
    state.adapters = attached.adapters
    token = _current.set(state)
    try:
        return copy(*args, **kwargs)
    finally:
        _current.reset(token)


def apply_nnx(module: nnx.Module, adapters: Mapping, plan: Plan | LoraConfig, *args: Any, **kwargs: Any) -> Any:
    """`module(*args, **kwargs)` with the adapters in effect, computed factored; the module is not modified.

    The same as `apply_nnx_fn(plan)(module, adapters, *args, **kwargs)`.

    Args:
      module: an nnx module, whatever layers and transforms it uses (see `apply_nnx_fn`).
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
