"""Several adapters over one base: weighted combinations, adapter banks serving mixed batches, named adapters.

Every reference is computed densely: W + Σ w_i s_i A_i B_i in numpy (float64), or each row run alone through
the model with its adapter merged.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora

# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _base():
    """A plain leaf (6, 5), a stack of 3 layers (3, 6, 4), and a leaf (5, 4) only some adapters target."""
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        "a": {"kernel": jax.random.normal(keys[0], (6, 5))},
        "stack": {"kernel": jax.random.normal(keys[1], (3, 6, 4))},
        "c": {"kernel": jax.random.normal(keys[2], (5, 4))},
    }


def _trained(params, config, seed):
    """Adapters of `config` with random A and B (a trained adapter: B != 0)."""
    plan = jaxlora.plan(params, config)
    _, adapters = jaxlora.init(jax.random.key(seed), params, plan)
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    leaves = [jax.random.normal(k, x.shape, x.dtype) * 0.5 for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, leaves), plan


def _configs():
    return [
        jaxlora.LoraConfig(rank=2, alpha=4.0, targets=("a/kernel", "stack/kernel"), stacked_axes={"stack/.*": 1}),
        jaxlora.LoraConfig(
            rank=3,
            alpha=1.5,
            targets=("a/kernel", "stack/kernel", "c/kernel"),
            stacked_axes={"stack/.*": 1},
            layers_to_transform={"stack/.*": (0, 2)},
        ),
        jaxlora.LoraConfig(rank=1, alpha=3.0, targets=("a/kernel", "stack/kernel"), stacked_axes={"stack/.*": 1}),
    ]


def _dense(adapters, plan, path):
    """s·A B per layer in float64, zero on layers outside layers_to_transform; (*stack, in, out)."""
    leaf = plan.leaves[path]
    node = adapters
    for name in path.split("/"):
        node = node[name]
    a, b = np.asarray(node["lora_a"], np.float64), np.asarray(node["lora_b"], np.float64)
    delta = leaf.scale * np.matmul(a, b)
    if leaf.layers is not None:
        mask = np.zeros(leaf.num_layers)
        mask[list(leaf.layers)] = 1.0
        delta = delta * mask.reshape((*leaf.stack_shape, 1, 1))
    return delta


def _weighted_sum(entries, weights, path):
    return sum(
        w * _dense(ad, plan, path) for (ad, plan), w in zip(entries, weights, strict=True) if path in plan.leaves
    )


def _merged_delta(params, adapters, plan, path):
    merged = jaxlora.merge(params, adapters, plan)
    node_m, node_p = merged, params
    for name in path.split("/"):
        node_m, node_p = node_m[name], node_p[name]
    return np.asarray(node_m, np.float64) - np.asarray(node_p, np.float64)


# ---------------------------------------------------------------------------------------------------------------
# Combinations


def test_cat_is_the_exact_weighted_sum_with_the_sum_of_ranks():
    params = _base()
    entries = [_trained(params, c, seed) for seed, c in enumerate(_configs())]
    weights = [0.7, -1.3, 2.0]
    adapters, plan = jaxlora.weighted_cat(entries, weights, targets="union")
    assert set(plan.leaves) == {"a/kernel", "stack/kernel", "c/kernel"}
    assert plan.leaves["a/kernel"].rank == 6 and plan.leaves["c/kernel"].rank == 3
    assert plan.leaves["stack/kernel"].layers is None  # the union of (all) and (0, 2)
    for path in plan.leaves:
        np.testing.assert_allclose(
            _merged_delta(params, adapters, plan, path), _weighted_sum(entries, weights, path), atol=2e-5
        )


def test_intersection_keeps_only_the_common_leaves():
    params = _base()
    entries = [_trained(params, c, seed) for seed, c in enumerate(_configs()[:2])]
    adapters, plan = jaxlora.weighted_cat(entries, [1.0, 1.0], targets="intersection")
    assert set(plan.leaves) == {"a/kernel", "stack/kernel"}
    np.testing.assert_allclose(
        _merged_delta(params, adapters, plan, "a/kernel"), _weighted_sum(entries, [1.0, 1.0], "a/kernel"), atol=2e-5
    )


def test_svd_at_full_rank_is_exact_and_reports_nothing_discarded():
    params = _base()
    configs = _configs()
    entries = [_trained(params, c, seed) for seed, c in enumerate((configs[0], configs[2]))]  # ranks 2 + 1
    weights = [1.0, 0.5]
    adapters, plan, discarded = jaxlora.weighted_svd(entries, weights, rank=3)
    for path in plan.leaves:
        assert discarded[path] < 1e-10, (path, discarded[path])
        np.testing.assert_allclose(
            _merged_delta(params, adapters, plan, path), _weighted_sum(entries, weights, path), atol=5e-5
        )


def test_svd_truncates_to_the_best_approximation_and_reports_the_dropped_energy():
    params = _base()
    entries = [_trained(params, c, seed) for seed, c in enumerate(_configs())]
    weights = [1.0, -0.5, 0.8]
    adapters, plan, discarded = jaxlora.weighted_svd(entries, weights, rank=2, targets="union")
    for path, leaf in plan.leaves.items():
        exact = _weighted_sum(entries, weights, path)
        u, s, vt = np.linalg.svd(exact.reshape(-1, *exact.shape[-2:]), full_matrices=False)
        best = (u[..., :2] * s[..., None, :2]) @ vt[..., :2, :]
        np.testing.assert_allclose(
            _merged_delta(params, adapters, plan, path).reshape(best.shape), best, atol=5e-5, err_msg=path
        )
        want = float(np.sum(s[..., 2:] ** 2) / np.sum(s**2))
        assert want > 1e-3  # the truncation drops something at every leaf here
        assert discarded[path] == pytest.approx(want, rel=1e-4), path
        assert leaf.rank == 2 and leaf.scale == 1.0


def test_linear_is_peft_linear_exact_for_one_adapter_with_cross_terms_for_several():
    params = _base()
    configs = _configs()
    same_rank = [configs[0], configs[0]]
    entries = [_trained(params, c, seed) for seed, c in enumerate(same_rank)]
    # one adapter, negative weight: exactly w·s·A B
    adapters, plan = jaxlora.weighted_linear(entries[:1], [-0.6])
    np.testing.assert_allclose(
        _merged_delta(params, adapters, plan, "a/kernel"), _weighted_sum(entries[:1], [-0.6], "a/kernel"), atol=2e-5
    )
    # two: (Σ c_i A_i)(Σ d_j B_j), c_i = sign(w_i)·√(|w_i| s_i), d_j = √(|w_j| s_j)
    weights = [0.6, -0.25]
    adapters, plan = jaxlora.weighted_linear(entries, weights)
    for path in ("a/kernel", "stack/kernel"):
        node = [e[0] for e in entries]
        for name in path.split("/"):
            node = [n[name] for n in node]
        scale = entries[0][1].leaves[path].scale
        c = [np.sign(w) * np.sqrt(abs(w) * scale) for w in weights]
        d = [np.sqrt(abs(w) * scale) for w in weights]
        a = sum(ci * np.asarray(n["lora_a"], np.float64) for ci, n in zip(c, node, strict=True))
        b = sum(di * np.asarray(n["lora_b"], np.float64) for di, n in zip(d, node, strict=True))
        np.testing.assert_allclose(_merged_delta(params, adapters, plan, path), a @ b, atol=2e-5)
        # and it is not the weighted sum: the cross terms are there
        assert np.abs(a @ b - _weighted_sum(entries, weights, path)).max() > 1e-2


def test_a_combined_adapter_is_served_like_any_other():
    model = nn.Dense(5)
    x = jax.random.normal(jax.random.key(3), (2, 6))
    params = model.init(jax.random.key(0), x)["params"]
    entries = [_trained(params, jaxlora.LoraConfig(rank=r, alpha=2.0 * r), seed) for seed, r in enumerate((1, 2))]
    adapters, plan = jaxlora.weighted_cat(entries, [0.5, 1.5])
    got = jaxlora.apply(model, {"params": params}, adapters, plan, x)
    w = np.asarray(params["kernel"], np.float64) + _weighted_sum(entries, [0.5, 1.5], "kernel")
    np.testing.assert_allclose(got, np.asarray(x, np.float64) @ w + np.asarray(params["bias"]), atol=1e-4)


def test_combining_bad_input_is_refused_with_the_fix():
    params = _base()
    configs = _configs()
    e0, e1 = _trained(params, configs[0], 0), _trained(params, configs[1], 1)
    with pytest.raises(ValueError, match="2 weights for 3 adapters"):
        jaxlora.weighted_cat([e0, e1, e0], [1.0, 2.0])
    with pytest.raises(ValueError, match="one number per adapter"):
        jaxlora.weighted_cat([e0, e1], 1.0)
    with pytest.raises(ValueError, match=r"'c/kernel' is adapted by adapter 1 only.*targets='union'"):
        jaxlora.weighted_cat([e0, e1], [1.0, 1.0])
    with pytest.raises(ValueError, match=r"ranks \[2, 3\].*weighted_cat"):
        jaxlora.weighted_linear([e0, e1], [1.0, 1.0], targets="intersection")
    with pytest.raises(ValueError, match=r"rank must be an int in 1\.\.4"):
        jaxlora.weighted_svd([e0, e1], [1.0, 1.0], rank=5, targets="union")
    other = {**params, "a": {"kernel": jnp.zeros((6, 7))}}
    e_other = _trained(other, configs[0], 2)
    with pytest.raises(ValueError, match=r"different base models.*'a/kernel'.*\(6, 5\).*\(6, 7\)"):
        jaxlora.weighted_cat([e0, e_other], [1.0, 1.0])
    dora = _trained(params, jaxlora.LoraConfig(rank=2, targets=("a/kernel",), use_dora=True), 3)
    with pytest.raises(ValueError, match="DoRA"):
        jaxlora.weighted_cat([dora], [1.0])
    with pytest.raises(ValueError, match="targets must be"):
        jaxlora.weighted_cat([e0], [1.0], targets="all")
