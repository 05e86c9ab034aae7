"""Resolving a config against a parameter tree, once: which leaves get adapters, of what shape and scale.

The resolved `Plan` is the object every other function takes: built once from params (or `jax.eval_shape`
output) and a config, immutable and hashable, and checked cheaply against the params it is used with.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora._src.config import LoraConfig, _first_match
from jaxlora._src.immutable import FrozenMapping
from jaxlora._src.paths import PyTree, flatten_adapters, is_array_leaf, leaves_with_paths


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """One adapted leaf: W of `shape` = (*stack, *in, *out), each layer viewed as (fan_in, fan_out).

    The first `stacked_axes` axes stack layers (made by `nn.scan`, `nnx.vmap`, ...); each layer has its own
    adapter, A (*stack, *in, r) and B (*stack, r, *out). `layers` lists the adapted layers (flattened stack
    index), None meaning all of them.
    """

    path: str
    shape: tuple[int, ...]
    dtype: Any
    fan_in_ndim: int
    rank: int
    alpha: float
    scale: float
    stacked_axes: int = 0
    layers: tuple[int, ...] | None = None

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return self.shape[: self.stacked_axes]

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """The shape of one layer's W."""
        return self.shape[self.stacked_axes :]

    @property
    def num_layers(self) -> int:
        """How many stacked layers the leaf holds (1 when it is not stacked)."""
        return math.prod(self.stack_shape)

    @property
    def num_adapted_layers(self) -> int:
        return self.num_layers if self.layers is None else len(self.layers)

    use_dora: bool = False
    # The axes of one layer's W that contract with x (in W's order), when they are not its leading `fan_in_ndim`
    # axes: read from the operation by `plan(..., model=...)`, e.g. (1,) for a (heads, features, head_dim) kernel.
    in_axes: tuple[int, ...] | None = None

    @property
    def layer_in_axes(self) -> tuple[int, ...]:
        """The axes of one layer's W that A contracts with x (A holds them in this order, then r)."""
        return self.in_axes if self.in_axes is not None else tuple(range(self.fan_in_ndim))

    @property
    def layer_out_axes(self) -> tuple[int, ...]:
        """The other axes of one layer's W, which B maps r to (in this order)."""
        return tuple(d for d in range(len(self.layer_shape)) if d not in self.layer_in_axes)

    @property
    def matrix_order(self) -> tuple[int, ...] | None:
        """The permutation of W's axes into (stack, in, out) order, or None when W is in that order already."""
        k = self.stacked_axes
        order = (*range(k), *(k + d for d in self.layer_in_axes), *(k + d for d in self.layer_out_axes))
        return None if order == tuple(range(len(self.shape))) else order

    def to_matrix_order(self, w: Any) -> Any:
        """W with its axes in (stack, in, out) order, the order A B's product has."""
        order = self.matrix_order
        return w if order is None else jnp.transpose(w, order)

    def from_matrix_order(self, w: Any) -> Any:
        """The inverse of `to_matrix_order`: a (stack, in, out)-ordered array back in W's own axis order."""
        order = self.matrix_order
        return w if order is None else jnp.transpose(w, np.argsort(order))

    @property
    def fan_in(self) -> int:
        return math.prod(self.layer_shape[d] for d in self.layer_in_axes)

    @property
    def fan_out(self) -> int:
        return math.prod(self.layer_shape[d] for d in self.layer_out_axes)

    @property
    def in_dims(self) -> tuple[int, ...]:
        return tuple(self.layer_shape[d] for d in self.layer_in_axes)

    @property
    def out_dims(self) -> tuple[int, ...]:
        return tuple(self.layer_shape[d] for d in self.layer_out_axes)

    @property
    def a_shape(self) -> tuple[int, ...]:
        return (*self.stack_shape, *self.in_dims, self.rank)

    @property
    def b_shape(self) -> tuple[int, ...]:
        return (*self.stack_shape, self.rank, *self.out_dims)

    @property
    def magnitude_shape(self) -> tuple[int, ...]:
        """DoRA's magnitude vector: one entry per output column of W (per layer when stacked)."""
        return (*self.stack_shape, *self.out_dims)

    @property
    def num_lora_params(self) -> int:
        per_layer = self.rank * (self.fan_in + self.fan_out) + (self.fan_out if self.use_dora else 0)
        return self.num_adapted_layers * per_layer

    def layer_mask(self) -> np.ndarray | None:
        """1.0 for adapted layers and 0.0 for the others, shaped like the stack; None when every layer is adapted."""
        if self.layers is None:
            return None
        mask = np.zeros(self.num_layers, np.float32)
        mask[list(self.layers)] = 1.0
        return mask.reshape(self.stack_shape)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A config resolved against one parameter tree: adapted leaves, leaves trained in full, every leaf's spec.

    Build it with `jaxlora.plan(params, config)` and hand it to `init`, `apply`, `merge`, `partition`,
    `optimizer`, the shardings and the checkpoints, which then resolve nothing again. It is immutable and
    hashable (a valid static argument of `jax.jit`); `check_params` refuses params it was not built for.
    """

    config: LoraConfig
    leaves: FrozenMapping[str, LeafPlan]
    saved: tuple[str, ...]
    shapes: FrozenMapping[str, tuple[int, ...]]
    dtypes: FrozenMapping[str, np.dtype] = dataclasses.field(repr=False)
    treedef: Any = dataclasses.field(repr=False)

    def check_params(self, params: PyTree) -> None:
        """Raises ValueError, naming the first differing leaf, if `params` is not the tree this plan was built for.

        Cheap: one flatten and a shape/dtype comparison per leaf, with no path strings unless the structure differs.
        """
        leaves, treedef = jax.tree.flatten(params, is_leaf=is_array_leaf)
        if treedef == self.treedef and all(
            tuple(np.shape(x)) == shape and _dtype(x) == dtype
            for x, shape, dtype in zip(leaves, self.shapes.values(), self.dtypes.values(), strict=True)
        ):
            return
        got = {path: (tuple(np.shape(x)), _dtype(x)) for path, x in leaves_with_paths(params)}
        want = {path: (self.shapes[path], self.dtypes[path]) for path in self.shapes}
        if got == want:
            return  # the same leaves under another container type (e.g. FrozenDict vs dict)
        path = next((p for p in want if got.get(p) != want[p]), None) or next(p for p in got if p not in want)
        raise ValueError(
            f"this Plan was built for other params: at {path!r} it expects {_describe(want.get(path))}, "
            f"but the params given have {_describe(got.get(path))}; build the plan from these params with "
            "jaxlora.plan(params, config)"
        )

    @property
    def num_original(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    @property
    def num_lora(self) -> int:
        return sum(leaf.num_lora_params for leaf in self.leaves.values())

    @property
    def num_saved(self) -> int:
        return sum(math.prod(self.shapes[p]) for p in self.saved)

    @property
    def num_trainable(self) -> int:
        return self.num_lora + self.num_saved

    def check_adapters(self, adapters: Mapping) -> dict[str, dict[str, Any]]:
        """Flat `{path: {"lora_a", "lora_b"}}` after checking the adapters fit this plan exactly."""
        flat = flatten_adapters(adapters)
        missing = sorted(set(self.leaves) - set(flat))
        extra = sorted(set(flat) - set(self.leaves))
        if missing or extra:
            raise ValueError(
                "adapters do not fit the params and config: "
                + (f"missing adapters for {missing}; " if missing else "")
                + (f"adapters for leaves the config does not target: {extra}; " if extra else "")
                + "create them with jaxlora.init(key, params, config) using this same config"
            )
        for path, pair in flat.items():
            leaf = self.leaves[path]
            _check_magnitude(path, leaf, pair)
            for name, want in (("lora_a", leaf.a_shape), ("lora_b", leaf.b_shape), ("magnitude", leaf.magnitude_shape)):
                if name not in pair:
                    continue
                got = tuple(np.shape(pair[name]))
                if got != want:
                    stack = f", {leaf.num_layers} stacked layers" if leaf.stacked_axes else ""
                    raise ValueError(
                        f"adapter {path}/{name} has shape {got}, but the plan gives {want} (rank {leaf.rank} for "
                        f"W {leaf.shape}{stack}); were these adapters made with another config or for another "
                        "model? Create them with jaxlora.init(key, params, plan)"
                    )
        return flat

    def table(self) -> str:
        """Per-layer W, bias, A and B shapes and the parameter totals, as users print them."""
        stacked = any(leaf.stacked_axes for leaf in self.leaves.values())
        rows = [("layer", "W", "bias", "lora A", "lora B", *(("stacked layers",) if stacked else ()), "LoRA params")]
        for path, leaf in self.leaves.items():
            layer = path.rpartition("/")[0] or path
            bias = self.shapes.get(f"{layer}/bias")
            layers = f"{leaf.num_adapted_layers} of {leaf.num_layers}" if leaf.stacked_axes else "-"
            rows.append(
                (
                    layer,
                    _shape(leaf.shape),
                    _shape(bias) if bias is not None else "-",
                    _shape(leaf.a_shape),
                    _shape(leaf.b_shape),
                    *((layers,) if stacked else ()),
                    f"{leaf.num_lora_params:,}",
                )
            )
        for path in self.saved:
            size = f"{math.prod(self.shapes[path]):,}"
            rows.append((path, _shape(self.shapes[path]), "", "trained in full", "", *(("",) if stacked else ()), size))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        original, lora = self.num_original, self.num_lora
        lines += [
            "",
            f"original parameters:        {original:>14,}",
            f"original + LoRA parameters: {original + lora:>14,}",
            f"LoRA parameters:            {lora:>14,}  ({100 * lora / original:.3f}% of original)",
        ]
        if self.saved:
            lines.append(f"trained in full:            {self.num_saved:>14,}")
            lines.append(
                f"trainable in all:           {self.num_trainable:>14,}  ({100 * self.num_trainable / original:.3f}%)"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _check_magnitude(path: str, leaf: LeafPlan, pair: Mapping[str, Any]) -> None:
    """DoRA adapters carry a magnitude exactly when the plan says DoRA."""
    if leaf.use_dora and "magnitude" not in pair:
        raise ValueError(
            f"adapter {path} has no 'magnitude', but the config sets use_dora=True; create the adapters with "
            "jaxlora.init(key, params, plan) from this plan, or build the plan with use_dora=False"
        )
    if not leaf.use_dora and "magnitude" in pair:
        raise ValueError(
            f"adapter {path} holds a DoRA 'magnitude', but the config has use_dora=False; build the plan with "
            "LoraConfig(..., use_dora=True) to use DoRA adapters"
        )


def _dtype(leaf: Any) -> np.dtype:
    dtype = getattr(leaf, "dtype", None)
    return np.dtype(dtype if dtype is not None else np.result_type(leaf))


def _describe(spec: tuple[tuple[int, ...], np.dtype] | None) -> str:
    return "no such leaf" if spec is None else f"a {spec[1]} array of shape {spec[0]}"


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _unmatched(patterns: tuple[str, ...] | Mapping[str, Any], paths: list[str]) -> list[str]:
    return [p for p in patterns if not any(re.fullmatch(p, path) for path in paths)]


def plan(
    params: PyTree,
    config: LoraConfig,
    *,
    allow_excess_rank: bool = False,
    model: Any = None,
    example: Any = (),
    example_kwargs: Mapping[str, Any] | None = None,
) -> Plan:
    """Resolves `config` against `params` (arrays or `jax.ShapeDtypeStruct`s); never allocates.

    With `model`, the model's call on `example` is traced once (abstractly: `jax.ShapeDtypeStruct`s will do) and
    each targeted kernel's layout is read from the operations that use it: which of its axes contract with x
    (`in_axes`, so that a (heads, features, head_dim) einsum kernel gets standard LoRA) and how many leading axes
    stack layers (`stacked_axes`, for kernels sliced by `nn.scan` / `nnx.scan` or mapped by vmap). What the config
    sets explicitly (`fan_in_ndim`, `in_axes`, `stacked_axes`) is kept and checked against the operations; the
    plan's config spells out what was read, so that checkpoints restore the same plan without the model.

    Args:
      params: the base parameter tree (linen `params` dict, NNX state, or its `jax.eval_shape`).
      config: what to adapt.
      allow_excess_rank: warn instead of refusing a rank above min(fan_in, fan_out) (which PEFT allows);
        the loaders use it for adapters that exist already. Never with init="pissa".
      model: a flax.linen module (called as `model.apply({"params": params}, *example)`), an nnx module (the plan's
        params are `nnx.state(model, nnx.Param)`), or any function `model(params, *example, **example_kwargs)`.
      example: the positional arguments of one call (a tuple, or a single array).
      example_kwargs: its keyword arguments.

    Returns:
      The `Plan`: hold it and pass it to the other jaxlora functions; `print(plan)` shows the table.

    Raises:
      ValueError: naming the path and the fix, for patterns that match nothing, leaves that cannot carry an
        adapter, and ranks that do not fit.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"dense": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}}
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
      >>> plan.num_lora, plan.leaves["dense/kernel"].a_shape
      (14, (4, 2))
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a jaxlora.LoraConfig, got {type(config).__name__}")
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, Any] = {}
    leaves: dict[str, Any] = {}
    for path, leaf in leaves_with_paths(params):
        shapes[path] = tuple(np.shape(leaf))
        dtypes[path] = _dtype(leaf)
        leaves[path] = leaf
    paths = list(shapes)
    if not paths:
        raise ValueError("params has no array leaves; pass the model's parameter tree (e.g. variables['params'])")

    for field in ("targets", "modules_to_save"):
        bad = _unmatched(getattr(config, field), paths)
        if bad:
            raise ValueError(_no_match_message(field, bad, paths))
    targeted = [p for p in paths if any(re.fullmatch(t, p) for t in config.targets)]
    bad = _unmatched(config.exclude, targeted)
    if bad:
        raise ValueError(_no_match_message("exclude", bad, targeted))
    targeted = [p for p in targeted if not any(re.fullmatch(e, p) for e in config.exclude)]
    if config.predicate is not None:
        targeted = [p for p in targeted if config.predicate(p, leaves[p])]
    if not targeted:
        raise ValueError("LoraConfig selects no leaf: every target is excluded or refused by the predicate")
    for field in ("rank_pattern", "alpha_pattern", "fan_in_ndim", "in_axes", "stacked_axes", "layers_to_transform"):
        bad = _unmatched(getattr(config, field), targeted)
        if bad:
            raise ValueError(_no_match_message(field, bad, targeted))

    saved = tuple(p for p in paths if any(re.fullmatch(m, p) for m in config.modules_to_save))
    both = sorted(set(saved) & set(targeted))
    if both:
        raise ValueError(
            f"{both} are both LoRA targets and modules_to_save; a leaf is either adapted or trained in full: "
            "narrow `targets` or add them to `exclude`"
        )

    if model is not None:
        config = with_layouts(params, config, {p: shapes[p] for p in targeted}, model, example, example_kwargs or {})
    planned = {path: _leaf_plan(path, shapes[path], dtypes[path], config, allow_excess_rank) for path in targeted}
    return Plan(
        config=config,
        leaves=FrozenMapping(planned),
        saved=saved,
        shapes=FrozenMapping(shapes),
        dtypes=FrozenMapping(dtypes),
        treedef=jax.tree.structure(params, is_leaf=is_array_leaf),
    )


def _model_call(model: Any, params: PyTree) -> Callable[..., Any]:
    import flax.linen as nn
    from flax import nnx

    from jaxlora._src.model_trace import linen_call, nnx_call

    if isinstance(model, nn.Module):
        return linen_call(model, {"params": params})
    if isinstance(model, nnx.Module):
        return nnx_call(model)[0]
    if callable(model):
        return model
    raise TypeError(
        f"plan(model=...) takes a flax.linen or nnx module, or a function model(params, *example); got {model!r}"
    )


def with_layouts(
    params: PyTree,
    config: LoraConfig,
    targeted: Mapping[str, tuple[int, ...]],
    model: Any,
    example: Any,
    example_kwargs: Mapping,
) -> LoraConfig:
    """`config` with the in_axes and stacked_axes of the targeted kernels read from `model`'s call on `example`."""
    from jaxlora._src.layouts import usages
    from jaxlora._src.model_trace import trace

    example = example if isinstance(example, tuple) else (example,)
    traced = trace(_model_call(model, params), params, example, example_kwargs)
    found = usages(traced.jaxpr, traced.paths)
    unused = [p for p in targeted if p not in found]
    if unused:
        raise ValueError(
            f"LoRA targets {unused} are not used by the model's call on the example given to jaxlora.plan: an adapter "
            "there would never act; narrow `targets` (or add them to `exclude`), or pass an example (and, for linen, "
            "a model whose call reaches them) that uses them"
        )
    in_axes, stacked = {}, {}
    for path, shape in targeted.items():
        layout = _layout(path, shape, found[path], config)
        if layout is None:
            continue
        axes, stack = layout
        exact = re.escape(path)
        if stack and _first_match(config.stacked_axes, path, None) is None:
            stacked[exact] = stack
        explicit = _first_match(config.fan_in_ndim, path, None) is not None or _first_match(config.in_axes, path, None)
        if not explicit and axes != tuple(range(len(shape) - stack - 1)):
            in_axes[exact] = axes
    if not in_axes and not stacked:
        return config
    return dataclasses.replace(
        config, in_axes={**in_axes, **config.in_axes}, stacked_axes={**stacked, **config.stacked_axes}
    )


def _layout(path: str, shape: tuple[int, ...], uses: list, config: LoraConfig) -> tuple[tuple[int, ...], int] | None:
    """(in_axes, stacked axes) of one kernel from its usages, None if no usage has a factored form (apply names why)."""
    good = [u for u in uses if u.contracted is not None]
    if not good:
        return None
    stacks = sorted({u.stacked for u in good})
    if len(stacks) > 1:
        raise ValueError(
            f"the kernel {path!r} {shape} is used with {stacks} stacked layer axes by different operations "
            f"({', '.join(u.op for u in good)}); one adapter layout cannot serve both: exclude it from the targets"
        )
    stack = stacks[0]
    declared = _first_match(config.stacked_axes, path, None)
    if declared is not None and declared != stack:
        raise ValueError(
            f"stacked_axes gives {declared} for {path!r} {shape}, but the model's operations see {stack} stacked layer "
            f"axes before one layer's kernel (sliced by nn.scan/nnx.scan or mapped by vmap): set stacked_axes to "
            f"{stack} for it, or leave it out and let plan read it"
        )
    gathers = [u for u in good if u.op == "gather"]
    axes = gathers[0].contracted if gathers else good[0].contracted
    other = tuple(d for d in range(len(shape) - stack) if d not in axes)
    clash = [u for u in good if u.contracted not in (axes, other)]
    if clash:
        raise ValueError(
            f"the kernel {path!r} {shape} is contracted with x over axes {axes} by {good[0].op} and over "
            f"{clash[0].contracted} by {clash[0].op}; one adapter layout cannot serve both: exclude it from the targets"
        )
    return axes, stack


def _leaf_plan(
    path: str, shape: tuple[int, ...], dtype: Any, config: LoraConfig, allow_excess_rank: bool = False
) -> LeafPlan:
    """The plan of one targeted leaf, after checking that it can carry the adapter the config asks for."""
    if not jnp.issubdtype(dtype, jnp.floating) or len(shape) < 2:
        raise ValueError(
            f"LoRA target {path!r} is a {dtype} array of shape {shape}; adapters need a floating-point "
            "array of rank >= 2: narrow `targets` or add it to `exclude`"
        )
    stacked = config.stacked_axes_for(path)
    if len(shape) - stacked < 2:
        limit = len(shape) - 2
        fix = f"use at most {limit}" if limit >= 0 else "narrow `targets` or add it to `exclude`"
        raise ValueError(
            f"LoRA target {path!r} of shape {shape} with stacked_axes={stacked} leaves "
            f"{max(len(shape) - stacked, 0)} axes per layer; a layer's W needs an input and an output axis: {fix}"
        )
    fan_in_ndim = _first_match(config.fan_in_ndim, path, len(shape) - stacked - 1)
    in_axes = _first_match(config.in_axes, path, None)
    if in_axes is not None:
        layer_ndim = len(shape) - stacked
        if in_axes[-1] >= layer_ndim or len(in_axes) >= layer_ndim:
            raise ValueError(
                f"in_axes={in_axes} for {path!r} of shape {shape} (stacked_axes={stacked}): one layer's kernel has "
                f"axes 0..{layer_ndim - 1}, and at least one of them must be left as an output axis; fix in_axes"
            )
        fan_in_ndim = len(in_axes)
        in_axes = None if in_axes == tuple(range(fan_in_ndim)) else in_axes
    if fan_in_ndim >= len(shape) - stacked:
        raise ValueError(
            f"fan_in_ndim={fan_in_ndim} for {path!r} of shape {shape} (stacked_axes={stacked}) leaves no output "
            f"axis; use 1..{len(shape) - stacked - 1}"
        )
    entry = LeafPlan(
        path=path,
        shape=shape,
        dtype=np.dtype(dtype),
        fan_in_ndim=fan_in_ndim,
        rank=config.rank_for(path),
        alpha=float(config.alpha_for(path)),
        scale=config.scale_for(path),
        stacked_axes=stacked,
        layers=_first_match(config.layers_to_transform, path, None),
        use_dora=config.use_dora,
        in_axes=in_axes,
    )
    if entry.use_dora and stacked:
        raise ValueError(
            f"DoRA (use_dora) on the stacked kernel {path!r} is not supported yet: use plain LoRA for stacked layers, "
            "or unstack them"
        )
    if entry.layers is not None:
        if not stacked:
            raise ValueError(
                f"layers_to_transform selects layers of {path!r}, but its kernel {shape} is not stacked: "
                "set stacked_axes for it, or drop it from layers_to_transform"
            )
        if entry.layers and entry.layers[-1] >= entry.num_layers:
            raise ValueError(
                f"layers_to_transform for {path!r} names layer {entry.layers[-1]}, but it stacks "
                f"{entry.num_layers} layers (shape {entry.stack_shape}); use indices 0..{entry.num_layers - 1}"
            )
    if entry.rank > min(entry.fan_in, entry.fan_out) and allow_excess_rank and config.init != "pissa":
        _warn_excess_rank(entry)
    elif entry.rank > min(entry.fan_in, entry.fan_out):
        raise ValueError(
            f"rank {entry.rank} for {path!r} exceeds min(fan_in, fan_out) = {min(entry.fan_in, entry.fan_out)} "
            f"of W {shape}; a LoRA update cannot have a higher rank than W: lower `rank` or set `rank_pattern`"
        )
    return entry


def _warn_excess_rank(leaf: LeafPlan) -> None:
    import warnings

    warnings.warn(
        f"the adapter for {leaf.path!r} has rank {leaf.rank}, above min(fan_in, fan_out) = "
        f"{min(leaf.fan_in, leaf.fan_out)} of W {leaf.shape}: its update s·A B has rank at most "
        f"{min(leaf.fan_in, leaf.fan_out)}, so the extra rank only costs memory (it loads and merges correctly)",
        stacklevel=3,
    )


def resolve(params: PyTree, plan_or_config: Plan | LoraConfig) -> Plan:
    """The plan to use with `params`: a `Plan` checked against them, or one built from a `LoraConfig`."""
    if isinstance(plan_or_config, Plan):
        plan_or_config.check_params(params)
        return plan_or_config
    if isinstance(plan_or_config, LoraConfig):
        return plan(params, plan_or_config)
    raise TypeError(
        f"expected a jaxlora.Plan (from jaxlora.plan(params, config)) or a jaxlora.LoraConfig, "
        f"got {type(plan_or_config).__name__}"
    )


def summary(params: PyTree, config: LoraConfig) -> str:
    """The dry-run table for `config` over `params`, without creating any adapter (same as `str(plan(...))`).

    Args:
      params: the base params (or their `jax.eval_shape`).
      config: what to adapt.

    Returns:
      The table: per-layer W, bias, A and B shapes and the parameter totals.

    Example:
      >>> import jax.numpy as jnp, jaxlora
      >>> print(jaxlora.summary({"dense": {"kernel": jnp.ones((4, 3))}}, jaxlora.LoraConfig(rank=1)).splitlines()[-1])
      LoRA parameters:                         7  (58.333% of original)
    """
    return plan(params, config).table()


def _no_match_message(field: str, bad: list[str], paths: list[str]) -> str:
    shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
    return (
        f'LoraConfig.{field}: {bad} match no parameter path (patterns must fully match "/"-joined paths '
        f"such as {shown}); fix or remove them"
    )
