"""A model call traced once into a jaxpr whose first inputs are the parameter leaves, for linen and NNX alike.

`trace(call, params, args, kwargs)` traces `call(params, *args, **kwargs)` with the model untouched (no interceptor,
no patched function), so that flax's transforms and their caches see exactly a plain call. Array leaves of the
arguments become inputs of the jaxpr; everything else (flags, Python numbers, strings) is fixed at trace time, as
under `jax.jit` with static arguments. A quantized kernel is traced as the float array it stands for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from jaxlora._src.paths import PyTree, is_array_leaf, leaves_with_paths
from jaxlora._src.quantization import dequantize, is_quantized


@dataclasses.dataclass(frozen=True)
class Traced:
    """A traced call: its jaxpr, the parameter paths of its first inputs, its other inputs, and its output's form."""

    jaxpr: Any  # a ClosedJaxpr
    paths: tuple[str, ...]
    params: tuple[Any, ...]  # the parameter leaves (quantized kernels as they are)
    inputs: tuple[Any, ...]  # the array leaves of the arguments
    out_tree: Any
    out_static: tuple[Any, ...]  # the output's leaves, None where an array comes from the jaxpr

    def output(self, arrays: list[Any]) -> Any:
        it = iter(arrays)
        leaves = [next(it) if s is _ARRAY else s for s in self.out_static]
        return jax.tree.unflatten(self.out_tree, leaves)


_ARRAY = object()


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | np.generic | jax.ShapeDtypeStruct)


def _placeholder(leaf: Any) -> Any:
    """What the plain model sees for a parameter leaf during tracing (a quantized kernel's float stand-in)."""
    if is_quantized(leaf):
        return jax.eval_shape(dequantize, leaf)
    return leaf


def trace(call: Callable[..., Any], params: PyTree, args: tuple, kwargs: Mapping[str, Any]) -> Traced:
    """Traces `call(params, *args, **kwargs)`; see the module docstring."""
    paths, param_leaves = zip(*leaves_with_paths(params), strict=True) if params else ((), ())
    param_tree = jax.tree.structure(params, is_leaf=is_array_leaf)
    arg_leaves, arg_tree = jax.tree.flatten((args, dict(kwargs)))
    dynamic = [i for i, leaf in enumerate(arg_leaves) if _is_array(leaf)]
    out_box: dict[str, Any] = {}

    def plain(param_values, dynamic_values):
        leaves = list(arg_leaves)
        for i, value in zip(dynamic, dynamic_values, strict=True):
            leaves[i] = value
        call_args, call_kwargs = jax.tree.unflatten(arg_tree, leaves)
        out = call(jax.tree.unflatten(param_tree, param_values), *call_args, **call_kwargs)
        out_leaves, out_box["tree"] = jax.tree.flatten(out)
        out_box["static"] = tuple(_ARRAY if _is_array(x) else x for x in out_leaves)
        return [x for x in out_leaves if _is_array(x)]

    inputs = tuple(arg_leaves[i] for i in dynamic)
    jaxpr = jax.make_jaxpr(plain)([_placeholder(p) for p in param_leaves], list(inputs))
    return Traced(jaxpr, tuple(paths), tuple(param_leaves), inputs, out_box["tree"], out_box["static"])


def linen_call(model: Any, variables: Mapping[str, Any]) -> Callable[..., Any]:
    """`call(params, *args, **kwargs)` running a linen module with `params` in place of `variables["params"]`."""

    def call(params, *args, **kwargs):
        return model.apply({**variables, "params": params}, *args, **kwargs)

    return call


def nnx_call(module: Any) -> tuple[Callable[..., Any], PyTree]:
    """`call(params, *args, **kwargs)` calling a fresh copy of an nnx module with `params` as its nnx.Param state,
    and the module's params. The module itself is never touched; the copy's state changes are dropped."""
    from flax import nnx

    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def call(params, *args, **kwargs):  # new Variables for the rest too: the copy may change them (rng counts)
        return nnx.merge(graphdef, params, jax.tree.map(lambda x: x, rest))(*args, **kwargs)

    return call, params
