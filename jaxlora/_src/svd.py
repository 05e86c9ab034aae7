"""The top singular triplets of a matrix: what PiSSA initialisation and the analysis tools both need."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def as_float(x: Any) -> Array:
    """`x` as an array of at least float32 (SVD is not implemented for bfloat16/float16)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_matrix(name: str, x: Any) -> None:
    if jnp.ndim(x) != 2:
        raise ValueError(
            f"{name} must be a 2-D matrix, got shape {jnp.shape(x)}; "
            "reshape a multi-axis kernel to (prod(input axes), prod(output axes)) first"
        )


def check_rank(rank: Any, shape: tuple[int, ...], what: str) -> None:
    limit = min(shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(f"rank must be an int in 1..{limit} (min of {what} shape {tuple(shape)}), got {rank!r}")


def top_singular(w: Array, rank: int) -> tuple[Array, Array, Array]:
    """The top-`rank` singular triplets of a 2-D `w`: u (m, r), s (r,) descending, vt (r, n).

    `u @ diag(s) @ vt` is the best rank-r approximation of `w` (Eckart–Young). Computed in float32
    or wider.
    """
    check_matrix("w", w)
    check_rank(rank, jnp.shape(w), "w")
    u, s, vt = jnp.linalg.svd(as_float(w), full_matrices=False)
    return u[:, :rank], s[:rank], vt[:rank, :]
