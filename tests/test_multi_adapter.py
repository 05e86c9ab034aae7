"""Several adapters over one base: weighted combinations, adapter banks serving mixed batches, named adapters.

Every reference is computed densely: W + Σ w_i s_i A_i B_i in numpy (float64), or each row run alone through
the model with its adapter merged.
"""

from __future__ import annotations

import functools

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
    # Only the tree's structure and shapes are used (every leaf is replaced): traced, not run (no compiles).
    _, adapters = jax.eval_shape(lambda: jaxlora.init(jax.random.key(seed), params, plan))
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


# ---------------------------------------------------------------------------------------------------------------
# Adapter banks: mixed-adapter batches


class Tower(nn.Module):
    """Embed lookup, a DenseGeneral to heads and back, a Dense, and the tied attend: the kinds a bank serves."""

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(32, 12, name="embed")
        x = embed(tokens)  # (b, t, 12)
        x = nn.DenseGeneral((3, 4), name="heads")(x)  # (b, t, 3, 4)
        x = nn.DenseGeneral(12, axis=(-2, -1), name="merge_heads")(nn.relu(x))  # (b, t, 12)
        x = nn.Dense(12, name="dense")(x)
        return embed.attend(x)


def _tower():
    model, tokens, params, entries = _tower_once()
    return model, tokens, params, list(entries)


@functools.cache  # built once for the tests that use it (arrays are immutable; _tower hands out a fresh list)
def _tower_once():
    model = Tower()
    tokens = jax.random.randint(jax.random.key(4), (6, 5), 0, 32)
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    heads = {"heads/kernel": 1}  # DenseGeneral (12,) -> (3, 4)
    configs = [
        jaxlora.LoraConfig(rank=2, alpha=4.0, targets=(jaxlora.ALL_KERNELS, jaxlora.ALL_EMBEDDINGS), fan_in_ndim=heads),
        jaxlora.LoraConfig(rank=4, alpha=2.0, targets=(r"heads/kernel", r"dense/kernel"), fan_in_ndim=heads),
        jaxlora.LoraConfig(rank=1, alpha=3.0, targets=(r"embed/embedding", r"merge_heads/kernel")),
    ]
    entries = [_trained(params, c, 10 + i) for i, c in enumerate(configs)]
    return model, tokens, params, tuple(entries)


def _rowwise(model, params, entries, ids, *args):
    """Each row run alone through the model with its adapter merged (the base model for -1).

    One jitted model.apply serves every row (same shapes: compiled once), each adapter is merged once.
    """
    apply = jax.jit(model.apply)
    merged = {}
    rows = []
    for row, i in enumerate(ids):
        if i not in merged:
            merged[i] = params if i == -1 else jaxlora.merge(params, *entries[i])
        rows.append(apply({"params": merged[i]}, *(a[row : row + 1] for a in args))[0])
    return np.stack(rows)


def test_a_mixed_batch_equals_each_row_run_alone_with_its_adapter_merged():
    model, tokens, params, entries = _tower()
    bank = jaxlora.adapter_bank(entries, names=("all", "heads", "embed"))
    assert bank.a["heads/kernel"].shape == (3, 12, 4) and bank.b["heads/kernel"].shape == (3, 4, 3, 4)
    np.testing.assert_array_equal(bank.scales["dense/kernel"], [2.0, 0.5, 0.0])
    ids = bank.ids(["all", None, "embed", "heads", "all", jaxlora.BASE_MODEL])
    forward = jax.jit(lambda bank, ids, x: jaxlora.apply_bank(model, {"params": params}, bank, ids, x))
    got = forward(bank, ids, tokens)
    want = _rowwise(model, params, entries, [0, -1, 2, 1, 0, -1], tokens)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    base = jax.jit(model.apply)({"params": params}, tokens)
    np.testing.assert_allclose(got[np.array([1, 5])], base[np.array([1, 5])], atol=1e-6, rtol=0)
    # Op by op, a base row is bit for bit the base model's output (a compiled program may fuse the base
    # computation differently from another compiled program, by an ulp, as model.apply jitted vs eager does).
    eager = jaxlora.apply_bank(model, {"params": params}, bank, ids, tokens)
    np.testing.assert_array_equal(eager[np.array([1, 5])], model.apply({"params": params}, tokens)[np.array([1, 5])])


def test_base_rows_never_see_the_bank_even_when_it_holds_nan():
    model, tokens, params, entries = _tower()
    bank = jaxlora.adapter_bank(entries)
    poisoned = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), bank)
    ids = poisoned.ids([0, None, 1, None, 2, 0])
    got = jax.jit(lambda b, i, x: jaxlora.apply_bank(model, {"params": params}, b, i, x))(poisoned, ids, tokens)
    assert np.isnan(got[np.array([0, 2, 4, 5])]).all(axis=(1, 2)).all()
    base = jax.jit(model.apply)({"params": params}, tokens)
    np.testing.assert_allclose(got[np.array([1, 3])], base[np.array([1, 3])], atol=1e-6, rtol=0)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_a_mixed_batch_of_gpt2_stacked_or_not_equals_each_row_alone(scan_layers):
    from jaxlora.models.gpt2 import GPT2, GPT2Config

    config = GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2, scan_layers=scan_layers)
    model = GPT2(config)
    tokens = jax.random.randint(jax.random.key(5), (4, 6), 0, 40)
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]  # one compile (eagerly: one per op)
    blocks = "h" if scan_layers else r"h_\d+"
    stacked = {r"h/.*": 1} if scan_layers else {}
    configs = [
        jaxlora.LoraConfig(rank=2, alpha=4.0, targets=(rf"{blocks}/attn/c_attn/kernel",), stacked_axes=stacked),
        jaxlora.LoraConfig(rank=3, alpha=3.0, targets=(rf"{blocks}/.*/kernel",), stacked_axes=stacked),
    ]
    entries = [_trained(params, c, 20 + i) for i, c in enumerate(configs)]
    bank = jaxlora.adapter_bank(entries)
    ids = [1, 0, -1, 1]
    got = jax.jit(lambda b, i, x: jaxlora.apply_bank(model, {"params": params}, b, i, x))(bank, bank.ids(ids), tokens)
    np.testing.assert_allclose(got, _rowwise(model, params, entries, ids, tokens), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(got[2], jax.jit(model.apply)({"params": params}, tokens)[2], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_mixed_batch_over_a_quantized_base_equals_each_row_alone_over_the_decoded_base(kind):
    """Many adapters over one quantized base: every adapted kernel and the tied embedding stay quantized."""
    from jaxlora.models.gpt2 import GPT2, GPT2Config

    model = GPT2(GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    tokens = jax.random.randint(jax.random.key(6), (4, 6), 0, 40)
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    configs = [
        jaxlora.LoraConfig(rank=2, alpha=4.0, targets=(r"h_\d+/attn/c_attn/kernel", r"wte/embedding")),
        jaxlora.LoraConfig(rank=3, alpha=3.0, targets=(r"h_\d+/.*/kernel",)),
    ]
    entries = [_trained(params, c, 50 + i) for i, c in enumerate(configs)]
    bank = jaxlora.adapter_bank(entries)
    quantized = jaxlora.quantization.quantize(params, bank.plan, kind=kind, block_size=16, embeddings=True)
    assert jaxlora.quantization.is_quantized(quantized["wte"]["embedding"])
    decoded = jaxlora.quantization.dequantize_params(quantized)
    ids = [1, 0, -1, 1]
    forward = jax.jit(lambda b, i, x: jaxlora.apply_bank(model, {"params": quantized}, b, i, x))
    got = forward(bank, bank.ids(ids), tokens)
    np.testing.assert_allclose(got, _rowwise(model, decoded, entries, ids, tokens), atol=2e-5, rtol=1e-5)


def _row_loss(logits, targets):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1).sum()


def test_gradients_reach_each_slot_from_its_rows_only():
    model, tokens, params, entries = _tower()
    entries = entries[:2]
    bank = jaxlora.adapter_bank([*entries, entries[0]])  # slot 2 unused by the batch
    ids = [0, 1, -1, 0, 1, 1]
    targets = jnp.roll(tokens, 1, axis=1)

    def bank_loss(bank):
        logits = jaxlora.apply_bank(model, {"params": params}, bank, bank.ids(ids), tokens)
        return _row_loss(logits, targets)

    grads = jax.jit(jax.grad(bank_loss))(bank)
    for slot, (adapters, plan) in enumerate(entries):
        rows = np.array([i == slot for i in ids])

        def merged_loss(adapters, plan=plan, rows=rows):  # plain autodiff through W + s·A B
            logits = model.apply({"params": jaxlora.merge(params, adapters, plan)}, tokens[rows])
            return _row_loss(logits, targets[rows])

        want = jax.grad(merged_loss)(adapters)
        for path, leaf in plan.leaves.items():
            node = want
            for name in path.split("/"):
                node = node[name]
            r = leaf.rank
            np.testing.assert_allclose(grads.a[path][slot][..., :r], node["lora_a"], atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(grads.b[path][slot][:r], node["lora_b"], atol=1e-4, rtol=1e-4)
            assert not np.any(grads.a[path][slot][..., r:]) and not np.any(grads.b[path][slot][r:])  # padding
        for path in set(bank.plan.leaves) - set(plan.leaves):  # paths this slot does not adapt: A = B = 0
            assert not np.any(grads.a[path][slot]) and not np.any(grads.b[path][slot])
    for path in bank.plan.leaves:  # the unused slot
        assert not np.any(grads.a[path][2]) and not np.any(grads.b[path][2])


def test_hot_swapping_a_slot_or_switching_adapters_never_recompiles():
    model, tokens, params, entries = _tower()
    bank = jaxlora.adapter_bank(entries, names=("all", "heads", "embed"))
    traces = []

    @jax.jit
    def forward(bank, ids, x):
        traces.append(1)
        return jaxlora.apply_bank(model, {"params": params}, bank, ids, x)

    forward(bank, bank.ids(["all"] * 6), tokens)
    forward(bank, bank.ids(["heads", None, "embed", "all", "all", "heads"]), tokens)  # switching adapters
    # a smaller rank, another alpha and fewer targets in slot "all"
    config = jaxlora.LoraConfig(rank=1, alpha=7.0, targets=(r"dense/kernel", r"embed/embedding"))
    small = _trained(params, config, 30)
    swapped = bank.replace("all", *small)
    got = forward(swapped, swapped.ids(["all", "heads", None, "all", "embed", "all"]), tokens)
    assert len(traces) == 1 and forward._cache_size() == 1
    want = _rowwise(model, params, [small, entries[1], entries[2]], [0, 1, -1, 0, 2, 0], tokens)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(bank.scales["dense/kernel"][0], 2.0)  # the old bank is unchanged


def test_one_step_trains_several_adapters_and_leaves_the_rest_bit_identical():
    import optax

    model, tokens, params, entries = _tower()
    bank = jaxlora.adapter_bank(entries)
    ids = bank.ids([0, 1, 0, 1, None, 0])  # slot 2 unused
    targets = jnp.roll(tokens, 1, axis=1)
    opt = optax.adam(1e-2)

    @jax.jit
    def step(bank, state, params):
        loss, grads = jax.value_and_grad(
            lambda b: _row_loss(jaxlora.apply_bank(model, {"params": params}, b, ids, tokens), targets)
        )(bank)
        updates, state = opt.update(grads, state, bank)
        return optax.apply_updates(bank, updates), state, loss

    frozen = jax.tree.map(np.asarray, params)
    new, _, loss = step(bank, opt.init(bank), params)
    _, _, loss2 = step(new, opt.init(new), params)
    assert float(loss2) < float(loss)
    jax.tree.map(np.testing.assert_array_equal, params, frozen)
    for path in bank.plan.leaves:
        np.testing.assert_array_equal(new.a[path][2], bank.a[path][2])
        np.testing.assert_array_equal(new.b[path][2], bank.b[path][2])
        np.testing.assert_array_equal(new.scales[path], bank.scales[path])  # constants: no gradient
    assert any(not np.array_equal(new.b[p][0], bank.b[p][0]) for p in bank.plan.leaves)
    assert any(not np.array_equal(new.b[p][1], bank.b[p][1]) for p in bank.plan.leaves)


def test_bank_bad_input_is_refused_with_the_fix():
    model, tokens, params, entries = _tower()
    bank = jaxlora.adapter_bank(entries[1:])  # heads, dense, embed, merge_heads
    apply = lambda ids: jaxlora.apply_bank(model, {"params": params}, bank, jnp.asarray(ids), tokens)
    with pytest.raises(IndexError, match=r"adapter index 2 is out of range for a bank of 2 slots.*BASE_MODEL"):
        apply([0, 1, 2, 0, 0, 0])
    with pytest.raises(IndexError, match="adapter index -2"):
        apply([0, 1, -2, 0, 0, 0])
    with pytest.raises(KeyError, match="no slot named 'x'"):
        bank.ids(["x"])
    with pytest.raises(ValueError, match="1-D integer array"):
        apply([[0, 1, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="leading axis is not the batch of 3"):
        apply([0, 1, 0])
    # inside jit an index out of range cannot raise: its row is NaN, the others are served
    jitted = jax.jit(lambda ids: jaxlora.apply_bank(model, {"params": params}, bank, ids, tokens))
    out = jitted(jnp.asarray([0, 5, -1, 1, 0, 0]))
    assert np.isnan(out[1]).all() and np.isfinite(out[np.array([0, 2, 3])]).all()
    # targets that do not fit the bank
    with pytest.raises(ValueError, match=r"adapt '(dense|heads)/kernel', which the bank has no slot for"):
        jaxlora.adapter_bank(entries[2:]).replace(0, *entries[1])
    bigger = _trained(params, jaxlora.LoraConfig(rank=5, targets=(r"dense/kernel",)), 40)
    with pytest.raises(ValueError, match=r"rank 5 .* bank holds rank <= 4"):
        bank.replace(0, *bigger)
    # adapters trained on another base
    other_params = {**params, "dense": {**params["dense"], "kernel": jnp.zeros((12, 13))}}
    other = _trained(other_params, jaxlora.LoraConfig(rank=1, targets=(r"dense/kernel",)), 41)
    with pytest.raises(ValueError, match=r"different base models.*'dense/kernel'"):
        jaxlora.adapter_bank([entries[0], other])
    with pytest.raises(ValueError, match=r"different base models"):
        bank.replace(1, *other)
    # a layer the bank does not serve (a Conv) is refused, never merged
    conv = nn.Conv(4, kernel_size=(3,))
    x = jnp.ones((2, 5, 3))
    conv_params = conv.init(jax.random.key(0), x)["params"]
    conv_bank = jaxlora.adapter_bank([_trained(conv_params, jaxlora.LoraConfig(rank=1), 42)])
    with pytest.raises(ValueError, match=r"'kernel' cannot be served per example: it is a convolution.s kernel"):
        jaxlora.apply_bank(conv, {"params": conv_params}, conv_bank, jnp.asarray([0, -1]), x)
    with pytest.raises(ValueError, match="this Plan was built for other params"):
        jaxlora.apply_bank(model, {"params": other_params}, bank, bank.ids([0] * 6), tokens)


# ---------------------------------------------------------------------------------------------------------------
# Named adapters


def test_named_adapters_add_remove_select_and_checkpoint_each_on_its_own(tmp_path):
    model, tokens, params, entries = _tower()
    named = jaxlora.NamedAdapters({"all": entries[0]}).add("heads", *entries[1]).add("embed", *entries[2])
    assert list(named) == ["all", "heads", "embed"] and len(named.remove("heads")) == 2 and len(named) == 3
    assert named.select("heads")[1] is entries[1][1] and named["embed"][1] is entries[2][1]
    with pytest.raises(ValueError, match="'heads' exists already"):
        named.add("heads", *entries[0])
    with pytest.raises(KeyError, match=r"no adapter named 'x'; the adapters are \['all', 'heads', 'embed'\]"):
        named.select("x")
    with pytest.raises(AttributeError, match="immutable"):
        named._entries = {}
    other_params = {**params, "dense": {**params["dense"], "kernel": jnp.zeros((12, 13))}}
    with pytest.raises(ValueError, match="different base models"):
        named.add("other", *_trained(other_params, jaxlora.LoraConfig(rank=1, targets=(r"dense/kernel",)), 1))
    # each entry saves and loads with the single-adapter checkpoint functions, its own plan included
    for name, (adapters, plan) in named.items():
        jaxlora.checkpoint.save_adapter(tmp_path / name, params, adapters, plan)
    loaded = jaxlora.NamedAdapters(
        {name: jaxlora.checkpoint.load_adapter(tmp_path / name, params)[1:] for name in named}
    )
    for name in named:
        assert loaded[name][1] == named[name][1]
        jax.tree.map(np.testing.assert_array_equal, loaded[name][0], named[name][0])
    # the mapping feeds a bank (slot names = adapter names) and the combinations
    bank = jaxlora.adapter_bank(loaded)
    assert bank.names == ("all", "heads", "embed")
    got = jaxlora.apply_bank(
        model, {"params": params}, bank, bank.ids(["embed", "all", None, "heads", "all", "embed"]), tokens
    )
    np.testing.assert_allclose(got, _rowwise(model, params, entries, [2, 0, -1, 1, 0, 2], tokens), atol=2e-5, rtol=1e-5)
    adapters, plan = jaxlora.weighted_cat(named.entries(["all", "embed"]), [0.5, 0.5], targets="union")
    assert set(plan.leaves) == set(entries[0][1].leaves)


# The bank snippet that the README held is now a cell of docs/guides/multi_adapter.md, run by every docs build.
