"""Gradients against an independent reference: plain jnp (`x @ W + s * (x @ A) @ B`) differentiated by jax.grad.

Every hand-written backward pass (`lora_linear`'s custom VJP, merge's custom VJP, each built-in layer kind) is
compared with autodiff of a formula written out here in plain jnp, never with another jaxlora path. The adapters
have B != 0 and the scale s = alpha / rank != 1, so a dropped or mis-scaled cotangent shows.

Tolerances: float32 rtol 1e-5 (atol 1e-5 of the largest reference value); with a bfloat16 base (adapters stay
float32) the reference runs in float32 on the same bf16-rounded values, and results agree to 3e-2 of the largest
reference value per array (bf16 has 8 bits of mantissa; the layers round x·W and its cotangents to bf16).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxlora
from jaxlora._src.linear import lora_linear

RANK, ALPHA = 3, 5.0
SCALE = ALPHA / RANK  # 1.67: a lost or doubled scale shows
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}


def _random(key, shape, dtype=jnp.float32, scale=0.5):
    return (scale * jax.random.normal(key, shape)).astype(dtype)


def _assert_close(got, want, dtype, what):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    size = float(np.abs(want).max())
    assert size > 1e-3, f"{what}: the reference gradient is ~0, the comparison would prove nothing"
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(got, want, rtol=tol if dtype == jnp.float32 else 0, atol=tol * size, err_msg=what)


def _assert_trees_close(got, want, dtype, what):
    flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
    assert flat_got.keys() == flat_want.keys(), what
    for path in flat_want:
        _assert_close(flat_got[path], flat_want[path], dtype, f"{what}{jax.tree_util.keystr(path)}")


def _loss(y):
    """A loss whose cotangent varies per element (a sum alone would give a constant cotangent)."""
    y = jnp.asarray(y, jnp.float32)
    return jnp.sum(jnp.sin(y) * jnp.linspace(0.5, 1.5, y.size).reshape(y.shape))


# ----------------------------------------------------------------------------------------------------------------
# lora_linear and merge, directly


def _dense_inputs(dtype):
    keys = jax.random.split(jax.random.key(0), 6)
    x = _random(keys[0], (4, 5, 10), dtype)
    w = _random(keys[1], (10, 6), dtype)
    bias = _random(keys[2], (6,), dtype)
    a = _random(keys[3], (10, RANK))
    b = _random(keys[4], (RANK, 6))
    return x, w, bias, a, b


def _reference_dense(x, w, bias, a, b, scale=SCALE):
    f32 = lambda t: jnp.asarray(t, jnp.float32)
    return f32(x) @ f32(w) + f32(bias) + scale * (f32(x) @ a) @ b


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lora_linear_gradients_equal_autodiff_of_plain_jnp(dtype):
    x, w, bias, a, b = _dense_inputs(dtype)
    ours = jax.grad(lambda *p: _loss(lora_linear(p[0], p[0], *p[1:], SCALE)), argnums=(0, 1, 2, 3, 4))
    ref = jax.grad(lambda *p: _loss(_reference_dense(*p)), argnums=(0, 1, 2, 3, 4))
    for name, got, want in zip(
        ("dx", "dW", "dbias", "dA", "dB"), ours(x, w, bias, a, b), ref(x, w, bias, a, b), strict=True
    ):
        _assert_close(got, want, dtype, name)
    # Only the adapters trained (W and bias frozen): the cotangents asked for must still be right.
    ours_ab = jax.grad(lambda a, b: _loss(lora_linear(x, x, w, bias, a, b, SCALE)), argnums=(0, 1))(a, b)
    ref_ab = jax.grad(lambda a, b: _loss(_reference_dense(x, w, bias, a, b)), argnums=(0, 1))(a, b)
    for name, got, want in zip(("dA (frozen W)", "dB (frozen W)"), ours_ab, ref_ab, strict=True):
        _assert_close(got, want, dtype, name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_merge_gradients_equal_autodiff_of_plain_jnp(dtype):
    x, w, _, a, b = _dense_inputs(dtype)
    plan = jaxlora.plan({"dense": {"kernel": w}}, jaxlora.LoraConfig(rank=RANK, alpha=ALPHA))

    def ours(x, w, a, b):
        merged = jaxlora.merge({"dense": {"kernel": w}}, {"dense": {"kernel": {"lora_a": a, "lora_b": b}}}, plan)
        return _loss(jnp.asarray(x, jnp.float32) @ jnp.asarray(merged["dense"]["kernel"], jnp.float32))

    def ref(x, w, a, b):
        return _loss(jnp.asarray(x, jnp.float32) @ (jnp.asarray(w, jnp.float32) + SCALE * a @ b))

    grads = jax.grad(ours, argnums=(0, 1, 2, 3))(x, w, a, b)
    wants = jax.grad(ref, argnums=(0, 1, 2, 3))(x, w, a, b)
    for name, got, want in zip(("dx", "dW", "dA", "dB"), grads, wants, strict=True):
        _assert_close(got, want, dtype, name)


# ----------------------------------------------------------------------------------------------------------------
# Every built-in layer kind, through jaxlora.apply, against the same layer written in plain jnp


def _conv(x, kernel):
    """A 1-D 'SAME' convolution (b, t, c) * (window, c, f), as nn.Conv computes it."""
    return lax.conv_general_dilated(x, kernel, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))


class _Layer(nn.Module):
    kind: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = dict(dtype=self.dtype, param_dtype=self.dtype)
        if self.kind == "dense":
            return nn.Dense(6, name="layer", **d)(x)
        if self.kind == "dense_general":
            return nn.DenseGeneral((3, 4), axis=(-2, -1), name="layer", **d)(x)
        if self.kind == "einsum":
            return nn.Einsum((2, 5, 6), "btij,ijo->bto", name="layer", **d)(x)
        if self.kind == "conv":
            return nn.Conv(6, kernel_size=(3,), padding="SAME", name="layer", **d)(x)
        embed = nn.Embed(11, 6, name="layer", **d)
        if self.kind == "embed_lookup":
            return embed(x)
        return embed.attend(x)  # "embed_attend"


# kind -> (input shape or token range, fan_in_ndim, plain-jnp forward(x, params, a, b))
def _ref_dense(x, p, a, b):
    return x @ p["kernel"] + p["bias"] + SCALE * (x @ a) @ b


def _ref_dense_general(x, p, a, b):
    xa = jnp.einsum("btij,ijr->btr", x, a)
    return jnp.einsum("btij,ijhk->bthk", x, p["kernel"]) + p["bias"] + SCALE * jnp.einsum("btr,rhk->bthk", xa, b)


def _ref_einsum(x, p, a, b):
    xa = jnp.einsum("btij,ijr->btr", x, a)
    return jnp.einsum("btij,ijo->bto", x, p["kernel"]) + p["bias"] + SCALE * xa @ b


def _ref_conv(x, p, a, b):
    return _conv(x, p["kernel"]) + p["bias"] + SCALE * _conv(x, a) @ b


def _ref_embed_lookup(tokens, p, a, b):
    return p["embedding"][tokens] + SCALE * a[tokens] @ b


def _ref_embed_attend(q, p, a, b):
    return q @ p["embedding"].T + SCALE * (q @ b.T) @ a.T


KINDS = {
    "dense": ((2, 7, 10), 1, _ref_dense),
    "dense_general": ((2, 7, 2, 5), 2, _ref_dense_general),
    "einsum": ((2, 7, 2, 5), 2, _ref_einsum),
    "conv": ((2, 7, 5), 2, _ref_conv),
    "embed_lookup": (None, 1, _ref_embed_lookup),
    "embed_attend": ((2, 7, 6), 1, _ref_embed_attend),
}


def _kind_setup(kind: str, dtype):
    shape, fan_in_ndim, reference = KINDS[kind]
    keys = jax.random.split(jax.random.key(7), 5)
    x = jax.random.randint(keys[0], (2, 7), 0, 11) if shape is None else _random(keys[0], shape, dtype)
    model = _Layer(kind, dtype)
    params = model.init(keys[1], x)["params"]
    params = jax.tree.map(lambda p: _random(keys[2], p.shape, dtype) + p, params)  # a non-zero bias too
    param = "embedding" if kind.startswith("embed") else "kernel"
    target = f"layer/{param}"
    config = jaxlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=(target,), fan_in_ndim={target: fan_in_ndim})
    plan = jaxlora.plan(params, config)
    _, adapters = jaxlora.init(keys[3], params, plan)
    pair = adapters["layer"][param]
    pair["lora_b"] = _random(keys[4], pair["lora_b"].shape)  # B != 0
    return model, x, params, adapters, plan, reference


def _reference_loss(reference, x, params, adapters, param):
    f32 = lambda t: jnp.asarray(t, jnp.float32)
    pair = adapters["layer"][param]
    x = x if jnp.issubdtype(x.dtype, jnp.integer) else f32(x)
    return _loss(reference(x, jax.tree.map(f32, params["layer"]), pair["lora_a"], pair["lora_b"]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_layer_kind_has_the_gradients_of_plain_jnp(kind, dtype):
    model, x, params, adapters, plan, reference = _kind_setup(kind, dtype)
    param = "embedding" if kind.startswith("embed") else "kernel"
    forward = jaxlora.apply_fn(model, plan, strict=True)  # strict: served factored by the kind, never merged

    def ours(x, params, adapters):
        return _loss(forward({"params": params}, adapters, x))

    integer_input = jnp.issubdtype(x.dtype, jnp.integer)
    argnums = (1, 2) if integer_input else (0, 1, 2)
    # jitted: one compile for each side instead of one per op
    got = jax.jit(jax.grad(ours, argnums=argnums))(x, params, adapters)
    reference_loss = lambda x, p, a: _reference_loss(reference, x, p, a, param)
    want = jax.jit(jax.grad(reference_loss, argnums=argnums))(x, params, adapters)
    if not integer_input:
        _assert_close(got[0], want[0], dtype, f"{kind} dx")
    _assert_trees_close(got[-2], want[-2], dtype, f"{kind} dparams")  # dW (and dbias) when they train
    _assert_trees_close(got[-1], want[-1], dtype, f"{kind} dadapters")  # dA and dB
    # The forward pass too, so a gradient test cannot pass on a wrong model.
    out = forward({"params": params}, adapters, x)
    f32 = lambda t: jnp.asarray(t, jnp.float32)
    pair = adapters["layer"][param]
    x_ref = x if integer_input else f32(x)
    ref_out = reference(x_ref, jax.tree.map(f32, params["layer"]), pair["lora_a"], pair["lora_b"])
    _assert_close(out, ref_out, dtype, f"{kind} forward")
