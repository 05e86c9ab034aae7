"""The registry of layer kinds: for each module type, how its LoRA term is computed factored.

A `LayerKind` says which param holds the module's W (`param`), which methods compute with it (`methods`),
how many leading axes of W the layer contracts (`contraction`), and how to serve a call with an adapter
(`serve`). Every kind has the same `serve(call) -> output | None` signature; None means "cannot serve this
call", and the adapter is then merged for the call instead. The built-in linen kinds are registered through
the same `register_layer` a user calls for a module type of their own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxlora._src.planning import LeafPlan


@dataclasses.dataclass(frozen=True)
class Adapter:
    """One adapter as a layer kind sees it during a call: A, B, their plan, and the LoRA dropout on its input."""

    a: jax.Array
    b: jax.Array
    leaf: LeafPlan
    dropout: float = 0.0
    rng: jax.Array | None = None
    magnitude: jax.Array | None = None  # DoRA's m, for kinds registered with supports_dora

    @property
    def scale(self) -> float:
        return self.leaf.scale

    def drop(self, x: jax.Array) -> jax.Array:
        """`x` with LoRA dropout applied (inverted dropout), or `x` itself when no rng was given."""
        if self.rng is None or (isinstance(self.dropout, float) and self.dropout == 0.0):
            return x
        keep = jax.random.bernoulli(self.rng, 1.0 - self.dropout, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros((), x.dtype))

    def up(self, xa: jax.Array, out_dtype: Any) -> jax.Array:
        """s·(xa B) for xa of shape (..., r), cast to the base output's dtype."""
        return (self.scale * jnp.tensordot(xa, self.b, axes=1)).astype(out_dtype)


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One intercepted call of a registered layer: what a kind's `serve` function receives.

    `base()` runs the layer's own computation (x W + bias, the plain lookup, ...); `adapter` is None when a
    kind that `serves_frozen` is asked to run a layer without adapter.
    """

    module: Any
    method: str
    args: tuple
    kwargs: Mapping[str, Any]
    adapter: Adapter | None
    base: Callable[[], Any]

    @property
    def x(self) -> jax.Array:
        """The layer's first positional input."""
        return self.args[0]


ServeFn = Callable[[LayerCall], Any]


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """How one module type is served factored.

    Attributes:
      module_type: the module class (subclasses are served by it unless they are registered themselves).
      serve: `serve(call) -> output or None`; None leaves the call to the merge fallback.
      param: the name of the param holding W ("kernel", "embedding", ...).
      methods: the module methods that compute with W.
      contraction: `contraction(module) -> int or None`, how many leading axes of W the layer contracts with
        its input; an adapter planned with another `fan_in_ndim` (or None: not factorable) is not served.
        Leave it None to accept the plan's `fan_in_ndim` as is.
      serves_frozen: also route calls without adapter through `serve` (the built-in Dense does, so frozen
        layers use the same hand-written backward pass).
      supports_dora: `serve` handles DoRA adapters; DoRA adapters on other kinds are refused, naming the kind.
    """

    module_type: type
    serve: ServeFn
    param: str = "kernel"
    methods: tuple[str, ...] = ("__call__",)
    contraction: Callable[[Any], int | None] | None = None
    serves_frozen: bool = False
    supports_dora: bool = False


_REGISTRY: dict[type, LayerKind] = {}


def _is_module_type(module_type: Any) -> bool:
    import flax.linen as nn
    from flax import nnx

    return isinstance(module_type, type) and issubclass(module_type, nn.Module | nnx.Module)


def register_layer(
    module_type: type,
    serve: ServeFn | None = None,
    *,
    param: str = "kernel",
    methods: tuple[str, ...] | str = ("__call__",),
    contraction: Callable[[Any], int | None] | None = None,
    serves_frozen: bool = False,
    supports_dora: bool = False,
) -> LayerKind:
    """Registers how `jaxlora.apply` serves adapters of a module type factored, instead of merging them.

    Args:
      module_type: a flax module class whose param `param` is the adapted W.
      serve: `serve(call: LayerCall) -> output or None`. Default: `additive(linear_term)`, right for any layer
        computing `x·W` over the last `fan_in_ndim` axes of its first input (plus anything else it adds).
      param: the name of W in the module's params.
      methods: the methods that compute with W.
      contraction: see `LayerKind`.
      serves_frozen: also route calls without adapter through `serve`.
      supports_dora: `serve` handles DoRA adapters (`call.adapter.magnitude` set); other kinds refuse them.

    Returns:
      The registered `LayerKind`.

    Raises:
      TypeError: if `module_type` is not a flax module class.
      ValueError: if it is registered already (call `unregister_layer` first to replace it).

    Example:
      >>> import flax.linen as nn, jax.numpy as jnp, jaxlora
      >>> class Projection(nn.Module):
      ...     features: int
      ...     @nn.compact
      ...     def __call__(self, x):
      ...         w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
      ...         return jnp.einsum("...i,io->...o", x, w)
      >>> kind = jaxlora.register_layer(Projection)
      >>> kind.param
      'kernel'
      >>> _ = jaxlora.unregister_layer(Projection)
    """
    if not _is_module_type(module_type):
        raise TypeError(
            f"register_layer needs a flax module class (a subclass of flax.linen.Module or flax.nnx.Module), "
            f"got {module_type!r}; pass the class itself, e.g. jaxlora.register_layer(MyDense)"
        )
    if module_type in _REGISTRY:
        raise ValueError(
            f"{module_type.__qualname__} is registered already; call jaxlora.unregister_layer("
            f"{module_type.__qualname__}) first to replace its kind"
        )
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    kind = LayerKind(
        module_type=module_type,
        serve=serve if serve is not None else additive(linear_term),
        param=param,
        methods=methods,
        contraction=contraction,
        serves_frozen=serves_frozen,
        supports_dora=supports_dora,
    )
    _REGISTRY[module_type] = kind
    return kind


def unregister_layer(module_type: type) -> LayerKind:
    """Removes the kind registered for exactly `module_type` and returns it.

    Args:
      module_type: the class given to `register_layer`.

    Returns:
      The removed `LayerKind`.

    Raises:
      KeyError: naming `module_type` if no kind is registered for it.

    Example:
      See `register_layer`.
    """
    try:
        return _REGISTRY.pop(module_type)
    except KeyError:
        raise KeyError(f"no layer kind is registered for {module_type!r}") from None


def registered_layers() -> dict[type, LayerKind]:
    """A copy of the registry.

    Returns:
      `{module type: LayerKind}`, the built-in kinds included.

    Example:
      >>> import flax.linen as nn, jaxlora
      >>> jaxlora.layers.registered_layers()[nn.Embed].methods
      ('__call__', 'attend')
    """
    return dict(_REGISTRY)


_BUILTIN: set[type] = set()


def mark_builtin(*module_types: type) -> None:
    """Marks kinds that jaxlora registers itself: `jaxlora.apply` serves those modules by their operations."""
    _BUILTIN.update(module_types)


def user_kind_of(module: Any) -> LayerKind | None:
    """The kind serving `module` if a user registered it (jaxlora's own kinds are served by their operations)."""
    kind = kind_of(module)
    return None if kind is None or kind.module_type in _BUILTIN else kind


def kind_of(module: Any) -> LayerKind | None:
    """The kind serving `module`: its own class's, else the nearest registered base class's.

    Args:
      module: a module instance.

    Returns:
      The `LayerKind`, or None if no class in its MRO is registered.

    Example:
      >>> import flax.linen as nn, jaxlora
      >>> class Wide(nn.Dense): pass
      >>> jaxlora.layers.kind_of(Wide(4)).module_type is nn.Dense
      True
    """
    for cls in type(module).__mro__:
        kind = _REGISTRY.get(cls)
        if kind is not None:
            return kind
    return None


def unsupported_dora(path: str, layer_type: type) -> str:
    """The refusal for a DoRA adapter on a layer whose registered kind does not declare `supports_dora`."""
    return (
        f"DoRA (use_dora=True) is not supported for {layer_type.__qualname__} layers (at {path!r}), whose "
        "registered kind does not declare supports_dora: exclude this layer from the targets (LoraConfig.exclude) "
        "or use plain LoRA for it"
    )


def additive(term: Callable[[LayerCall], jax.Array | None]) -> ServeFn:
    """A serve function computing `base() + term(call)`, for kinds whose LoRA term adds to the layer's output.

    Args:
      term: `term(call) -> the LoRA contribution`, or None when it cannot serve this call.

    Returns:
      A serve function for `register_layer` (it leaves calls without adapter to the layer itself).

    Example:
      >>> import flax.linen as nn, jaxlora
      >>> class Scaled(nn.Dense): pass
      >>> kind = jaxlora.register_layer(Scaled, jaxlora.layers.additive(jaxlora.layers.linear_term))
      >>> _ = jaxlora.unregister_layer(Scaled)
    """

    def serve(call: LayerCall) -> Any:
        if call.adapter is None:
            return None
        delta = term(call)
        if delta is None:
            return None
        base = call.base()
        return base + delta.astype(base.dtype)

    return serve


def linear_term(call: LayerCall) -> jax.Array:
    """s·(x A) B contracting the last `fan_in_ndim` axes of the input with A's leading axes (any dense layer).

    Args:
      call: the intercepted call; its first positional argument is x.

    Returns:
      The LoRA term, in the adapter's dtype.

    Example:
      >>> import jax.numpy as jnp, jaxlora
      >>> leaf = jaxlora.LeafPlan("k", (4, 3), jnp.float32, 1, 1, 2.0, 2.0)
      >>> adapter = jaxlora.layers.Adapter(jnp.ones((4, 1)), jnp.ones((1, 3)), leaf)
      >>> call = jaxlora.layers.LayerCall(None, "__call__", (jnp.ones((1, 4)),), {}, adapter, lambda: None)
      >>> jaxlora.layers.linear_term(call).tolist()
      [[8.0, 8.0, 8.0]]
    """
    adapter = call.adapter
    k = adapter.leaf.fan_in_ndim
    x = adapter.drop(call.x).astype(adapter.a.dtype)
    xa = lax.dot_general(x, adapter.a, ((tuple(range(x.ndim - k, x.ndim)), tuple(range(k))), ((), ())))
    return adapter.up(xa, adapter.a.dtype)
