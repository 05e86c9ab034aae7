"""A quantized frozen base (QLoRA): adapted kernels stored as NF4 or int8 codes plus scales, LoRA trained on top.

`quantize(params, plan)` is a pure pytree transform, applied once: each adapted 2-D kernel becomes a
`qwix.QArray` (codes + scales) and the tree keeps its structure. The factored Dense layer dequantizes inside
its forward and backward passes (`quantized_linear`), so no float copy of a quantized kernel lives across the
training step.

Formats (both symmetric absmax, as QLoRA and bitsandbytes):
  - "nf4": 4-bit NormalFloat codes (Dettmers et al. 2023, appendix E), one absmax scale per block of
    `block_size` (default 64) consecutive input features of each output column: PyTorch's (out, in) weight
    flattened in blocks of 64, exactly bitsandbytes' layout. Codes are stored packed (uint4).
  - "int8": int8 codes with one scale per output channel.

The arrays come from qwix (`qwix.quantize` / `qwix.dequantize`, the library tunix and MaxText use for QLoRA).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import sys
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlora._src.config import LoraConfig
from jaxlora._src.linear import _forward as linear_forward
from jaxlora._src.linear import _matmul_t, _outer
from jaxlora._src.paths import PyTree, leaves_with_paths, map_with_paths, register_leaf_test
from jaxlora._src.planning import Plan, resolve

Kind = Literal["nf4", "int8"]
KINDS = ("nf4", "int8")
DEFAULT_BLOCK_SIZE = 64  # QLoRA's NF4 block size


def _qwix():
    """qwix, imported on first use (about a second), so that plain LoRA users do not pay for it."""
    try:
        return importlib.import_module("qwix")
    except ImportError:
        raise ImportError("quantized bases need qwix: pip install 'jaxlora[quantized]' (or pip install qwix)") from None


def is_quantized(x: Any) -> bool:
    """True for a quantized kernel (a `qwix.QArray`); never imports qwix (nothing is quantized before it is)."""
    qwix = sys.modules.get("qwix")
    return qwix is not None and isinstance(x, qwix.QArray)


register_leaf_test(is_quantized)


def dequantize(x: Any) -> Any:
    """The float array a quantized kernel stands for (in its scales' dtype); any other leaf is returned as is."""
    return _qwix().dequantize(x) if is_quantized(x) else x


def quantize_array(
    weight: jax.Array,
    kind: Kind = "nf4",
    block_size: int = DEFAULT_BLOCK_SIZE,
    path: str = "W",
    axis: int = 0,
    stacked: int = 0,
):
    """One 2-D array as a `qwix.QArray`: NF4 in blocks of `block_size` along `axis`, or int8 with one scale per
    index of the other axis.

    `axis=0` is a kernel's layout (in, out): blocks along the input features of each output column. `axis=1` is
    an embedding table's (vocab, features): blocks along each row, so that a lookup decodes only its rows.
    With `stacked` leading axes (layers stacked by `nn.scan` / `nnx.scan`), each layer's 2-D array is quantized
    alone and the codes and scales are stacked (`axis` counts within the layer).

    Raises:
      ValueError: for an unknown kind, an array that is not 2-D (after the stacked axes), or a block size that
        does not divide the length of `axis`.
    """
    qwix = _qwix()
    check_quantizable(tuple(np.shape(weight)), kind, block_size, path, axis, stacked)
    if stacked:
        return _per_layer(lambda layer: quantize_array(layer, kind, block_size, path, axis), weight, stacked)
    if kind == "int8":
        return qwix.quantize(weight, jnp.int8, channelwise_axes=(1 - axis,))
    return _in_slices(
        lambda part: qwix.quantize(part, "nf4", channelwise_axes=(1 - axis,), tiled_axes={axis: block_size}),
        weight,
        1 - axis,
    )


def check_quantizable(
    shape: tuple[int, ...], kind: Kind, block_size: int, path: str = "W", axis: int = 0, stacked: int = 0
) -> None:
    """Refuses, before any work, what `quantize_array` would refuse for an array of `shape` (same arguments).

    Raises:
      ValueError: naming `path`, for an unknown kind, a shape that is not 2-D after the stacked axes, or a block
        size that does not divide the length of `axis`.
    """
    if kind not in KINDS:
        raise ValueError(f"quantization kind must be one of {KINDS}, got {kind!r}")
    if len(shape) != 2 + stacked:
        raise ValueError(
            f"cannot quantize {path!r} of shape {shape}: quantized bases are served for 2-D kernels (nn.Dense) and "
            "embedding tables (nn.Embed), stacked or not; leave it out with quantize(..., targets=...) or adapt "
            "only those"
        )
    if axis not in (0, 1):
        raise ValueError(f"axis must be 0 (a kernel's input features) or 1 (an embedding's features), got {axis!r}")
    if kind == "int8":
        return
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    shape = shape[stacked:]
    if shape[axis] % block_size:
        divisors = [d for d in (128, 64, 32, 16, 8) if shape[axis] % d == 0]
        along = "input features" if axis == 0 else "features per row"
        raise ValueError(
            f"cannot quantize {path!r} of shape {shape} to NF4 in blocks of {block_size}: the blocks run along "
            f"its {shape[axis]} {along}, which {block_size} does not divide; pass block_size="
            f"{divisors[0] if divisors else 'a divisor of ' + str(shape[axis])} or leave the leaf out"
        )


_SLICE_ELEMENTS = 1 << 22  # NF4 rounding compares each value with 16 codes: a 50257 x 768 table at once takes 2.5 GB


def slice_length(shape: tuple[int, ...], keep: int, elements: int | None = None) -> int:
    """How many indices along `keep` one slice of a 2-D array of `shape` spans when quantized in slices of about
    `elements` values (default: the slices `quantize_array` takes)."""
    return max(1, (elements or _SLICE_ELEMENTS) // max(1, int(np.prod(shape)) // shape[keep]))


def _in_slices(quantize_fn: Any, weight: jax.Array, keep: int) -> Any:
    """`quantize_fn(weight)` applied to slices along `keep` (whose indices each have their own scales, so the result
    is the same) and concatenated, bounding the transient memory of quantizing a large table."""
    n = np.shape(weight)[keep]
    step = slice_length(tuple(np.shape(weight)), keep)
    if step >= n:
        return quantize_fn(weight)
    weight = jnp.asarray(weight)
    parts = [quantize_fn(lax.slice_in_dim(weight, i, min(i + step, n), axis=keep)) for i in range(0, n, step)]
    return dataclasses.replace(
        parts[0],
        qvalue=jnp.concatenate([p.qvalue for p in parts], axis=keep),
        scale=jnp.concatenate([p.scale for p in parts], axis=keep),
    )


def _per_layer(quantize_fn: Any, weight: jax.Array, stacked: int) -> Any:
    """`quantize_fn` applied to each layer of `weight` (its first `stacked` axes index the layers), stacked again."""
    lead = tuple(np.shape(weight)[:stacked])
    flat = jnp.reshape(jnp.asarray(weight), (-1, *np.shape(weight)[stacked:]))
    parts = [quantize_fn(flat[i]) for i in range(flat.shape[0])]
    stack = lambda xs: jnp.stack(xs).reshape(*lead, *xs[0].shape)
    return dataclasses.replace(parts[0], qvalue=stack([p.qvalue for p in parts]), scale=stack([p.scale for p in parts]))


def _is_embedding(path: str, leaf: Any) -> bool:
    """A 2-D `embedding` param: an nn.Embed table (vocab, features), quantized in rows."""
    return path.rpartition("/")[2] == "embedding" and np.ndim(leaf) == 2


def quantize(
    params: PyTree,
    plan: Plan | LoraConfig,
    *,
    kind: Kind = "nf4",
    block_size: int = DEFAULT_BLOCK_SIZE,
    frozen_dense: bool = False,
    embeddings: bool = False,
) -> PyTree:
    """The params with every adapted kernel quantized (a pure transform: apply it once and keep the tree).

    Args:
      params: the float base params the plan was built for.
      plan: from `jaxlora.plan(params, config)`; the same plan keeps working with the quantized tree.
      kind: "nf4" (QLoRA's 4-bit NormalFloat, block-wise absmax) or "int8" (per output channel).
      block_size: NF4's block length along the input features (QLoRA: 64).
      frozen_dense: also quantize 2-D `kernel` leaves without adapter (frozen nn.Dense layers), except
        modules_to_save.
      embeddings: also quantize 2-D `embedding` leaves (nn.Embed tables, e.g. GPT-2's wte, tied to its LM head)
        in blocks along each row, except modules_to_save: a lookup decodes only the rows it gathers, `attend`
        decodes the table inside its forward and backward pass.

    Returns:
      A tree of the same structure with `qwix.QArray` leaves in place of those kernels.

    Raises:
      ValueError: naming the leaf, for kernels that are not 2-D or whose input size the block does not divide.
      ImportError: without qwix.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (128, 8))}}
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
      >>> quantized = jaxlora.quantization.quantize(params, plan, kind="nf4")
      >>> jaxlora.quantization.is_quantized(quantized["dense"]["kernel"]), quantized["dense"]["kernel"].shape
      (True, (128, 8))
    """
    chosen = chosen_leaves(params, plan, frozen_dense=frozen_dense, embeddings=embeddings)

    def convert(path: str, leaf: Any) -> Any:
        if path not in chosen:
            return leaf
        axis, stacked = chosen[path]
        return quantize_array(leaf, kind, block_size, path, axis=axis, stacked=stacked)

    return map_with_paths(convert, params)


def chosen_leaves(
    params: PyTree, plan: Plan | LoraConfig, *, frozen_dense: bool = False, embeddings: bool = False
) -> dict[str, tuple[int, int]]:
    """`{path: (axis, stacked)}` of the leaves `quantize` quantizes, with `quantize_array`'s `axis` and `stacked`.

    Every adapted kernel (its plan's stacked layer axes kept apart), plus, unless in modules_to_save, the 2-D
    `kernel` leaves with `frozen_dense` and the 2-D `embedding` leaves with `embeddings`. Leaves already
    quantized are left out. `params` may be abstract (`jax.ShapeDtypeStruct` leaves): loaders use it to quantize
    as they read.

    Args:
      params: the float base params, or their `jax.eval_shape`.
      plan: as for `quantize`.
      frozen_dense: as for `quantize`.
      embeddings: as for `quantize`.

    Returns:
      The chosen paths, each with the axis its blocks run along (0: a kernel's inputs, 1: an embedding's row) and
      how many leading axes stack layers.

    Example:
      >>> import jax.numpy as jnp, jaxlora
      >>> params = {"dense": {"kernel": jnp.zeros((128, 8))}, "embed": {"embedding": jnp.zeros((10, 64))}}
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, targets=("dense/kernel",)))
      >>> jaxlora.quantization.chosen_leaves(params, plan, embeddings=True)
      {'dense/kernel': (0, 0), 'embed/embedding': (1, 0)}
    """
    resolved = resolve(params, plan)
    saved = set(resolved.saved)
    chosen = {}
    for path, leaf in leaves_with_paths(params):
        table = _is_embedding(path, leaf)
        frozen_kernel = frozen_dense and path.rpartition("/")[2] == "kernel" and np.ndim(leaf) == 2
        adapted = resolved.leaves.get(path)
        if is_quantized(leaf) or not (adapted or (path not in saved and (frozen_kernel or (embeddings and table)))):
            continue
        chosen[path] = (1 if table else 0, adapted.stacked_axes if adapted else 0)
    return chosen


def dequantize_params(params: PyTree) -> PyTree:
    """The float tree again: every quantized kernel dequantized (to its scales' dtype)."""
    return map_with_paths(lambda _, leaf: dequantize(leaf), params)


def requantize(params: PyTree, like: PyTree) -> tuple[PyTree, dict[str, float]]:
    """Quantizes the leaves of a float tree (e.g. merged) that are quantized in `like`, with the same format.

    Returns:
      The quantized tree and `{path: relative error ‖W - Q(W)‖ / ‖W‖}` for each quantized leaf.
    """
    formats = {path: _format(leaf) for path, leaf in leaves_with_paths(like) if is_quantized(leaf)}
    errors: dict[str, float] = {}

    def convert(path: str, leaf: Any) -> Any:
        if path not in formats:
            return leaf
        kind, block, axis = formats[path]
        quantized = quantize_array(dequantize(leaf), kind, block, path, axis, stacked=np.ndim(leaf) - 2)
        errors[path] = relative_error(dequantize(leaf), quantized)
        return quantized

    return map_with_paths(convert, params), errors


def _format(leaf: Any) -> tuple[str, int, int]:
    """(kind, block length, the axis the blocks run along) of a quantized 2-D array (or stack of them)."""
    tiles = [n // m for n, m in zip(leaf.shape[-2:], leaf.scale.shape[-2:], strict=True)]
    axis = 1 if tiles[1] > 1 and tiles[0] == 1 else 0
    return ("nf4" if leaf.qtype == "nf4" else "int8"), tiles[axis], axis


def relative_error(weight: jax.Array, quantized: Any) -> float:
    """‖W - dequantize(Q)‖_F / ‖W‖_F."""
    weight = jnp.asarray(weight, jnp.float32)
    diff = weight - dequantize(quantized).astype(jnp.float32)
    return float(jnp.linalg.norm(diff) / jnp.maximum(jnp.linalg.norm(weight), 1e-30))


def nbytes(leaf: Any) -> int:
    """Bytes a leaf occupies in memory: quantized codes at their bit width (uint4 packed two to a byte)."""
    if is_quantized(leaf):
        return sum(nbytes(x) for x in jax.tree.leaves(leaf))
    bits = jnp.dtype(leaf.dtype).itemsize * 8 if jnp.dtype(leaf.dtype).name not in ("uint4", "int4") else 4
    return math.ceil(int(np.prod(np.shape(leaf))) * bits / 8)


def report(params: PyTree, quantized: PyTree, plan: Plan | LoraConfig | None = None) -> str:
    """A table per quantized leaf: format, float32 bytes, quantized bytes, and W's relative quantization error.

    Args:
      params: the float tree that was quantized.
      quantized: the tree `quantize` returned.
      plan: optional; adds the plan's view of each leaf (its LoRA rank and A/B shapes, or "frozen").

    Returns:
      The table as text, with the totals.

    Example:
      >>> import jax, jaxlora
      >>> from jaxlora import quantization
      >>> params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (128, 8))}}
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
      >>> print(quantization.report(params, quantization.quantize(params, plan), plan).splitlines()[2])
      dense/kernel  r2 A(128, 2) B(2, 8)  nf4/64  4,096          576              0.0945
    """
    floats = dict(leaves_with_paths(params))
    leaves = {} if plan is None else resolve(params, plan).leaves
    rows = [("leaf", *(("adapter",) if plan is not None else ()), "format", "float32 bytes", "quantized bytes")]
    rows[0] += ("rel. error ‖W-Q(W)‖/‖W‖",)
    total_float = total_quantized = 0
    for path, leaf in leaves_with_paths(quantized):
        if not is_quantized(leaf):
            continue
        kind, block, axis = _format(leaf)
        float_bytes = 4 * int(np.prod(leaf.shape))
        total_float += float_bytes
        total_quantized += nbytes(leaf)
        label = f"nf4/{block}" if kind == "nf4" else ("int8/channel" if axis == 0 else "int8/row")
        adapter = ()
        if plan is not None:
            planned = leaves.get(path)
            adapter = ("frozen" if planned is None else f"r{planned.rank} A{planned.a_shape} B{planned.b_shape}",)
        error = f"{relative_error(floats[path], leaf):.4f}"
        rows.append((path, *adapter, label, f"{float_bytes:,}", f"{nbytes(leaf):,}", error))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if total_float:
        lines.append(f"\nquantized leaves: {total_quantized:,} bytes, {total_quantized / total_float:.3f}x float32")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# The factored dense layer over a quantized kernel


def _decoded(q: Any, anchor: jax.Array, dtype: Any) -> jax.Array:
    """`qwix.dequantize(q)` computed so that it depends on `anchor` (through a zero that XLA cannot prove is 0).

    The float kernel then can be computed neither before `anchor` exists nor once for both passes: otherwise XLA
    (whose CPU pipeline drops optimisation barriers) hoists every layer's code-book lookup to the start of the
    step, shares it between the forward and the backward pass, and holds all the float kernels at once.
    """
    zero = jnp.nan_to_num(anchor.reshape(-1)[0].astype(jnp.float32) * 0.0, nan=0.0, posinf=0.0, neginf=0.0)
    return _decode(q, q.qvalue, q.scale, zero, dtype)


def _decode(q: Any, codes: jax.Array, scale: jax.Array, zero: jax.Array | float, dtype: Any) -> jax.Array:
    """Float values of `codes` (all of q's codes, or some rows of them) times their block scales `scale`."""
    if q.zero_point is not None:
        raise ValueError("jaxlora serves symmetric (absmax) quantized kernels only; this one has a zero point")
    if q.qtype == "nf4":
        table = _qwix()._src.core.numerics.get_nf4_buckets().astype(jnp.float32) + zero
        values = table.at[codes.astype(jnp.int32)].get(mode="promise_in_bounds")  # uint4 codes: 0..15
    else:
        values = codes.astype(jnp.float32) + zero
    scale = scale.astype(jnp.float32)
    for axis in range(values.ndim):
        tile = values.shape[axis] // scale.shape[axis]
        if tile > 1 and scale.shape[axis] > 1:
            scale = jnp.repeat(scale, tile, axis=axis)
    return (values * scale).astype(dtype)


def embedding_rows(q: Any, ids: jax.Array, dtype: Any) -> jax.Array:
    """`take(dequantize(q), ids, axis=0)` decoding only the gathered rows (and their scales) of a quantized table.

    Args:
      q: a quantized (vocab, features) table, e.g. from `quantize(..., embeddings=True)`.
      ids: integer ids of any shape.
      dtype: the output dtype.

    Returns:
      The rows, shaped `ids.shape + (features,)`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlora import quantization
      >>> table = jax.random.normal(jax.random.key(0), (10, 64))
      >>> q = quantization.quantize_array(table, "nf4", axis=1)
      >>> rows = quantization.embedding_rows(q, jnp.array([[1, 3]]), jnp.float32)
      >>> rows.shape, bool(jnp.array_equal(rows, quantization.dequantize(q)[jnp.array([[1, 3]])]))
      ((1, 2, 64), True)
    """
    rows_per_scale = q.shape[0] // q.scale.shape[0]  # 1 for a table quantized in rows
    codes = jnp.take(q.qvalue, ids, axis=0)
    scale = jnp.take(q.scale, ids // rows_per_scale, axis=0)
    # Broadcast the per-row scales over the features: codes (..., features), scales (..., features / block).
    flat_codes = codes.reshape(-1, q.shape[1])
    flat_scale = scale.reshape(-1, q.scale.shape[1])
    return _decode(q, flat_codes, flat_scale, 0.0, dtype).reshape(*ids.shape, q.shape[1])


@jax.custom_vjp
def quantized_attend(query: jax.Array, q: Any) -> jax.Array:
    """`query @ dequantize(q).T` (nn.Embed.attend, a tied LM head) with the table decoded inside both passes.

    The table is frozen (zero cotangent); the backward pass decodes it again when the cotangent arrives, so no
    float copy of it lives across the step.

    Args:
      query: (..., features), in the output dtype.
      q: a quantized (vocab, features) table.

    Returns:
      The logits (..., vocab).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxlora import quantization
      >>> q = quantization.quantize_array(jax.random.normal(jax.random.key(0), (10, 64)), "nf4", axis=1)
      >>> quantization.quantized_attend(jnp.ones((2, 64)), q).shape
      (2, 10)
    """
    return _attend(query, _decoded(q, query, query.dtype))


def _attend(query: jax.Array, table: jax.Array) -> jax.Array:
    return lax.dot_general(query, table, (((query.ndim - 1,), (1,)), ((), ())))


def _attend_fwd(query, q):
    return _attend(query, _decoded(q, query, query.dtype)), q


def _attend_bwd(q, g):
    g = lax.optimization_barrier(g)
    table = _decoded(q, g, g.dtype)
    dquery = lax.dot_general(g, table, (((g.ndim - 1,), (0,)), ((), ())))
    return dquery, jax.tree.map(_zero_cotangent, q)


def _forward(x, x_lora, q, bias, a, b, scale):
    w = _decoded(q, x, x.dtype)  # dequantized when x arrives, freed after the product
    return linear_forward(x, x_lora, w, bias, a, b, scale)


def _zero_cotangent(x: jax.Array) -> Any:
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, dtype=jax.dtypes.float0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def quantized_linear(x, x_lora, q, bias, a, b, scale: float):
    """`x Q + bias + scale·(x_lora A) B` with Q a quantized kernel, dequantized inside both passes.

    The kernel is frozen (its cotangent is zero); the backward pass dequantizes it again behind an optimisation
    barrier, so XLA cannot keep the forward pass's float copy alive until then. `a`, `b` and `bias` may be None.
    """
    return _forward(x, x_lora, q, bias, a, b, scale)[0]


def _fwd(x, x_lora, q, bias, a, b, scale):
    y, xa = _forward(x, x_lora, q, bias, a, b, scale)
    return y, (x_lora, q, bias, a, b, xa)


def _bwd(scale, residuals, g):
    x_lora, q, bias, a, b, xa = residuals
    g = lax.optimization_barrier(g)
    w = _decoded(q, g, g.dtype)  # dequantized again when the cotangent arrives
    dx = _matmul_t(g, w)  # x has the output dtype (promote_dtype)
    dbias = None if bias is None else jnp.sum(g, axis=tuple(range(g.ndim - 1))).astype(bias.dtype)
    dq = jax.tree.map(_zero_cotangent, q)
    if a is None:
        return dx, None if x_lora is None else jnp.zeros_like(x_lora), dq, dbias, None, None
    gs = (scale * g).astype(b.dtype)
    gb = _matmul_t(gs, b)
    dxl = _matmul_t(gb, a).astype(x_lora.dtype)
    da = _outer(x_lora.astype(a.dtype), gb)
    db = _outer(xa, gs)
    return dx, dxl, dq, dbias, da, db


quantized_linear.defvjp(_fwd, _bwd)
quantized_attend.defvjp(_attend_fwd, _attend_bwd)


def check_mergeable(pairs: Mapping[str, Mapping[str, Any]], params: PyTree) -> None:
    """Refuses DoRA adapters on quantized kernels (merging, and serving, are not supported for them)."""
    for path, leaf in leaves_with_paths(params):
        if path in pairs and is_quantized(leaf) and "magnitude" in pairs[path]:
            raise ValueError(
                f"cannot merge the DoRA adapter of {path!r} into a quantized kernel: DoRA on a quantized base is "
                "not supported yet; dequantize first (jaxlora.quantization.dequantize_params(params)), merge, "
                "and re-quantize with jaxlora.quantization.requantize(merged, like=quantized_params) if needed"
            )
