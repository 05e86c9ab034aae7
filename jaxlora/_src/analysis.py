"""The LoRA paper's analysis tools (Hu et al. 2021, section 7): low-rank SVD, subspace similarity, amplification.

Layout. The paper writes W with shape (d, k) and the update as ΔW = B A with B (d, r), A (r, k), so a
layer computes h = W x. jaxlora stores kernels as (in, out) and the update as ΔW = s · A @ B with
A (in, r), B (r, out), so a layer computes y = x @ W. Every quantity below is written for the jaxlora
layout; each equals the paper's quantity for the transposed matrices:

* the paper's A (r, k) spans the *input* subspace through its right singular vectors; jaxlora's A
  (in, r) is its transpose, so `subspace_similarity` uses the *left* singular vectors of A (in, r);
* the amplification factor ||ΔW||_F / ||Uᵀ W V||_F is invariant under transposing both W and ΔW
  (U and V swap roles and Uᵀ W V is transposed), so it is computed from the SVD of ΔW as stored.

Kernels with several input axes (fan_in_ndim > 1, e.g. DenseGeneral or Conv) are viewed as 2-D
matrices (prod(input axes), prod(output axes)), the same view LoRA uses for its update.

All matrix functions are pure and jit-compatible; `rank`, `i` and `j` are static Python ints.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jaxlora._src.config import LoraConfig
from jaxlora._src.paths import PyTree, flatten_adapters, leaves_with_paths
from jaxlora._src.planning import Plan, resolve
from jaxlora._src.svd import as_float, check_matrix, check_rank, top_singular

Array = jax.Array


def low_rank_approximation(w: Array, rank: int) -> tuple[Array, Array]:
    """Factors `a` (m, r), `b` (r, n) with `a @ b` the best rank-r approximation of a 2-D `w`.

    The singular values are split evenly, a = U_r·sqrt(S_r) and b = sqrt(S_r)·V_rᵀ, so both
    factors have the same scale (the split PiSSA uses). Returned in `w.dtype`.
    """
    u, s, vt = top_singular(w, rank)
    root = jnp.sqrt(s)
    dtype = jnp.asarray(w).dtype
    return (u * root[None, :]).astype(dtype), (root[:, None] * vt).astype(dtype)


def _projection_norm(w: Array, u: Array, v: Array) -> Array:
    """||uᵀ w v||_F: the size of `w` within the subspaces spanned by the columns of u and v."""
    return jnp.linalg.norm(u.T @ as_float(w) @ v)


def amplification_factor(delta_w: Array, w: Array, rank: int | None = None) -> Array:
    """||ΔW||_F / ||Uᵀ W V||_F, U, V the top-`rank` left/right singular vectors of ΔW (paper §7.3).

    How strongly the update amplifies directions that W already has: large when ΔW boosts
    directions W barely uses. `rank=None` uses every direction of ΔW whose singular value exceeds
    max(shape)·eps·σ_max (its numerical rank, as `numpy.linalg.matrix_rank`), which for an adapter
    update s·A@B is the adapter's rank. Both matrices are (in, out) in jaxlora's layout.
    """
    check_matrix("delta_w", delta_w)
    check_matrix("w", w)
    if jnp.shape(delta_w) != jnp.shape(w):
        raise ValueError(f"delta_w has shape {jnp.shape(delta_w)} but w has {jnp.shape(w)}; they must match")
    if rank is not None:
        check_rank(rank, jnp.shape(w), "w")
    u, s, vt = jnp.linalg.svd(as_float(delta_w), full_matrices=False)
    if rank is None:
        tol = max(jnp.shape(w)) * jnp.finfo(s.dtype).eps * s[0]
        keep = (s > tol).astype(s.dtype)
    else:
        keep = (jnp.arange(s.shape[0]) < rank).astype(s.dtype)
    return jnp.linalg.norm(s) / _projection_norm(w, u * keep[None, :], vt.T * keep[None, :])


def _factored_svd(a: Array, b: Array) -> tuple[Array, Array, Array]:
    """Thin SVD of a @ b for a (m, r), b (r, n) without forming the m×n product: u (m, r), s (r,), v (n, r)."""
    qa, ra = jnp.linalg.qr(as_float(a))
    qb, rb = jnp.linalg.qr(as_float(b).T)
    uc, s, vct = jnp.linalg.svd(ra @ rb.T)
    return qa @ uc, s, qb @ vct.T


def adapter_amplification_factor(a: Array, b: Array, w: Array, scale: float = 1.0, rank: int | None = None) -> Array:
    """`amplification_factor(scale * a @ b, w, rank)` for 2-D factors a (in, r), b (r, out), never forming ΔW.

    `rank=None` uses all r directions of the adapter, the paper's choice.
    """
    for name, x in (("a", a), ("b", b), ("w", w)):
        check_matrix(name, x)
    (m, r), (r2, n) = jnp.shape(a), jnp.shape(b)
    if r != r2 or jnp.shape(w) != (m, n):
        raise ValueError(f"need a (in, r), b (r, out), w (in, out); got a {(m, r)}, b {(r2, n)}, w {jnp.shape(w)}")
    if r > min(m, n):
        raise ValueError(f"adapter rank {r} exceeds min(in, out) = {min(m, n)}")
    if rank is None:
        rank = r
    check_rank(rank, (r, m, n), "the adapter")
    u, s, v = _factored_svd(a, b)
    return abs(scale) * jnp.linalg.norm(s) / _projection_norm(w, u[:, :rank], v[:, :rank])


def subspace_similarity(a1: Array, a2: Array, i: int | None = None, j: int | None = None) -> Array:
    """φ(A1, A2, i, j) = ||U1[:, :i]ᵀ U2[:, :j]||_F² / min(i, j) over the left singular vectors of A (n, r).

    The paper's normalised subspace similarity (§7.2), in [0, 1]: 1 when one top subspace contains
    the other, 0 when they are orthogonal. jaxlora's A (in, r) is the paper's A transposed, so its
    left singular vectors span the input subspace the paper compares. With `i` and `j` (1-based,
    both or neither) returns that scalar; otherwise the full (r1, r2) matrix with φ(i, j) at
    [i - 1, j - 1], ready to plot. Directions of zero singular value (a rank-deficient A) are arbitrary.
    """
    check_matrix("a1", a1)
    check_matrix("a2", a2)
    (n1, r1), (n2, r2) = jnp.shape(a1), jnp.shape(a2)
    if n1 != n2:
        raise ValueError(f"a1 {(n1, r1)} and a2 {(n2, r2)} must share their first (input) axis")
    if r1 > n1 or r2 > n2:
        raise ValueError(f"a rank above the input size has no meaning here: a1 {(n1, r1)}, a2 {(n2, r2)}")
    if (i is None) != (j is None):
        raise ValueError("give both i and j (for one value) or neither (for the full matrix)")
    if i is not None:
        for name, value, limit in (("i", i, r1), ("j", j, r2)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                raise ValueError(
                    f"{name} must be an int in 1..{limit} (1-based, up to that adapter's rank), got {value!r}"
                )
    u1 = jnp.linalg.svd(as_float(a1), full_matrices=False)[0]
    u2 = jnp.linalg.svd(as_float(a2), full_matrices=False)[0]
    overlap = jnp.cumsum(jnp.cumsum(jnp.square(u1.T @ u2), axis=0), axis=1)
    sizes = jnp.minimum(jnp.arange(1, r1 + 1)[:, None], jnp.arange(1, r2 + 1)[None, :])
    phi = overlap / sizes.astype(overlap.dtype)
    return phi if i is None else phi[i - 1, j - 1]


# ---------------------------------------------------------------------------------------------
# Pytree versions: one value per adapted leaf, keyed by its "/"-joined path.


def _as_matrices(a: Array, b: Array) -> tuple[Array, Array]:
    """A (*in, r) -> (prod(in), r) and B (r, *out) -> (r, prod(out))."""
    r = jnp.shape(a)[-1]
    return jnp.reshape(a, (-1, r)), jnp.reshape(b, (r, -1))


def amplification_factors(
    params: PyTree, adapters: Mapping, plan: Plan | LoraConfig, rank: int | None = None
) -> dict[str, Array]:
    """`{path: amplification factor}` for every adapted leaf; ΔW = scale·A@B with the plan's scale.

    `rank=None` uses each adapter's own rank. Pass the frozen base `params` the adapters are added
    to (for PiSSA, the residual base that `jaxlora.init` returned), and their `jaxlora.plan` (or config).
    """
    resolved = resolve(params, plan)
    flat = resolved.check_adapters(adapters)
    weights = dict(leaves_with_paths(params))
    out = {}
    for path, pair in flat.items():
        leaf = resolved.leaves[path]
        a, b = _as_matrices(pair["lora_a"], pair["lora_b"])
        w = jnp.reshape(weights[path], (leaf.fan_in, leaf.fan_out))
        out[path] = adapter_amplification_factor(a, b, w, leaf.scale, None if rank is None else min(rank, leaf.rank))
    return out


def subspace_similarities(adapters1: Mapping, adapters2: Mapping, factor: str = "lora_a") -> dict[str, Array]:
    """`{path: (r1, r2) φ matrix}` comparing two adapter sets leaf by leaf (e.g. two ranks or seeds).

    `factor="lora_a"` compares input subspaces (the paper's choice), `"lora_b"` output subspaces
    (B (r, *out) is viewed as (prod(out), r)). Both sets must adapt the same paths.
    """
    if factor not in ("lora_a", "lora_b"):
        raise ValueError(f"factor must be 'lora_a' or 'lora_b', got {factor!r}")
    flat1, flat2 = flatten_adapters(adapters1), flatten_adapters(adapters2)
    if set(flat1) != set(flat2):
        raise ValueError(
            f"the adapter sets adapt different leaves: only in the first {sorted(set(flat1) - set(flat2))}, "
            f"only in the second {sorted(set(flat2) - set(flat1))}; compare adapters made with the same targets"
        )
    out = {}
    for path in flat1:
        a1, b1 = _as_matrices(flat1[path]["lora_a"], flat1[path]["lora_b"])
        a2, b2 = _as_matrices(flat2[path]["lora_a"], flat2[path]["lora_b"])
        out[path] = subspace_similarity(a1, a2) if factor == "lora_a" else subspace_similarity(b1.T, b2.T)
    return out


__all__ = [
    "adapter_amplification_factor",
    "amplification_factor",
    "amplification_factors",
    "low_rank_approximation",
    "subspace_similarities",
    "subspace_similarity",
    "top_singular",
]
