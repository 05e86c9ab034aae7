"""Quantizing a 2-D array, or a stack of them, as it is read: its float values never exist whole in memory.

`quantize_as_read` asks a reader for one slice at a time of the indices that own their scales (a kernel's output
columns, an embedding's rows), quantizes it, and writes its codes and scales into preallocated arrays in place
(donated buffers). Each index's codes and scales depend on its own values only, so the result equals
`quantize_array` on the whole array bit for bit, while at most one slice is held in float.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxlora._src.quantization import Kind, check_quantizable, quantize_array, slice_length

# Values quantized at once: eager NF4 rounding takes about 150 bytes of scratch per value (qwix compares each value
# with the 16 codes), so 1M values take about 180 MB (quantize_array's 4M slices about 600 MB). Each slice's codes
# and scales depend on its values only, so the slice length does not change the result.
_READ_ELEMENTS = 1 << 20

# reader(layer, start, stop): the float values of `layer` (an index into the stacked axes, () when unstacked)
# restricted to indices start:stop of the axis that keeps its own scales, as a 2-D array in the leaf's layout.
Reader = Callable[[tuple[int, ...], int, int], np.ndarray]


@functools.partial(jax.jit, donate_argnums=0)
def _write(buffer: jax.Array, piece: jax.Array, start: tuple[int, ...]) -> jax.Array:
    """`buffer` with `piece` written at `start`, in place (the buffer is donated)."""
    return lax.dynamic_update_slice(buffer, piece.reshape((1,) * (buffer.ndim - piece.ndim) + piece.shape), start)


def quantize_as_read(
    read: Reader, shape: tuple[int, ...], kind: Kind, block_size: int, path: str, axis: int = 0, stacked: int = 0
) -> Any:
    """`quantize_array(whole, kind, block_size, path, axis, stacked)`, reading `whole` slice by slice.

    Args:
      read: returns the float slices (see `Reader`); called once per slice, layer by layer.
      shape: the whole array's shape, stacked axes first.
      kind, block_size, path, axis, stacked: as for `quantize_array`.

    Returns:
      The `qwix.QArray`, equal bit for bit to `quantize_array` on the whole array.

    Raises:
      ValueError: what `quantize_array` refuses, before anything is read.

    Example:
      >>> import numpy as np
      >>> from jaxlora._src.quantization import quantize_array
      >>> w = np.random.default_rng(0).normal(size=(2, 128, 8)).astype(np.float32)
      >>> q = quantize_as_read(lambda i, a, b: w[i][:, a:b], w.shape, "nf4", 64, "w", stacked=1)
      >>> bool(np.array_equal(q.scale, quantize_array(w, "nf4", 64, "w", stacked=1).scale))
      True
    """
    check_quantizable(shape, kind, block_size, path, axis, stacked)
    layer_shape, keep = shape[stacked:], 1 - axis
    step = slice_length(layer_shape, keep, _READ_ELEMENTS)
    codes = scales = template = None
    for layer in np.ndindex(*shape[:stacked]):
        for start in range(0, layer_shape[keep], step):
            rows = read(layer, start, min(start + step, layer_shape[keep]))
            piece = quantize_array(jnp.asarray(rows), kind, block_size, path, axis)
            if template is None:
                template, codes, scales = piece, *_buffers(piece, shape, stacked, keep)
            at = (*layer, *(start if a == keep else 0 for a in (0, 1)))
            codes, scales = _write(codes, piece.qvalue, at), _write(scales, piece.scale, at)
    return dataclasses.replace(template, qvalue=codes, scale=scales)


def _buffers(piece: Any, shape: tuple[int, ...], stacked: int, keep: int) -> tuple[jax.Array, jax.Array]:
    """Zeroed codes and scales for the whole array, in the dtypes of the first quantized slice."""
    scale_shape = list(piece.scale.shape)
    scale_shape[keep] = shape[stacked + keep]
    codes = jnp.zeros(shape, piece.qvalue.dtype)
    return codes, jnp.zeros((*shape[:stacked], *scale_shape), piece.scale.dtype)
