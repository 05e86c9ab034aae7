"""One model call with its adapters served by the operations that consume the kernels (linen and NNX alike).

`serve_call` traces the plain call (`model_trace`), tags every adapted kernel with its adapter (and, for the fast
path and quantized bases, every frozen kernel), runs the traced program with the tagged kernels served
(`interpreter`), and reports, per leaf, the one cause of every use it had to merge instead: under `strict=True`
as a ValueError, otherwise as a warning.
"""

from __future__ import annotations

import contextlib
import warnings
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora._src.interpreter import Options, Record, run
from jaxlora._src.merging import masked_b
from jaxlora._src.model_trace import trace
from jaxlora._src.operands import Operand
from jaxlora._src.paths import PyTree
from jaxlora._src.planning import LeafPlan, Plan
from jaxlora._src.quantization import is_quantized

DROPOUT_RNG = "lora_dropout"


def dropout_rng(kwargs: Mapping[str, Any]) -> jax.Array | None:
    """The key of the `lora_dropout` rng stream in a call's `rngs=` keyword, if any."""
    rngs = kwargs.get("rngs")
    return rngs.get(DROPOUT_RNG) if isinstance(rngs, Mapping) else None


def leaf_rng(key: jax.Array | None, leaf: LeafPlan) -> jax.Array | None:
    """The dropout key of one adapted leaf: one key per stacked layer, shaped like the stack."""
    if key is None:
        return None
    key = jax.random.fold_in(key, zlib.crc32(leaf.path.encode()))
    if not leaf.stacked_axes:
        return key
    return jax.random.split(key, leaf.num_layers).reshape(leaf.stack_shape)


def frozen_tag(path: str, value: Any, fast: bool) -> Operand | None:
    """The tag of a kernel without adapter: served if quantized, or (`fast`) if a float kernel; else None."""
    quantized = value if is_quantized(value) else None
    kernel = np.ndim(value) >= 2 and jnp.issubdtype(getattr(value, "dtype", np.float32), jnp.floating)
    return Operand(quantized=quantized, path=path) if quantized is not None or (fast and kernel) else None


def _tag(path: str, value: Any, plan: Plan, flat: Mapping, key: jax.Array | None, fast: bool) -> Operand | None:
    quantized = value if is_quantized(value) else None
    leaf = plan.leaves.get(path)
    if leaf is None:
        return frozen_tag(path, value, fast)
    pair = flat[path]
    return Operand(
        a=pair["lora_a"],
        b=masked_b(pair["lora_b"], leaf),
        rng=leaf_rng(key, leaf),
        magnitude=pair.get("magnitude"),
        quantized=quantized,
        path=path,
        leaf=leaf,
        depth=leaf.stacked_axes,
        dropout=plan.config.dropout,
    )


def serve_call(
    call: Callable[..., Any],
    params: PyTree,
    args: tuple,
    kwargs: Mapping[str, Any],
    plan: Plan,
    flat: Mapping[str, Mapping[str, Any]],
    *,
    key: jax.Array | None,
    strict: bool,
    fast: bool = True,
    context: Callable[[], Any] = contextlib.nullcontext,
    served_by_kinds: Callable[[], set[str]] = set,
) -> Any:
    """`call(params, *args, **kwargs)` with the adapters in `flat` served factored (see the module docstring).

    `key` is the LoRA dropout key (None: no dropout).

    `context()` is entered while the call is traced (registered layer kinds intercept their modules there), and
    `served_by_kinds()` then names the leaves those kinds served, which are left untagged.
    """
    out, record = run_tagged(
        call, params, args, kwargs, lambda path, value: _tag(path, value, plan, flat, key, fast), fast=fast,
        context=context, served_by_kinds=served_by_kinds,
    )  # fmt: skip
    _report(record, plan, strict)
    return out


def run_tagged(
    call: Callable[..., Any],
    params: PyTree,
    args: tuple,
    kwargs: Mapping[str, Any],
    tag: Callable[[str, Any], Operand | None],
    *,
    fast: bool,
    context: Callable[[], Any] = contextlib.nullcontext,
    served_by_kinds: Callable[[], set[str]] = set,
) -> tuple[Any, Record]:
    """`call(params, *args, **kwargs)` traced, then run with each parameter leaf tagged by `tag(path, value)`;
    returns the output and the `Record` of what was served and merged."""
    with context():
        traced = trace(call, params, args, kwargs)
    by_kinds = served_by_kinds()
    tags = [
        None if path in by_kinds else tag(path, value) for path, value in zip(traced.paths, traced.params, strict=True)
    ]
    record = Record()
    for path in by_kinds:
        record.serve(path)
    outs, _ = run(
        traced.jaxpr.jaxpr,
        traced.jaxpr.consts,
        [*traced.params, *traced.inputs],
        [*tags, *([None] * len(traced.inputs))],
        record,
        Options(fast=fast),
    )
    return traced.output(outs), record


def _report(record: Record, plan: Plan, strict: bool) -> None:
    causes = {path: list(record.merged.get(path, ())) for path in plan.leaves}
    for path in plan.leaves:
        if path not in record.served and path not in record.merged:
            causes[path].append("the model's call never uses this kernel, so its adapter has no effect here")
    causes = {path: c for path, c in causes.items() if c}
    if not causes:
        return
    lines = "".join(f"\n  {path}: {'; and '.join(c)}" for path, c in causes.items())
    if strict:
        raise ValueError(f"strict=True: these adapters cannot all be served factored:{lines}")
    warnings.warn(
        f"these adapters are merged into their kernels where they cannot be served factored (correct, but W + s·A B "
        f"is formed for those uses; strict=True refuses instead):{lines}",
        stacklevel=4,
    )
