"""A quantized frozen base: the NF4 table and block layout against QLoRA's published values, the factored layer
against plain-jnp references on the dequantized kernel, merging, and the compiled memory of a training step."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from models import MLP

import jaxlora
from jaxlora import quantization as jq

qwix = pytest.importorskip("qwix")

# The NF4 data type as published with QLoRA (Dettmers et al. 2023, appendix E; bitsandbytes' NF4 code book).
PUBLISHED_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def _codes_to_values(kernel) -> np.ndarray:
    """The code book as the quantized array decodes it: codes 0..15 with a unit scale."""
    codes = jnp.arange(16, dtype=jnp.uint4).reshape(16, 1)
    q = qwix.QArray(qvalue=codes, scale=jnp.ones((1, 1), jnp.float32), qtype=kernel.qtype)
    return np.asarray(qwix.dequantize(q)).ravel()


def test_nf4_code_book_is_the_published_one():
    w = jax.random.normal(jax.random.key(0), (64, 4))
    kernel = jq.quantize_array(w, "nf4")
    np.testing.assert_allclose(_codes_to_values(kernel), PUBLISHED_NF4, rtol=0, atol=1e-7)


def test_nf4_code_book_is_normal_quantiles_as_qlora_builds_it():
    """QLoRA's create_normal_map: 8 positive and 7 negative N(0,1) quantiles (offset 0.9677), zero, normalised."""
    stats = pytest.importorskip("scipy.stats")
    offset = 0.9677083
    positive = stats.norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    negative = -stats.norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([positive, [0.0], negative]))
    np.testing.assert_allclose(values / values.max(), PUBLISHED_NF4, atol=1e-6)


def _bitsandbytes_nf4(weight: np.ndarray, block: int = 64) -> np.ndarray:
    """bitsandbytes' NF4 round trip in numpy: torch's (out, in) weight flattened, blocks of 64, absmax, nearest code."""
    torch_layout = weight.T.reshape(-1, block)
    absmax = np.abs(torch_layout).max(axis=1, keepdims=True)
    table = np.asarray(PUBLISHED_NF4)
    codes = np.abs(torch_layout[..., None] / absmax[..., None] - table).argmin(axis=-1)
    return (table[codes] * absmax).reshape(weight.shape[1], weight.shape[0]).T


@pytest.mark.parametrize("block", [64, 32])
def test_nf4_blocks_match_the_bitsandbytes_layout(block):
    w = np.asarray(jax.random.normal(jax.random.key(1), (256, 12)) * jnp.linspace(0.1, 3.0, 12))
    got = np.asarray(jq.dequantize(jq.quantize_array(jnp.asarray(w), "nf4", block)))
    np.testing.assert_allclose(got, _bitsandbytes_nf4(w, block), rtol=1e-6, atol=1e-7)
    assert 0.05 < jq.relative_error(w, jq.quantize_array(jnp.asarray(w), "nf4", block)) < 0.15


def test_int8_is_per_output_channel():
    w = jax.random.normal(jax.random.key(2), (96, 10)) * jnp.logspace(-3, 1, 10)
    kernel = jq.quantize_array(w, "int8")
    assert kernel.qvalue.dtype == jnp.int8 and kernel.scale.shape == (1, 10)
    # Each column's error is within half a step of its own absmax / 127: a per-tensor scale fails this.
    step = jnp.abs(w).max(axis=0) / 127.0
    assert bool((jnp.abs(jq.dequantize(kernel) - w) <= 0.5 * step * 1.0001).all())


def test_bytes_are_at_most_0_3_of_float32():
    w = jnp.zeros((768, 3072))
    assert jq.nbytes(jq.quantize_array(w, "nf4")) <= 0.3 * 4 * w.size
    assert jq.nbytes(jq.quantize_array(w, "int8")) <= 0.3 * 4 * w.size


# ----------------------------------------------------------------------------------------------------------------
# LoRA on a quantized base


def _mlp(kind="nf4", rank=4):
    model = MLP((128, 64, 10))
    x = jax.random.normal(jax.random.key(0), (6, 64))
    params = model.init(jax.random.key(1), x)["params"]
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=rank, alpha=8.0, targets=(r"linear[12]/kernel",)))
    return model, x, params, plan, jq.quantize(params, plan, kind=kind)


def _trained(adapters, seed=3):
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [x + 0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


def _reference(model, quantized, adapters, plan, x):
    """Plain jnp: each quantized kernel dequantized, W + s·A B formed, the model applied."""
    dense = jq.dequantize_params(quantized)
    for path, leaf in plan.leaves.items():
        layer = path.split("/")[0]
        pair = adapters[layer]["kernel"]
        dense[layer]["kernel"] = dense[layer]["kernel"] + leaf.scale * pair["lora_a"] @ pair["lora_b"]
    return model.apply({"params": dense}, x)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_forward_and_gradients_match_the_plain_reference(kind):
    model, x, params, plan, quantized = _mlp(kind)
    assert jq.is_quantized(quantized["linear1"]["kernel"]) and not jq.is_quantized(quantized["linear3"]["kernel"])
    plan.check_params(quantized)  # the plan built from the float tree fits the quantized one
    _, adapters = jaxlora.init(jax.random.key(2), params, plan)
    # Everything below runs under jit: one compile per function (eagerly, each op compiles on its own, which is
    # most of this test's time), and the same values.
    np.testing.assert_allclose(  # B = 0: the (dequantized) base model
        jax.jit(lambda q, a: jaxlora.apply(model, {"params": q}, a, plan, x))(quantized, adapters),
        jax.jit(lambda q: model.apply({"params": jq.dequantize_params(q)}, x))(quantized),
        rtol=1e-5,
        atol=1e-5,
    )
    adapters = _trained(adapters)
    forward = jax.jit(jaxlora.apply_fn(model, plan, strict=True))
    reference = jax.jit(lambda q, a, x: _reference(model, q, a, plan, x))
    want = reference(quantized, adapters, x)
    np.testing.assert_allclose(forward({"params": quantized}, adapters, x), want, rtol=1e-5, atol=1e-5)

    def loss(f):
        return lambda adapters, x: jnp.sum(jnp.sin(f(adapters, x)))

    got = jax.jit(jax.grad(loss(lambda a, x: forward({"params": quantized}, a, x)), (0, 1)))(adapters, x)
    ref = jax.jit(jax.grad(loss(lambda a, x: reference(quantized, a, x)), (0, 1)))(adapters, x)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5), got, ref)


def test_merge_into_a_quantized_base_gives_floats_and_requantize_reports_the_error():
    model, x, params, plan, quantized = _mlp()
    _, adapters = jaxlora.init(jax.random.key(2), params, plan)
    adapters = _trained(adapters)
    merged = jaxlora.merge(quantized, adapters, plan)
    assert not any(jq.is_quantized(leaf) for leaf in jax.tree.leaves(merged, is_leaf=jq.is_quantized))
    np.testing.assert_allclose(
        model.apply({"params": merged}, x), _reference(model, quantized, adapters, plan, x), rtol=1e-5, atol=1e-5
    )
    again, errors = jq.requantize(merged, like=quantized)
    assert jq.is_quantized(again["linear1"]["kernel"]) and set(errors) == {"linear1/kernel", "linear2/kernel"}
    assert all(0.01 < e < 0.2 for e in errors.values())
    table = jq.report(params, quantized)
    assert "linear1/kernel" in table and "nf4/64" in table and "0.1" in table


def test_training_step_has_no_gradient_for_the_quantized_kernel():
    model, x, params, plan, quantized = _mlp()
    _, adapters = jaxlora.init(jax.random.key(2), params, plan)
    trainable, frozen = jaxlora.partition(quantized, adapters, plan)
    tx = jaxlora.optimizer(optax.adam(1e-2), plan)

    @jax.jit
    def step(trainable, opt_state):
        def loss_fn(t):
            p, a = jaxlora.combine(t, frozen)
            return jnp.mean(jaxlora.apply(model, {"params": p}, a, plan, x) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    state = tx.init(trainable)
    losses = []
    for _ in range(5):
        trainable, state, loss = step(trainable, state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_block_size_that_does_not_divide_is_refused_with_the_fix():
    params = {"dense": {"kernel": jnp.ones((96, 8))}}
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
    message = "cannot quantize 'dense/kernel' of shape (96, 8) to NF4 in blocks of 64"
    with pytest.raises(ValueError, match=re.escape(message) + ".*pass block_size=32"):
        jq.quantize(params, plan)
    assert jq.is_quantized(jq.quantize(params, plan, block_size=32)["dense"]["kernel"])


def test_dora_with_a_quantized_base_is_refused():
    model, x, params, _, _ = _mlp()
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, targets=(r"linear1/kernel",), use_dora=True))
    quantized = jq.quantize(params, plan)
    _, adapters = jaxlora.init(jax.random.key(2), params, plan)
    with pytest.raises(ValueError, match=r"cannot merge the DoRA adapter of 'linear1/kernel' into a quantized"):
        jaxlora.merge(quantized, adapters, plan)
    with pytest.raises(ValueError, match=r"DoRA on a quantized kernel \('linear1/kernel'\) is not supported yet"):
        jaxlora.apply(model, {"params": quantized}, adapters, plan, x)


# ----------------------------------------------------------------------------------------------------------------
# The memory proof: compiled memory of a GPT-2-shaped LoRA step, float32 base vs NF4 base


def _step_memory(params, plan, model, tokens, frozen_dense):
    """(compiled peak bytes, base bytes) of one jitted LoRA r16 Adam step over `params`."""
    _, adapters = jaxlora.init(jax.random.key(1), params, plan)
    trainable, frozen = jaxlora.partition(params, adapters, plan)
    tx = jaxlora.optimizer(optax.adam(1e-3), plan)

    def step(trainable, frozen, opt_state, tokens):
        def loss_fn(t):
            p, a = jaxlora.combine(t, frozen)
            logits = jaxlora.apply(model, {"params": p}, a, plan, tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    compiled = jax.jit(step).lower(trainable, frozen, tx.init(trainable), tokens).compile()
    mem = compiled.memory_analysis()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    base = sum(jq.nbytes(leaf) for _, leaf in jaxlora._src.paths.leaves_with_paths(frozen))
    return peak, base


@pytest.mark.parametrize("embeddings", [False, True])
def test_quantized_step_memory_falls_by_the_bytes_quantization_saves(embeddings):
    from jaxlora.models import gpt2

    # GPT-2 small's layout at a quarter of its width and a third of its depth: the kernels dominate the base, as in
    # GPT-2 small. One layer's dequantized kernel is a transient the saving must cover. With `embeddings`, the
    # tables are quantized too and the vocabulary is large enough for the tied head's table to matter.
    vocab = 2048 if embeddings else 128
    cfg = gpt2.GPT2Config(n_layer=4, n_head=4, n_embd=256, vocab_size=vocab, n_positions=32)
    model = gpt2.GPT2(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 17), 0, cfg.vocab_size)
    params = jax.jit(model.init)(jax.random.key(2), tokens[:, :-1])["params"]  # jitted: one compile, not one per op
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=16, alpha=32.0))
    quantized = jax.jit(lambda p: jq.quantize(p, plan, kind="nf4", embeddings=embeddings))(params)
    chosen = {path for path, leaf in jaxlora._src.paths.leaves_with_paths(quantized) if jq.is_quantized(leaf)}
    assert ({"wte/embedding", "wpe/embedding"} <= chosen) == embeddings and set(plan.leaves) <= chosen
    float_kernels = sum(4 * leaf.size for path, leaf in jaxlora._src.paths.leaves_with_paths(params) if path in chosen)
    nf4_kernels = sum(
        jq.nbytes(leaf) for path, leaf in jaxlora._src.paths.leaves_with_paths(quantized) if path in chosen
    )
    assert nf4_kernels <= 0.3 * float_kernels

    float_peak, float_base = _step_memory(params, plan, model, tokens, False)
    nf4_peak, nf4_base = _step_memory(quantized, plan, model, tokens, False)
    saved = float_base - nf4_base
    assert saved == float_kernels - nf4_kernels
    print(f"float32 base: peak {float_peak:,} B; nf4 base: peak {nf4_peak:,} B; base bytes saved {saved:,} B")
    assert float_peak - nf4_peak >= 0.75 * saved, (float_peak, nf4_peak, saved)


# ----------------------------------------------------------------------------------------------------------------
# Quantized embedding tables (GPT-2's wte, tied to the LM head, and wpe)


def _tied_gpt2(kind):
    from jaxlora.models import gpt2

    cfg = gpt2.GPT2Config(n_layer=2, n_head=2, n_embd=128, vocab_size=96, n_positions=16)
    model = gpt2.GPT2(cfg)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, cfg.vocab_size)
    params = jax.jit(model.init)(jax.random.key(1), tokens)["params"]  # jitted: one compile, not one per op
    config = jaxlora.LoraConfig(rank=4, alpha=8.0, targets=(r"wte/embedding", r"h_\d+/attn/c_attn/kernel"))
    plan = jaxlora.plan(params, config)
    return model, tokens, params, plan, jax.jit(lambda p: jq.quantize(p, plan, kind=kind, embeddings=True))(params)


def _plain_reference(model, quantized, adapters, plan, tokens):
    """Plain jnp: every quantized leaf dequantized, W + s·A B formed for each adapted leaf, the model applied."""
    dense = jq.dequantize_params(quantized)
    for path, leaf in plan.leaves.items():
        *parents, name = path.split("/")
        node, pair = dense, adapters
        for key in parents:
            node, pair = node[key], pair[key]
        node[name] = node[name] + leaf.scale * pair[name]["lora_a"] @ pair[name]["lora_b"]
    return model.apply({"params": dense}, tokens)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_embeddings_serve_the_lookup_and_the_tied_head(kind):
    model, tokens, params, plan, quantized = _tied_gpt2(kind)
    for name, rows in (("wte", 96), ("wpe", 16)):  # quantized in rows: one scale per row (per block of 64 in NF4)
        table = quantized[name]["embedding"]
        assert jq.is_quantized(table) and table.scale.shape == (rows, 2 if kind == "nf4" else 1)
    assert not jq.is_quantized(quantized["ln_f"]["scale"]) and not jq.is_quantized(quantized["h_0"]["ln_1"]["bias"])
    _, adapters = jaxlora.init(jax.random.key(2), params, plan)
    adapters = _trained(adapters)
    # Under jit: one compile per function (eagerly, each op compiles on its own, which is most of this test's time).
    forward = jax.jit(jaxlora.apply_fn(model, plan, strict=True))
    reference = jax.jit(lambda q, a: _plain_reference(model, q, a, plan, tokens))
    want = reference(quantized, adapters)
    np.testing.assert_allclose(forward({"params": quantized}, adapters, tokens), want, rtol=1e-5, atol=1e-5)

    def loss(f):
        return lambda adapters: jnp.sum(jnp.sin(f(adapters)))

    got = jax.jit(jax.grad(loss(lambda a: forward({"params": quantized}, a, tokens))))(adapters)
    ref = jax.jit(jax.grad(loss(lambda a: reference(quantized, a))))(adapters)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4 * np.abs(r).max()), got, ref)
    # The frozen quantized table gets no gradient, and a frozen (unadapted) quantized wpe serves too.
    assert "wpe" not in adapters and "wpe" not in plan.leaves
    # The plan's view of each quantized leaf, with W's quantization error.
    rows = {line.split()[0]: line for line in jq.report(params, quantized, plan).splitlines()[2:] if line.strip()}
    error = f"{jq.relative_error(params['wte']['embedding'], quantized['wte']['embedding']):.4f}"
    assert "r4 A(96, 4) B(4, 128)" in rows["wte/embedding"] and rows["wte/embedding"].endswith(error)
    assert "frozen" in rows["wpe/embedding"] and "r4" in rows["h_0/attn/c_attn/kernel"]


def test_a_lookup_decodes_only_the_rows_it_gathers():
    table = jax.random.normal(jax.random.key(0), (4096, 256))
    q = jq.quantize_array(table, "nf4", axis=1)
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 4096)
    np.testing.assert_array_equal(jq.embedding_rows(q, ids, jnp.float32), jq.dequantize(q)[ids])
    assert jq.relative_error(table, q) < 0.15
    # No value of the traced lookup is as large as the table (XLA may also sink a gather through a whole-table
    # decode, but that is its choice, not a promise: the jaxpr itself must decode only the gathered rows).
    jaxpr = jax.make_jaxpr(lambda q, ids: jq.embedding_rows(q, ids, jnp.float32))(q, ids)
    sizes = [int(np.prod(v.aval.shape)) for eqn in jaxpr.eqns for v in eqn.outvars]
    assert max(sizes) < 0.01 * table.size


def test_embedding_quantization_is_exact_in_slices_and_refuses_a_block_that_does_not_divide():
    from jaxlora._src import quantization as implementation

    table = jax.random.normal(jax.random.key(3), (300, 128))
    whole = jq.quantize_array(table, "nf4", axis=1)
    saved = implementation._SLICE_ELEMENTS
    implementation._SLICE_ELEMENTS = 128 * 7  # 43 slices of 7 rows
    try:
        sliced = jq.quantize_array(table, "nf4", axis=1)
    finally:
        implementation._SLICE_ELEMENTS = saved
    np.testing.assert_array_equal(sliced.qvalue, whole.qvalue)
    np.testing.assert_array_equal(sliced.scale, whole.scale)
    params = {"embed": {"embedding": jnp.ones((10, 96))}, "dense": {"kernel": jnp.ones((64, 4))}}
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, targets=(r"dense/kernel",)))
    message = "cannot quantize 'embed/embedding' of shape (10, 96) to NF4 in blocks of 64: the blocks run along its 96"
    with pytest.raises(ValueError, match=re.escape(message) + ".*pass block_size=32"):
        jq.quantize(params, plan, embeddings=True)
    assert not jq.is_quantized(jq.quantize(params, plan)["embed"]["embedding"])  # embeddings=False by default


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_stacked_kernel_is_quantized_layer_by_layer(kind):
    """A kernel whose plan stacks layers (nn.scan's layout) gets each layer's codes and scales, stacked; its report
    row and requantize read the format of one layer."""
    kernel = jax.random.normal(jax.random.key(4), (3, 128, 16))
    params = {"layers": {"dense": {"kernel": kernel}}}
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, stacked_axes={r"layers/.*": 1}))
    stacked = jq.quantize(params, plan, kind=kind)["layers"]["dense"]["kernel"]
    for i in range(3):
        layer = jq.quantize_array(kernel[i], kind)
        np.testing.assert_array_equal(stacked.qvalue[i], layer.qvalue)
        np.testing.assert_array_equal(stacked.scale[i], layer.scale)
    assert (kind + "/64" if kind == "nf4" else "int8/channel") in jq.report(
        params, {"layers": {"dense": {"kernel": stacked}}}
    )
    again, _ = jq.requantize(jq.dequantize_params({"k": stacked}), like={"k": stacked})
    assert again["k"].shape == (3, 128, 16)
