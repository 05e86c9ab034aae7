"""How each operation that consumes a tagged kernel is served factored: `dot_general`, convolutions, gathers.

Every `jnp.einsum`, `jnp.dot`, `@`, `lax.dot_general` and `nn.Dense` lowers to the `dot_general` primitive, every
`lax.conv_general_dilated` to `conv_general_dilated`, and an embedding lookup (`table[ids]`, `jnp.take`) to a row
`gather`; a provider receives that primitive's equation with its actual operands and the kernel's `Operand` tag,
and returns the layer's output with the adapter applied: the operation itself on (x, W), plus s·(x A) B computed
with A contracting exactly the kernel axes that the operation contracts with x. A provider returns `Refusal` (the
one cause, said for the user) when the operation uses the kernel in a way that has no factored form; the caller
then merges that use.

The output is computed by `factored`, whose hand-written backward pass computes only the cotangents asked for:
dx (through the operation's own transpose with W), dA and dB, and dW only when W itself trains.
"""

from __future__ import annotations

import dataclasses
import functools
import string
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxlora._src.dora import dora_linear, dora_linear_dropout
from jaxlora._src.linear import lora_linear
from jaxlora._src.operands import Operand
from jaxlora._src.quantization import dequantize, embedding_rows, quantized_attend, quantized_linear


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why an operation's use of a kernel cannot be served factored (a sentence naming the cause and the fix)."""

    cause: str


def bind(eqn: Any, *args: Any) -> Any:
    """The equation's own primitive applied to `args` (the plain computation, bit for bit)."""
    with eqn.ctx.manager:
        return eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))


# ---------------------------------------------------------------------------------------------------------------
# The factored operation and its backward pass.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def factored(base: Callable, term: Callable, x, x_lora, w, a, b):
    """`base(x, w) + term(x_lora, a, b)`, differentiated by hand: only the cotangents asked for are computed.

    Args:
      base: the operation on (x, W), e.g. the model's own `dot_general` with its dimension numbers.
      term: the LoRA term s·(x_lora A) B, in the layout and dtype of `base`'s output.
      x: the operation's input.
      x_lora: the adapter's input (x after LoRA dropout, or x itself).
      w: the kernel as the operation sees it.
      a, b: the adapter.

    Returns:
      The layer output.
    """
    return base(x, w) + term(x_lora, a, b)


def _factored_fwd(base, term, x, x_lora, w, a, b):
    primals = (x, x_lora, w, a, b)
    values = [p.value for p in primals]
    perturbed = tuple(p.perturbed for p in primals)
    return base(values[0], values[2]) + term(values[1], values[3], values[4]), (values, perturbed)


def _factored_bwd(base, term, residuals, g):
    (x, x_lora, w, a, b), (want_x, want_xl, want_w, want_a, want_b) = residuals
    g = lax.platform_dependent(g, cpu=lax.optimization_barrier, default=lambda g: g)
    dx = dw = dxl = da = db = None
    if want_x:
        dx = jax.vjp(lambda x: base(x, w), x)[1](g)[0]
    if want_w:
        dw = jax.vjp(lambda w: base(x, w), w)[1](g)[0]
    if want_xl or want_a or want_b:
        wanted = [i for i, want in enumerate((want_xl, want_a, want_b)) if want]
        primals = [x_lora, a, b]

        def lora_term(*picked):
            args = list(primals)
            for i, value in zip(wanted, picked, strict=True):
                args[i] = value
            return term(*args)

        grads = jax.vjp(lora_term, *[primals[i] for i in wanted])[1](g)
        out = dict(zip(wanted, grads, strict=True))
        dxl, da, db = out.get(0), out.get(1), out.get(2)
        dxl = None if dxl is None else dxl.astype(x_lora.dtype)
    return dx, dxl, dw, da, db


factored.defvjp(_factored_fwd, _factored_bwd, symbolic_zeros=True)


# ---------------------------------------------------------------------------------------------------------------
# dot_general: einsum, dot, matmul, @, Dense, DenseGeneral, attend.


def _dense_like(x: Any, w: Any, dims: tuple, kernel_is_rhs: bool, params: dict) -> bool:
    """True for x (..., in) · W (in, out) with the plain arithmetic `lora_linear` reproduces (flax's nn.Dense)."""
    (lc, rc), (lb, rb) = dims
    return (
        kernel_is_rhs
        and w.ndim == 2
        and tuple(lc) == (x.ndim - 1,)
        and tuple(rc) == (0,)
        and not lb
        and not rb
        and params.get("precision") is None
        and params.get("preferred_element_type") in (None, jnp.result_type(x, w))
        and jnp.result_type(x) == jnp.result_type(w)
    )


def serve_dot_general(eqn: Any, x: Any, w: Any, tag: Operand, kernel_is_rhs: bool, fast: bool, bias: Any = None) -> Any:
    """The `dot_general` equation on (x, W) or (W, x) with the tagged kernel's adapter applied (or a `Refusal`).

    `bias` is the bias that the model adds to this product next (flax's Dense), or None: where `lora_linear` computes
    the product, it adds the bias inside its forward pass, and `(output, True)` is returned.
    """
    params = eqn.params
    dims = params["dimension_numbers"]
    (lc, rc), (lb, rb) = dims
    kc, kb = (rc, rb) if kernel_is_rhs else (lc, lb)
    k = tag.depth
    contracted = tuple(sorted(tag.original_axis(c) - k for c in kc))
    batch = tuple(sorted(tag.original_axis(b) for b in kb))
    if any(c < 0 for c in contracted) or any(b >= k for b in batch):
        return Refusal(
            f"a dot_general contracts or maps over its axes {tuple(kc)} / {tuple(kb)}, which mixes the layer stack "
            f"({k} stacked axes) with one layer's axes: set stacked_axes to the number of axes the model really "
            "stacks, or exclude it from the targets"
        )
    if tag.quantized is not None and tag.magnitude is None:
        return _serve_quantized(eqn, x, tag, kernel_is_rhs, contracted)
    if not tag.adapted:
        return _serve_frozen(eqn, x, w, dims, kernel_is_rhs, fast and tag.perm is None, bias)
    leaf = tag.leaf
    if contracted == leaf.layer_in_axes:
        transposed = False
    elif contracted == leaf.layer_out_axes:
        transposed = True  # q·Eᵀ (a tied head's attend): the update adds s·(q Bᵀ) Aᵀ
    else:
        return Refusal(
            f"it is contracted with x over its axes {contracted} (of one layer's kernel {leaf.layer_shape}) by a "
            f"dot_general, but the plan's adapter contracts axes {leaf.layer_in_axes}; build the plan with "
            "jaxlora.plan(params, config, model=model, example=...) so that it reads the layout from the operation, "
            "or set in_axes for it"
        )
    if tag.magnitude is not None:
        return _serve_dora(x, w, tag, dims, kernel_is_rhs, params, transposed)
    if tag.banked:
        rows = _bank_rows(tag, x, lc if kernel_is_rhs else rc)
        if isinstance(rows, Refusal):
            return rows
        base = functools.partial(_base, eqn, kernel_is_rhs)
        out_dtype = jax.eval_shape(base, x, w).dtype
        term = _term(tag, x.ndim, w.ndim, dims, kernel_is_rhs, transposed, out_dtype, per_example=True)
        return factored(base, term, x, x, w, *rows)
    x_lora = tag.adapter().drop(x)
    if not transposed and tag.perm is None and _dense_like(x, w, dims, kernel_is_rhs, params):
        if bias is not None and jnp.result_type(bias) == jnp.result_type(x, w):
            return lora_linear(x, x_lora, w, bias, tag.a, tag.b, leaf.scale), True
        return lora_linear(x, x_lora, w, None, tag.a, tag.b, leaf.scale)
    base = functools.partial(_base, eqn, kernel_is_rhs)
    term = _term(tag, x.ndim, w.ndim, dims, kernel_is_rhs, transposed, jax.eval_shape(base, x, w).dtype)
    return factored(base, term, x, x_lora, w, tag.a, tag.b)


def _base(eqn: Any, kernel_is_rhs: bool, x: Any, w: Any) -> Any:
    return bind(eqn, x, w) if kernel_is_rhs else bind(eqn, w, x)


def _term(tag: Operand, x_ndim, w_ndim, dims, kernel_is_rhs, transposed, out_dtype, per_example=False) -> Callable:
    """The LoRA term of `dot_general(x, W)` (or `(W, x)`) as two einsums, in the output layout of the operation.

    Letters name axes: x's axes, and W's own axes (through any transpose), shared where the operation pairs them.
    A holds W's stack letters, its in-axis letters and r; B the stack letters, r and the out-axis letters; the term
    is einsum(x, A) then einsum with B (with the roles of A and B swapped when the operation contracts W's output
    axes, as a tied head's `attend` does). With `per_example` (a bank), A and B are gathered per example and carry
    x's leading axis first, as a stack axis that x shares, and the scale is already in A.
    """
    (lc, rc), (lb, rb) = dims
    kc, kb, xc, xb = (rc, rb, lc, lb) if kernel_is_rhs else (lc, lb, rc, rb)
    letters = iter(string.ascii_letters)
    x_letters = [next(letters) for _ in range(x_ndim)]
    own = {}  # W's own axis -> letter
    for xi, ki in (*zip(xc, kc, strict=True), *zip(xb, kb, strict=True)):
        own[tag.original_axis(ki)] = x_letters[xi]
    for d in range(w_ndim):
        own.setdefault(tag.original_axis(d), next(letters))
    rank = next(letters)
    k, leaf = tag.depth, tag.leaf
    stack = (x_letters[0] if per_example else "") + "".join(own[d] for d in range(k))
    a_spec = stack + "".join(own[k + d] for d in leaf.layer_in_axes) + rank
    b_spec = stack + rank + "".join(own[k + d] for d in leaf.layer_out_axes)
    x_kept = [x_letters[i] for i in range(x_ndim) if i not in xc]
    thin = "".join(x_kept) + "".join(c for c in stack if c not in x_kept) + rank
    x_spec = "".join(x_letters)
    batch = "".join(x_letters[i] for i in xb)
    x_free = "".join(x_letters[i] for i in range(x_ndim) if i not in xc and i not in xb)
    w_free = "".join(own[tag.original_axis(d)] for d in range(w_ndim) if d not in kc and d not in kb)
    out = batch + (x_free + w_free if kernel_is_rhs else w_free + x_free)
    first, second = (f"{b_spec}", f"{a_spec}") if transposed else (f"{a_spec}", f"{b_spec}")
    return functools.partial(
        _two_einsums, down=f"{x_spec},{first}->{thin}", up=f"{thin},{second}->{out}", transposed=transposed,
        scale=1.0 if per_example else leaf.scale, out_dtype=out_dtype,
    )  # fmt: skip


def _two_einsums(x_lora, a, b, *, down, up, transposed, scale, out_dtype):
    first, second = (b, a) if transposed else (a, b)
    thin = scale * jnp.einsum(down, x_lora.astype(first.dtype), first)
    return jnp.einsum(up, thin, second).astype(out_dtype)


def _not_per_example(use: str, n: int) -> Refusal:
    """Why a bank cannot serve a use whose operand does not carry the `n` examples on its leading axis."""
    return Refusal(
        f"{use}, whose leading axis is not the batch of {n} examples the adapter indices name (a bank serves layers "
        "whose inputs keep the example axis first)"
    )


def _bank_rows(tag: Operand, x: Any, x_contracted: tuple[int, ...]) -> tuple[Any, Any] | Refusal:
    """A bank's A and B gathered for the examples along x's leading axis, or why they cannot be."""
    n = tag.slots.shape[-1]
    if tag.depth:
        return Refusal(f"it reaches an operation with {tag.depth} of its stacked layer axes unsliced by a scan")
    if jnp.ndim(x) < 1 or jnp.shape(x)[0] != n or 0 in tuple(x_contracted):
        return _not_per_example(f"it meets an input of shape {jnp.shape(x)}", n)
    return tag.example_rows(tag.a[tag.safe_slots], scaled=True), tag.example_rows(tag.b[tag.safe_slots])


def _serve_quantized(eqn, x, tag: Operand, kernel_is_rhs, contracted):
    """A quantized kernel, decoded inside the product's forward and backward pass where it is 2-D; else in place."""
    q, k = tag.quantized, tag.depth
    dtype = tag.dtype or jnp.result_type(x)
    dims = eqn.params["dimension_numbers"]
    (lc, _), (lb, rb) = dims
    matrix = q.ndim == 2 and not k and kernel_is_rhs and tuple(lc) == (x.ndim - 1,) and not lb and not rb
    adapted = tag.adapted
    if adapted and contracted not in (tag.leaf.layer_in_axes, tag.leaf.layer_out_axes):
        return Refusal(
            f"it is contracted with x over its axes {contracted}, not over the plan's {tag.leaf.layer_in_axes}"
        )
    transposed = adapted and contracted == tag.leaf.layer_out_axes
    if not matrix:
        table = dequantize(q).astype(dtype)
        table = table if tag.perm is None else jnp.transpose(table, tag.perm)
        base = _base(eqn, kernel_is_rhs, x, table)
        w_ndim = table.ndim
    else:
        x = jnp.asarray(x, dtype)
        if contracted == (0,) and (not adapted or not transposed) and not tag.banked:
            if not adapted:
                return quantized_linear(x, x, q, None, None, None, 1.0)
            return quantized_linear(x, tag.adapter().drop(x), q, None, tag.a, tag.b, tag.leaf.scale)
        base = quantized_attend(x, q) if contracted == (1,) else quantized_linear(x, x, q, None, None, None, 1.0)
        w_ndim = 2
    if not adapted:
        return base
    if tag.banked:
        rows = _bank_rows(tag, x, dims[0][0] if kernel_is_rhs else dims[0][1])
        if isinstance(rows, Refusal):
            return rows
        return base + _term(tag, x.ndim, w_ndim, dims, kernel_is_rhs, transposed, base.dtype, True)(x, *rows)
    term = _term(tag, x.ndim, w_ndim, dims, kernel_is_rhs, transposed, base.dtype)
    return base + term(tag.adapter().drop(x), tag.a, tag.b)


def _serve_frozen(eqn, x, w, dims, kernel_is_rhs, fast, bias=None):
    """A frozen kernel through `lora_linear`'s hand-written backward pass where it is Dense-like (the fast path)."""
    if fast and _dense_like(x, w, dims, kernel_is_rhs, eqn.params):
        if bias is not None and jnp.result_type(bias) == jnp.result_type(x, w):
            return lora_linear(x, x, w, bias, None, None, 1.0), True
        return lora_linear(x, x, w, None, None, None, 1.0)
    return _base(eqn, kernel_is_rhs, x, w)


def _serve_dora(x, w, tag, dims, kernel_is_rhs, params, transposed):
    if tag.quantized is not None:  # merging refuses it too: there is no fallback
        raise ValueError(
            f"DoRA on a quantized kernel ({tag.path!r}) is not supported yet: use plain LoRA on the quantized base "
            "(use_dora=False), or keep this kernel in float"
        )
    if transposed or not _dense_like(x, w, dims, kernel_is_rhs, params):
        raise ValueError(_dora_refusal(tag.path, "another product than x (..., in) · W (in, out)"))
    adapter = tag.adapter()
    x_lora = adapter.drop(x)
    if x_lora is x:
        return dora_linear(x, w, None, tag.a, tag.b, tag.magnitude, tag.leaf.scale)
    return dora_linear_dropout(x, x_lora, w, None, tag.a, tag.b, tag.magnitude, tag.leaf.scale)


def _dora_refusal(path: str, what: str) -> str:
    return (
        f"DoRA (use_dora=True) is not supported yet for {path!r}, which meets {what}: jaxlora serves DoRA for x·W "
        "with W (in, out), as flax's Dense, nnx.Linear and 'bi,io->bo' einsums compute it; exclude this kernel from "
        "the targets (LoraConfig.exclude) or use plain LoRA for it"
    )


# ---------------------------------------------------------------------------------------------------------------
# Convolutions.


def serve_conv(eqn: Any, x: Any, w: Any, tag: Operand) -> Any:
    """`conv_general_dilated(x, W)`: the same convolution with A as its kernel (r features), then B per position."""
    params = eqn.params
    if tag.depth:
        return Refusal("its stacked layer axes reach a convolution without being sliced by nn.scan/nnx.scan first")
    if tag.perm is not None:
        return Refusal("it is transposed before the convolution; jaxlora serves convolutions of the kernel itself")
    if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
        return Refusal(
            "a grouped convolution (feature_group_count or batch_group_count > 1) contracts a slice of its input "
            "features per group, which no single low-rank update covers: exclude it from the targets"
        )
    leaf = tag.leaf
    if not tag.adapted:
        return bind(eqn, x, dequantize(tag.quantized) if tag.quantized is not None else w)
    if tag.banked:
        return Refusal("it is a convolution's kernel; a bank serves products (dot_general) and embedding lookups")
    dn = params["dimension_numbers"]
    out_feature = dn.rhs_spec[0]
    if leaf.layer_out_axes != (out_feature,):
        return Refusal(
            f"the convolution's output-feature axis is {out_feature}, but the plan's adapter maps r to axes "
            f"{leaf.layer_out_axes}; build the plan with jaxlora.plan(params, config, model=model, example=...) or "
            "set in_axes for it"
        )
    if tag.magnitude is not None:
        raise ValueError(_dora_refusal(tag.path, "a convolution"))
    if tag.quantized is not None:
        return Refusal("quantized kernels are served for dense layers and embeddings; keep convolution kernels float")
    ins = leaf.layer_in_axes
    rhs_spec = (len(ins), ins.index(dn.rhs_spec[1]), *(ins.index(s) for s in dn.rhs_spec[2:]))
    down = eqn.replace(params={**params, "dimension_numbers": dn._replace(rhs_spec=rhs_spec)})
    out_dtype = jax.eval_shape(functools.partial(bind, eqn), x, w).dtype
    feature = dn.out_spec[1]
    term = functools.partial(_conv_term, down=down, feature=feature, scale=leaf.scale, out_dtype=out_dtype)
    adapter = tag.adapter()
    return factored(functools.partial(bind, eqn), term, x, adapter.drop(x), w, tag.a, tag.b)


def _conv_term(x_lora, a, b, *, down, feature, scale, out_dtype):
    params = {**down.params, "preferred_element_type": None}
    xa = lax.conv_general_dilated_p.bind(x_lora.astype(a.dtype), a, **params)  # r output features
    term = lax.dot_general(scale * xa, b, (((feature,), (0,)), ((), ())))  # features last
    return jnp.moveaxis(term, -1, feature).astype(out_dtype)


# ---------------------------------------------------------------------------------------------------------------
# Embedding lookups.


def serve_gather(eqn: Any, table: Any, indices: Any, tag: Operand) -> Any:
    """A row lookup `table[ids]`: the rows of the table plus s·A[ids] B (A holds one row per vocabulary entry)."""
    params = eqn.params
    dn = params["dimension_numbers"]
    rows = (
        not tag.depth
        and tag.perm is None
        and len(tag.quantized.shape if tag.quantized is not None else table.shape) == 2
        and tuple(dn.collapsed_slice_dims) == (0,)
        and tuple(dn.start_index_map) == (0,)
        and not tuple(getattr(dn, "operand_batching_dims", ()))
        and tuple(dn.offset_dims) == (indices.ndim - 1,)
        and params["slice_sizes"][0] == 1
        and indices.shape[-1] == 1
    )
    shape = tag.quantized.shape if tag.quantized is not None else table.shape
    if not rows or params["slice_sizes"][1] != shape[1]:
        if tag.adapted:
            return Refusal(
                "it is read by a gather that is not a lookup of whole rows (table[ids] / jnp.take(table, ids, axis=0))"
            )
        return bind(eqn, dequantize(tag.quantized) if tag.quantized is not None else table, indices)
    if tag.quantized is not None:
        base = embedding_rows(tag.quantized, indices[..., 0], tag.dtype or tag.quantized.scale.dtype)
    else:
        base = bind(eqn, table, indices)
    if not tag.adapted:
        return base
    if tag.leaf.layer_in_axes != (0,):
        return Refusal(
            f"a row lookup reads its axis 0, but the plan's adapter contracts axes {tag.leaf.layer_in_axes}: set "
            "in_axes or fan_in_ndim to 1 for it (an embedding's A holds one row per entry)"
        )
    if tag.magnitude is not None:
        raise ValueError(_dora_refusal(tag.path, "an embedding lookup"))
    if tag.banked:
        return _banked_lookup(base, indices[..., 0], tag)
    a_rows = lax.gather_p.bind(
        tag.a, indices, dimension_numbers=dn, slice_sizes=(1, tag.a.shape[1]), **_gather_extras(params)
    )
    term = tag.leaf.scale * jnp.tensordot(a_rows, tag.b, axes=1)
    return base + term.astype(base.dtype)


def _banked_lookup(base: Any, ids: Any, tag: Operand) -> Any:
    """An embedding lookup with each example's own adapter: s_i·A_i[ids] B_i, reading only the looked-up rows."""
    n = tag.slots.shape[-1]
    if ids.ndim < 1 or ids.shape[0] != n:
        return _not_per_example(f"it is looked up with indices of shape {ids.shape}", n)
    slots = tag.safe_slots.reshape((n,) + (1,) * (ids.ndim - 1))
    a_rows = tag.example_rows(tag.a[slots, ids], scaled=True)  # (batch, ..., R)
    b_rows = tag.example_rows(tag.b[tag.safe_slots])  # (batch, R, d)
    term = lax.dot_general(a_rows, b_rows, (((a_rows.ndim - 1,), (1,)), ((0,), (0,))))
    return base + term.astype(base.dtype)


def _gather_extras(params: dict) -> dict:
    return {k: v for k, v in params.items() if k not in ("dimension_numbers", "slice_sizes")}
