"""The paper's analysis tools against small cases whose SVD is known by hand."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora import LoraConfig, analysis


def _rand(seed: int, *shape: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _basis(n: int, *idx: int) -> np.ndarray:
    """Columns e_i of the n-dim identity, as an (n, len(idx)) matrix."""
    return np.eye(n, dtype=np.float32)[:, list(idx)]


# ----------------------------------------------------------------- top_singular / low_rank_approximation


def test_low_rank_approximation_of_diagonal_keeps_top_entries():
    w = np.zeros((4, 3), np.float32)
    w[0, 0], w[1, 1], w[2, 2] = 1.0, 5.0, 3.0
    a, b = analysis.low_rank_approximation(w, 2)
    assert a.shape == (4, 2) and b.shape == (2, 3)
    want = np.zeros_like(w)
    want[1, 1], want[2, 2] = 5.0, 3.0
    np.testing.assert_allclose(a @ b, want, atol=1e-6)


def test_low_rank_approximation_is_eckart_young_and_balanced():
    w = _rand(0, 7, 5)
    a, b = analysis.low_rank_approximation(w, 3)
    s = np.linalg.svd(w, compute_uv=False)
    np.testing.assert_allclose(np.linalg.norm(w - a @ b), np.sqrt(np.sum(s[3:] ** 2)), rtol=1e-5)
    # the even split: both factors carry sqrt(S), so AᵀA = B Bᵀ = diag(S_r)
    np.testing.assert_allclose(a.T @ a, np.diag(s[:3]), atol=1e-4)
    np.testing.assert_allclose(b @ b.T, np.diag(s[:3]), atol=1e-4)


def test_full_rank_approximation_reproduces_w_and_keeps_dtype():
    w = _rand(1, 4, 6)
    a, b = analysis.low_rank_approximation(w, 4)
    np.testing.assert_allclose(a @ b, w, atol=1e-5)
    a16, b16 = analysis.low_rank_approximation(jnp.asarray(w, jnp.bfloat16), 2)
    assert a16.dtype == jnp.bfloat16 and b16.dtype == jnp.bfloat16


def test_top_singular_triplets():
    w = _rand(2, 6, 4)
    u, s, vt = analysis.top_singular(w, 2)
    assert u.shape == (6, 2) and s.shape == (2,) and vt.shape == (2, 4)
    np.testing.assert_allclose(s, np.linalg.svd(w, compute_uv=False)[:2], rtol=1e-5)
    np.testing.assert_allclose(w @ vt.T, u * s, atol=1e-5)  # W v_i = s_i u_i


@pytest.mark.parametrize("rank", [0, 5, 2.0, True])
def test_bad_rank_is_refused(rank):
    with pytest.raises(ValueError, match=r"rank must be an int in 1\.\.4"):
        analysis.low_rank_approximation(_rand(0, 4, 6), rank)


def test_non_matrix_is_refused():
    with pytest.raises(ValueError, match="2-D matrix"):
        analysis.top_singular(_rand(0, 2, 3, 4), 1)


# ----------------------------------------------------------------- amplification_factor


def _w_diag() -> np.ndarray:
    w = np.zeros((4, 3), np.float32)
    w[0, 0], w[1, 1], w[2, 2] = 10.0, 1.0, 0.5
    return w


def test_update_along_ws_top_direction_is_barely_amplified():
    delta = 2.0 * _basis(4, 0) @ _basis(3, 0).T  # 2 e1 e1ᵀ: U = e1, V = e1, UᵀWV = 10
    np.testing.assert_allclose(analysis.amplification_factor(delta, _w_diag()), 0.2, rtol=1e-6)


def test_update_along_ws_weakest_direction_is_strongly_amplified():
    delta = 2.0 * _basis(4, 2) @ _basis(3, 2).T  # UᵀWV = 0.5
    np.testing.assert_allclose(analysis.amplification_factor(delta, _w_diag()), 4.0, rtol=1e-6)


def test_rank_two_update_and_explicit_rank():
    delta = np.zeros((4, 3), np.float32)
    delta[1, 1], delta[2, 2] = 2.0, 3.0  # singular directions e3 (3), e2 (2)
    # rank 2: ||ΔW|| = sqrt(13), UᵀWV = diag(0.5, 1)
    np.testing.assert_allclose(analysis.amplification_factor(delta, _w_diag()), np.sqrt(13 / 1.25), rtol=1e-6)
    np.testing.assert_allclose(analysis.amplification_factor(delta, _w_diag(), rank=2), np.sqrt(13 / 1.25), rtol=1e-6)
    # rank 1: only the top direction e3, where W is 0.5; the numerator stays the whole ||ΔW||_F
    np.testing.assert_allclose(analysis.amplification_factor(delta, _w_diag(), rank=1), np.sqrt(13) / 0.5, rtol=1e-6)


def test_amplification_is_layout_independent():
    # the paper's (d, k) layout is ours transposed; the factor must not depend on it
    delta, w = _rand(3, 6, 2) @ _rand(4, 2, 5), _rand(5, 6, 5)
    got = analysis.amplification_factor(delta, w)
    np.testing.assert_allclose(analysis.amplification_factor(delta.T, w.T), got, rtol=1e-4)
    # numerical rank of a rank-2 product is 2
    np.testing.assert_allclose(analysis.amplification_factor(delta, w, rank=2), got, rtol=1e-4)


def test_factored_amplification_matches_dense():
    a, b, w = _rand(6, 8, 3), _rand(7, 3, 5), _rand(8, 8, 5)
    dense = analysis.amplification_factor(0.5 * a @ b, w, rank=3)
    np.testing.assert_allclose(analysis.adapter_amplification_factor(a, b, w, scale=0.5), dense, rtol=1e-4)
    dense1 = analysis.amplification_factor(0.5 * a @ b, w, rank=1)
    np.testing.assert_allclose(analysis.adapter_amplification_factor(a, b, w, 0.5, rank=1), dense1, rtol=1e-4)


def test_amplification_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="must match"):
        analysis.amplification_factor(_rand(0, 4, 3), _rand(0, 3, 4))
    with pytest.raises(ValueError, match="need a \\(in, r\\)"):
        analysis.adapter_amplification_factor(_rand(0, 4, 2), _rand(0, 3, 5), _rand(0, 4, 5))


# ----------------------------------------------------------------- subspace_similarity


def test_identical_adapters_are_similar_everywhere():
    a = _rand(9, 10, 4)
    phi = analysis.subspace_similarity(a, a)
    assert phi.shape == (4, 4)
    np.testing.assert_allclose(phi, np.ones((4, 4)), atol=1e-5)


def test_orthogonal_subspaces_have_zero_similarity():
    phi = analysis.subspace_similarity(_basis(6, 0, 1), _basis(6, 2, 3, 4))
    assert phi.shape == (2, 3)
    np.testing.assert_allclose(phi, 0.0, atol=1e-7)


def test_similarity_follows_singular_order():
    a1 = _basis(5, 1)  # span{e2}
    a2 = _basis(5, 0, 1) * np.array([3.0, 1.0], np.float32)  # top direction e1 (σ=3), then e2 (σ=1)
    np.testing.assert_allclose(analysis.subspace_similarity(a1, a2), [[0.0, 1.0]], atol=1e-6)
    np.testing.assert_allclose(analysis.subspace_similarity(a1, a2, 1, 2), 1.0, atol=1e-6)
    half = (_basis(5, 0) + _basis(5, 1)) / np.sqrt(2.0)  # 45 degrees from e1
    np.testing.assert_allclose(analysis.subspace_similarity(_basis(5, 0), half), [[0.5]], atol=1e-6)


def test_similarity_is_symmetric_and_bounded():
    a1, a2 = _rand(10, 12, 3), _rand(11, 12, 5)
    phi = np.asarray(analysis.subspace_similarity(a1, a2))
    np.testing.assert_allclose(analysis.subspace_similarity(a2, a1), phi.T, atol=1e-5)
    assert phi.min() >= 0.0 and phi.max() <= 1.0 + 1e-5
    # same column span (A mixed by an invertible r×r matrix) -> the whole subspaces coincide
    mixed = a1 @ _rand(12, 3, 3)
    np.testing.assert_allclose(analysis.subspace_similarity(a1, mixed, 3, 3), 1.0, atol=1e-4)


def test_similarity_arguments_are_checked():
    with pytest.raises(ValueError, match="both i and j"):
        analysis.subspace_similarity(_rand(0, 5, 2), _rand(1, 5, 2), i=1)
    with pytest.raises(ValueError, match=r"j must be an int in 1\.\.2"):
        analysis.subspace_similarity(_rand(0, 5, 2), _rand(1, 5, 2), 1, 3)
    with pytest.raises(ValueError, match="share their first"):
        analysis.subspace_similarity(_rand(0, 5, 2), _rand(1, 6, 2))


# ----------------------------------------------------------------- jit


def test_matrix_functions_are_jit_compatible():
    w, a, b = _rand(0, 6, 5), _rand(1, 6, 2), _rand(2, 2, 5)
    eager = analysis.low_rank_approximation(w, 2)
    jitted = jax.jit(functools.partial(analysis.low_rank_approximation, rank=2))(w)
    for x, y in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)
    delta = a @ b
    np.testing.assert_allclose(
        jax.jit(analysis.amplification_factor)(delta, w), analysis.amplification_factor(delta, w), rtol=1e-5
    )
    np.testing.assert_allclose(
        jax.jit(analysis.adapter_amplification_factor)(a, b, w, 2.0),
        analysis.adapter_amplification_factor(a, b, w, 2.0),
        rtol=1e-5,
    )
    sim = jax.jit(functools.partial(analysis.subspace_similarity, i=2, j=1))
    np.testing.assert_allclose(sim(a, _rand(3, 6, 3)), analysis.subspace_similarity(a, _rand(3, 6, 3), 2, 1), atol=1e-6)


# ----------------------------------------------------------------- pytree versions


def _tree():
    params = {
        "Dense_0": {"kernel": _rand(20, 6, 5), "bias": np.zeros(5, np.float32)},
        "Gen": {"kernel": _rand(21, 2, 3, 4)},  # DenseGeneral-like, two input axes
    }
    adapters = {
        "Dense_0": {"kernel": {"lora_a": _rand(22, 6, 2), "lora_b": _rand(23, 2, 5)}},
        "Gen": {"kernel": {"lora_a": _rand(24, 2, 3, 3), "lora_b": _rand(25, 3, 4)}},
    }
    cfg = LoraConfig(rank=2, alpha=4.0, rank_pattern={"Gen/kernel": 3}, fan_in_ndim={"Gen/kernel": 2})
    return params, adapters, cfg


def test_amplification_factors_over_a_tree():
    params, adapters, cfg = _tree()
    got = analysis.amplification_factors(params, adapters, cfg)
    assert set(got) == {"Dense_0/kernel", "Gen/kernel"}
    d = adapters["Dense_0"]["kernel"]
    want = analysis.amplification_factor(2.0 * d["lora_a"] @ d["lora_b"], params["Dense_0"]["kernel"], rank=2)
    np.testing.assert_allclose(got["Dense_0/kernel"], want, rtol=1e-4)
    g = adapters["Gen"]["kernel"]
    delta = (4.0 / 3) * g["lora_a"].reshape(6, 3) @ g["lora_b"]
    want = analysis.amplification_factor(delta, params["Gen"]["kernel"].reshape(6, 4), rank=3)
    np.testing.assert_allclose(got["Gen/kernel"], want, rtol=1e-4)


def test_amplification_factors_agree_with_merged_update():
    params, _, cfg = _tree()
    _, adapters = jaxlora.init(jax.random.key(0), params, cfg)
    adapters = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), adapters)
    merged = jaxlora.merge(params, adapters, cfg)
    got = analysis.amplification_factors(params, adapters, cfg)
    for layer, rank in (("Dense_0", 2), ("Gen", 3)):
        w = params[layer]["kernel"].reshape(6, -1)
        delta = np.asarray(merged[layer]["kernel"]).reshape(6, -1) - w
        want = analysis.amplification_factor(delta, w, rank=rank)
        np.testing.assert_allclose(got[f"{layer}/kernel"], want, rtol=1e-3)


def test_subspace_similarities_over_a_tree():
    _, adapters, _ = _tree()
    same = analysis.subspace_similarities(adapters, adapters)
    assert same["Dense_0/kernel"].shape == (2, 2) and same["Gen/kernel"].shape == (3, 3)
    for phi in same.values():
        np.testing.assert_allclose(phi, 1.0, atol=1e-5)
    other = jax.tree.map(lambda x: x + 1.0, adapters)
    on_b = analysis.subspace_similarities(adapters, other, factor="lora_b")
    b1, b2 = adapters["Gen"]["kernel"]["lora_b"], other["Gen"]["kernel"]["lora_b"]
    np.testing.assert_allclose(on_b["Gen/kernel"], analysis.subspace_similarity(b1.T, b2.T), atol=1e-6)
    with pytest.raises(ValueError, match="different leaves"):
        analysis.subspace_similarities(adapters, {"Dense_0": adapters["Dense_0"]})
    with pytest.raises(ValueError, match="factor must be"):
        analysis.subspace_similarities(adapters, adapters, factor="kernel")
