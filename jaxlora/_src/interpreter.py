"""Running a traced model with its tagged kernels served by the operations that consume them.

`run` evaluates a jaxpr equation by equation, as `jax.core.eval_jaxpr` does, with one difference: values that are
(views of) adapted or served kernels carry an `Operand` tag. A tag passes through dtype conversions, copies,
sharding constraints and checkpoint names; nested jits are run inline; `lax.scan` is run again with the stacked
adapters scanned alongside the kernels they belong to; rematerialised blocks are run again under `jax.checkpoint`
with the same policy. The operations a provider serves (`dot_general`, `conv_general_dilated`, `gather`) compute
the factored layer. Any other use of a tagged kernel gets the merged kernel W + s·A B for that use alone, and the
`Record` says why, so that the caller can warn or, under `strict=True`, refuse, naming the leaf and the cause.

Because the model is traced without jaxlora in the way (nothing intercepted, nothing patched), whatever flax
transform it uses (`nn.jit` and its trace cache, `nn.remat`, `nn.scan`, `nn.vmap`, `nnx.bridge`, ...) has already
been lowered to these primitives, and a plain call of the same model is never affected.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex_core

from jaxlora._src.dora import merged_weight
from jaxlora._src.operands import Operand
from jaxlora._src.providers import Refusal, bind, serve_conv, serve_dot_general, serve_gather
from jaxlora._src.quantization import dequantize

# Primitives that hand the kernel on unchanged but for its dtype or placement: the tag follows the value.
_PASSTHROUGH = {
    "convert_element_type",
    "copy",
    "copy_p",
    "sharding_constraint",
    "name",
    "pvary",
    "device_put",
    "optimization_barrier",
    "reduce_precision",
}
_INLINE = {"jit", "pjit", "closed_call", "core_call", "custom_lin"}


@dataclasses.dataclass
class Record:
    """What one run did with each adapted leaf: how often it was served, and each cause of a merged use."""

    served: dict[str, int] = dataclasses.field(default_factory=dict)
    merged: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def serve(self, path: str) -> None:
        self.served[path] = self.served.get(path, 0) + 1

    def merge(self, path: str, cause: str) -> None:
        causes = self.merged.setdefault(path, [])
        if cause not in causes:
            causes.append(cause)


_observer: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("jaxlora_observer", default=None)


@contextlib.contextmanager
def observing(observer: Callable[[Operand, Any], None]) -> Iterator[None]:
    """Calls `observer(tag, rows)` for every adapted kernel's product with x while a model is served: `rows` are
    x's rows over the kernel's input axes, in A's order, shaped (-1, fan_in) (what EVA takes the PCA of)."""
    token = _observer.set(observer)
    try:
        yield
    finally:
        _observer.reset(token)


def _observe(observer: Callable, eqn, x, tag: Operand, kernel_is_rhs: bool) -> None:
    (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
    kc, xc = (rc, lc) if kernel_is_rhs else (lc, rc)
    own = [tag.original_axis(c) - tag.depth for c in kc]
    if sorted(own) != list(tag.leaf.layer_in_axes) or lb:
        return  # not x meeting A (a transposed use, or a product over mapped axes)
    order = [xc[own.index(a)] for a in tag.leaf.layer_in_axes]
    rows = jnp.moveaxis(x, order, range(x.ndim - len(order), x.ndim)).reshape(-1, tag.leaf.fan_in)
    observer(tag, rows)


@dataclasses.dataclass(frozen=True)
class Options:
    fast: bool = True  # frozen (x, W) Dense-like products through `lora_linear`'s backward pass


def run(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], tags: Sequence[Operand | None], record: Record,
        options: Options) -> tuple[list[Any], list[Operand | None]]:  # fmt: skip
    """Evaluates `jaxpr` on `args` (tagged by `tags`), serving the tagged kernels; returns the outputs and tags."""
    env: dict[Any, Any] = {}
    tag_env: dict[Any, Operand] = {}

    def read(v):
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    def tag_of(v):
        return None if isinstance(v, jex_core.Literal) else tag_env.get(v)

    for v, value in zip(jaxpr.constvars, consts, strict=True):
        env[v] = value
    for v, value, tag in zip(jaxpr.invars, args, tags, strict=True):
        env[v] = value
        if tag is not None:
            tag_env[v] = tag
    biases = _bias_adds(jaxpr)
    forwarded: dict[Any, Any] = {}  # an `add` of a bias that the served product before it has added already
    for i, eqn in enumerate(jaxpr.eqns):
        if id(eqn) in forwarded:
            env[eqn.outvars[0]] = env[forwarded.pop(id(eqn))]
            continue
        values = [read(v) for v in eqn.invars]
        in_tags = [tag_of(v) for v in eqn.invars]
        if any(t is not None for t in in_tags):
            bias_var, add = biases.get(i, (None, None))
            bias = env.get(bias_var) if bias_var is not None else None
            outs, out_tags = _tagged(eqn, values, in_tags, record, options, bias)
            if _observer.get() is not None:
                _wait_if_eager(_flat(outs))
            if bias is not None and isinstance(outs, _WithBias):
                outs = outs.outs
                forwarded[id(add)] = eqn.outvars[0]
        else:
            outs = bind(eqn, *values)
            outs, out_tags = (outs if eqn.primitive.multiple_results else [outs]), None
        for i, (v, value) in enumerate(zip(eqn.outvars, outs, strict=True)):
            env[v] = value
            if out_tags is not None and out_tags[i] is not None:
                tag_env[v] = out_tags[i]
    return [read(v) for v in jaxpr.outvars], [tag_of(v) for v in jaxpr.outvars]


def _wait_if_eager(outs: list[Any]) -> None:
    """Waits (the GIL released) for an eagerly evaluated operation that an observer saw, e.g. a scan holding its
    host callbacks, before the next eager operation can queue behind it while holding the GIL (see eva.py)."""
    if not any(isinstance(o, jax.core.Tracer) for o in outs):
        jax.block_until_ready(outs)


def _flat(outs: Any) -> list[Any]:
    return outs.outs if isinstance(outs, _WithBias) else list(outs)


@dataclasses.dataclass(frozen=True)
class _WithBias:
    """The outputs of a served product that added the bias of the `add` after it (which then only forwards them)."""

    outs: list[Any]


def _bias_adds(jaxpr: Any) -> dict[int, tuple[Any, Any]]:
    """{index of a dot_general: (its bias, the add)} for flax's `y = x W; y + reshape(bias, (1, ..., out))`."""
    uses: dict[Any, int] = {}
    producer = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not isinstance(v, jex_core.Literal):
                uses[v] = uses.get(v, 0) + 1
        for v in eqn.outvars:
            producer[v] = eqn
    for v in jaxpr.outvars:
        if not isinstance(v, jex_core.Literal):
            uses[v] = uses.get(v, 0) + 1
    found = {}
    for i, eqn in enumerate(jaxpr.eqns):
        if eqn.primitive.name != "dot_general" or uses.get(eqn.outvars[0]) != 1:
            continue
        out = eqn.outvars[0]
        add = next((e for e in jaxpr.eqns[i + 1 :] if out in e.invars), None)
        if add is None or add.primitive.name != "add" or add.invars[0] is not out:
            continue
        if isinstance(add.invars[1], jex_core.Literal):
            continue
        reshape = producer.get(add.invars[1])
        if reshape is None or reshape.primitive.name != "reshape" or isinstance(reshape.invars[0], jex_core.Literal):
            continue
        if len(reshape.invars[0].aval.shape) != 1:
            continue
        if tuple(add.invars[1].aval.shape) != (1,) * (len(out.aval.shape) - 1) + (out.aval.shape[-1],):
            continue
        if add.outvars[0].aval.dtype != out.aval.dtype:
            continue
        found[i] = (reshape.invars[0], add)
    return found


def materialized(value: Any, tag: Operand) -> Any:
    """The kernel this tagged value stands for as a plain array: merged with its adapter, decoded if quantized."""
    if tag.quantized is not None:
        value = dequantize(tag.quantized)
        value = value.astype(tag.dtype) if tag.dtype is not None else value
        value = value if tag.perm is None else jnp.transpose(value, tag.perm)
    if not tag.adapted:
        return value
    if tag.magnitude is not None:
        pair = {"lora_a": tag.a, "lora_b": tag.b, "magnitude": tag.magnitude}
        return merged_weight(value, pair, tag.leaf).astype(value.dtype)
    return value + tag.delta(value.dtype)


def _merged_use(record: Record, tag: Operand, cause: str) -> None:
    """Records that one use of an adapted kernel is merged; a bank's kernel cannot be (each example has its own)."""
    if tag.banked:
        raise ValueError(
            f"apply_bank: the bank's adapters of {tag.path!r} cannot be served per example: {cause}. A bank cannot "
            "merge an adapter for some examples only: leave this kernel out of the adapters' targets"
        )
    record.merge(tag.path, cause)


def _merged_inputs(eqn, values, tags, record: Record, cause: str) -> list[Any]:
    out = []
    for value, tag in zip(values, tags, strict=True):
        if tag is None:
            out.append(value)
            continue
        if tag.adapted:
            _merged_use(record, tag, cause)
        out.append(materialized(value, tag))
    return out


def _tagged(eqn, values, tags, record: Record, options: Options, bias: Any = None):
    """One equation with at least one tagged input: (outputs, their tags or None); `_WithBias` outputs when a served
    product took the `bias` of the add that follows it."""
    name = eqn.primitive.name
    if name == "transpose":
        (tag,) = tags
        permutation = tuple(eqn.params["permutation"])
        if tag.depth and permutation[: tag.depth] != tuple(range(tag.depth)):
            return _merged(eqn, values, tags, record, "its stacked layer axes are transposed")
        value = values[0] if tag.quantized is not None else bind(eqn, *values)
        return [value], [tag.transposed(permutation)]
    if name in _PASSTHROUGH and len(values) == 1:
        (tag,) = tags
        if tag.quantized is not None:
            dtype = eqn.params.get("new_dtype", tag.dtype)
            return [values[0]], [dataclasses.replace(tag, dtype=dtype)]
        outs = bind(eqn, *values)
        outs = outs if eqn.primitive.multiple_results else [outs]
        return outs, [tag]
    if name in _INLINE and "jaxpr" in eqn.params:
        closed = eqn.params["jaxpr"]
        inner, consts = (closed.jaxpr, closed.consts) if hasattr(closed, "consts") else (closed, ())
        return run(inner, consts, values, tags, record, options)
    if name == "remat2":
        return _remat(eqn, values, tags, record, options), None
    if name == "scan":
        return _scan(eqn, values, tags, record, options), None
    if name == "cond":
        return _cond(eqn, values, tags, record, options), None
    if name == "while":
        return _while(eqn, values, tags, record, options), None
    served = _serve(eqn, values, tags, record, options, bias)
    if isinstance(served, tuple):  # (output, bias added)
        return _WithBias([served[0]]), None
    if isinstance(served, Refusal):
        return _merged(eqn, values, tags, record, served.cause)
    if served is not None:
        return [served], None
    return _merged(eqn, values, tags, record, _unsupported_cause(name))


def _merged(eqn, values, tags, record: Record, cause: str):
    outs = bind(eqn, *_merged_inputs(eqn, values, tags, record, cause))
    return (outs if eqn.primitive.multiple_results else [outs]), None


def _unsupported_cause(name: str) -> str:
    if name.startswith("custom_"):
        return (
            f"it is used inside a {name} function (a custom_vjp/custom_jvp layer), which jaxlora cannot look into: "
            "register the module that calls it with jaxlora.register_layer, or exclude the kernel from the targets"
        )
    return (
        f"it goes through `{name}` before reaching an operation with x (jaxlora serves dot_general/einsum/@, "
        "conv_general_dilated and row gathers of the kernel itself, after dtype casts); register the module with "
        "jaxlora.register_layer to serve it, or exclude the kernel from the targets"
    )


def _serve(eqn, values, tags, record: Record, options: Options, bias: Any = None):
    """The provider's output for a serving primitive, its `Refusal`, or None for a primitive no provider serves."""
    name = eqn.primitive.name
    if name == "dot_general":
        lhs_tag, rhs_tag = tags
        if lhs_tag is not None and rhs_tag is not None:
            return Refusal("a dot_general multiplies it with another adapted or served kernel, not with x")
        kernel_is_rhs = rhs_tag is not None
        tag = rhs_tag if kernel_is_rhs else lhs_tag
        x, w = (values[0], values[1]) if kernel_is_rhs else (values[1], values[0])
        observer = _observer.get()
        if observer is not None and tag.adapted:
            _observe(observer, eqn, x, tag, kernel_is_rhs)
        out = serve_dot_general(eqn, x, w, tag, kernel_is_rhs, options.fast, bias)
    elif name == "conv_general_dilated" and tags[0] is None and tags[1] is not None:
        tag = tags[1]
        out = serve_conv(eqn, values[0], values[1], tag)
    elif name == "gather" and tags[0] is not None and tags[1] is None:
        tag = tags[0]
        out = serve_gather(eqn, values[0], values[1], tag)
    else:
        return None
    if isinstance(out, Refusal):
        return out
    if tag.adapted:
        record.serve(tag.path)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Higher-order primitives that a tagged kernel enters.


def _remat(eqn, values, tags, record: Record, options: Options) -> list[Any]:
    """A rematerialised block run again under `jax.checkpoint` (same policy), its tags passed in as arguments."""
    params = eqn.params
    jaxpr = params["jaxpr"]

    def block(values, tags):
        return run(jaxpr, (), values, tags, record, options)[0]

    checkpointed = jax.checkpoint(block, prevent_cse=params["prevent_cse"], policy=params["policy"])
    return checkpointed(list(values), list(tags))


def _scan(eqn, values, tags, record: Record, options: Options) -> list[Any]:
    """`lax.scan` run again with each tagged scanned kernel's adapter scanned alongside it (one layer per step)."""
    params = eqn.params
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    closed = params["jaxpr"]
    consts, carry, xs = values[:n_consts], values[n_consts : n_consts + n_carry], values[n_consts + n_carry :]
    const_tags, carry_tags, xs_tags = tags[:n_consts], tags[n_consts : n_consts + n_carry], tags[n_consts + n_carry :]
    if any(t is not None for t in carry_tags):
        carry = _merged_inputs(eqn, carry, carry_tags, record, "it is a loop carry of a lax.scan")
    xs = list(xs)
    for i, tag in enumerate(xs_tags):
        if tag is not None and tag.adapted and tag.depth == 0:
            _merged_use(
                record,
                tag,
                "it is stacked by a scan (nn.scan/nnx.scan) that slices it layer by layer, but the plan gives it one "
                "adapter over the whole stack: build the plan with jaxlora.plan(params, config, model=model, "
                "example=...) or set stacked_axes for it",
            )
            xs[i], xs_tags = materialized(xs[i], tag), [None if j == i else t for j, t in enumerate(xs_tags)]

    def body(carry, scanned):
        x, x_tags = scanned
        inner_tags = [*const_tags, *([None] * n_carry), *(None if t is None else t.sliced() for t in x_tags)]
        outs = run(closed.jaxpr, closed.consts, [*consts, *carry, *x], inner_tags, record, options)[0]
        return outs[:n_carry], outs[n_carry:]

    carry_out, ys = lax.scan(
        body,
        list(carry),
        (xs, list(xs_tags)),
        length=params["length"],
        reverse=params["reverse"],
        unroll=params["unroll"],
    )
    return [*carry_out, *ys]


def _cond(eqn, values, tags, record: Record, options: Options) -> list[Any]:
    """`lax.switch` run again with each branch served (the index is never a kernel)."""
    index, operands, operand_tags = values[0], values[1:], tags[1:]

    def branch(closed):
        return lambda *ops: run(closed.jaxpr, closed.consts, list(ops), operand_tags, record, options)[0]

    return list(lax.switch(index, [branch(b) for b in eqn.params["branches"]], *operands))


def _while(eqn, values, tags, record: Record, options: Options) -> list[Any]:
    """`lax.while_loop` run again with kernels among its constants served in every iteration."""
    params = eqn.params
    nc, nb = params["cond_nconsts"], params["body_nconsts"]
    cond_consts, body_consts, carry = values[:nc], values[nc : nc + nb], values[nc + nb :]
    cond_tags, body_tags, carry_tags = tags[:nc], tags[nc : nc + nb], tags[nc + nb :]
    if any(t is not None for t in carry_tags):
        carry = _merged_inputs(eqn, carry, carry_tags, record, "it is a loop carry of a lax.while_loop")
    free = [None] * len(carry)

    def cond(carry):
        closed = params["cond_jaxpr"]
        return run(closed.jaxpr, closed.consts, [*cond_consts, *carry], [*cond_tags, *free], record, options)[0][0]

    def body(carry):
        closed = params["body_jaxpr"]
        return run(closed.jaxpr, closed.consts, [*body_consts, *carry], [*body_tags, *free], record, options)[0]

    return list(lax.while_loop(cond, body, list(carry)))
