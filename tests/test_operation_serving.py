"""Serving by the operation: any module, any kernel layout, under every flax transform, with a config of patterns.

Each model here is one that jaxlora has no registered layer kind for (its own einsum modules) or that wraps layers
in a flax transform; `drop_in.check_drop_in` checks the whole contract on each (see its docstring), against a
plain-numpy merge and the plain model.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from drop_in import check_drop_in, formula_merge
from flax import nnx

import jaxlora

D, N, K, H, F = 8, 3, 2, 4, 12


class Einsum(nn.Module):
    """A user's own einsum layer (like gemma's), with its parameter named `w`: no registration anywhere."""

    shape: tuple[int, ...]
    weight_name: str = "w"

    @nn.compact
    def __call__(self, eqn, x):
        w = self.param(self.weight_name, nn.initializers.normal(0.5), self.shape)
        return jnp.einsum(eqn, x, w)


class Attention(nn.Module):
    """q (N, D, H), kv (2, K, D, H), out (N, H, D): the layouts gemma uses."""

    @nn.compact
    def __call__(self, x):
        q = Einsum((N, D, H), name="q_einsum")("btd,ndh->btnh", x)
        k, v = Einsum((2, K, D, H), name="kv_einsum")("btd,ckdh->cbtkh", x)
        k, v = jnp.repeat(k, N // K + 1, axis=2)[:, :, :N], jnp.repeat(v, N // K + 1, axis=2)[:, :, :N]
        weights = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H), axis=-1)
        return Einsum((N, H, D), name="attn_vec_einsum")("btnh,nhd->btd", jnp.einsum("bnts,bsnh->btnh", weights, v))


class FeedForward(nn.Module):
    """gating (2, F, D) and linear (F, D) sharing one scope (nn.share_scope), as gemma's MLP does."""

    def setup(self):
        self.gate_proj = Einsum((2, F, D), weight_name="gating_einsum")
        self.down_proj = Einsum((F, D), weight_name="linear")
        nn.share_scope(self, self.gate_proj)
        nn.share_scope(self, self.down_proj)

    def __call__(self, x):
        gate = self.gate_proj("btd,cfd->cbtf", x)
        return self.down_proj("btf,fd->btd", jax.nn.gelu(gate[0]) * gate[1])


class GemmaLike(nn.Module):
    @nn.jit
    @nn.compact
    def __call__(self, x):
        x = x + Attention(name="attn")(x)
        return x + FeedForward(name="mlp")(x)


def _x(shape=(2, 5, D)):
    return jax.random.normal(jax.random.key(9), shape)


def test_every_kernel_layout_gets_standard_lora_with_the_layout_read_from_the_operation():
    model, x = GemmaLike(), _x()
    params = model.init(jax.random.key(0), x)["params"]
    config = jaxlora.LoraConfig(rank=2, alpha=4.0, targets=(r".*/w", r"mlp/.*"))
    plan = check_drop_in(model, params, x, config)
    want = {  # A contracts exactly the kernel axes that meet x (D); B maps r to the others, in the kernel's order
        "attn/q_einsum/w": ((D, 2), (2, N, H)),
        "attn/kv_einsum/w": ((D, 2), (2, 2, K, H)),
        "attn/attn_vec_einsum/w": ((N, H, 2), (2, D)),
        "mlp/gating_einsum": ((D, 2), (2, 2, F)),  # two einsums in one scope (nn.share_scope): each its own
        "mlp/linear": ((F, 2), (2, D)),
    }
    for path, shapes in want.items():
        assert (plan.leaves[path].a_shape, plan.leaves[path].b_shape) == shapes, path
    table = str(plan)
    assert "attn/q_einsum" in table and "(3, 8, 4)" in table and "(8, 2)" in table


def test_a_kernel_whose_operation_contracts_other_axes_than_planned_is_named_with_the_fix():
    model, x = GemmaLike(), _x()
    params = model.init(jax.random.key(0), x)["params"]
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, targets=(r"attn/q_einsum/w",)))  # no model: leading axes
    _, adapters = jaxlora.init(jax.random.key(1), params, plan)
    with pytest.raises(ValueError, match=r"attn/q_einsum/w: it is contracted with x over its axes \(1,\).*model=model"):
        jaxlora.apply_fn(model, plan, strict=True)({"params": params}, adapters, x)


def test_a_target_the_model_never_uses_is_named_at_plan_time():
    class Unused(nn.Module):
        @nn.compact
        def __call__(self, x):
            self.param("spare", nn.initializers.normal(), (D, D))
            return nn.Dense(3, name="used")(x)

    model, x = Unused(), _x()
    params = model.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match=r"\['spare'\] are not used by the model's call on the example"):
        jaxlora.plan(params, jaxlora.LoraConfig(rank=2, targets=("spare", "used/kernel")), model=model, example=x)


class Projected(nn.Module):
    @nn.jit
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="proj")(x)


def test_nn_jit_a_plain_call_after_jaxlora_is_the_base_and_updates_are_counted_once():
    """The reproduction from the issue: flax's nn.jit caches its trace, and a jaxlora call must not enter it."""
    model, x = Projected(), _x((4, D))
    params = model.init(jax.random.key(0), x)["params"]
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
    _, adapters = jaxlora.init(jax.random.key(1), params, plan)
    adapters = jax.tree.map(lambda a: a + 0.5, adapters)
    served = jaxlora.apply_fn(model, plan, strict=True)({"params": params}, adapters, x)  # served first
    plain = model.apply({"params": params}, x)
    np.testing.assert_array_equal(plain, x @ params["proj"]["kernel"] + params["proj"]["bias"])
    merged = model.apply({"params": formula_merge(params, adapters, plan)}, x)
    np.testing.assert_allclose(served, merged, rtol=1e-5)
    doubled = jax.tree.map(lambda a: 2 * a, adapters)
    twice = jaxlora.apply_fn(model, plan, strict=True)({"params": params}, doubled, x)
    np.testing.assert_allclose(twice, model.apply({"params": formula_merge(params, doubled, plan)}, x), rtol=1e-5)


class MaxTextBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        h = nn.DenseGeneral((N, H), name="query")(x)
        x = x + nn.DenseGeneral(D, axis=(-2, -1), name="out")(h)
        return x + nn.Dense(D, name="mlp")(jax.nn.relu(nn.Dense(F, name="wi")(x))), None


class MaxTextLike(nn.Module):
    @nn.compact
    def __call__(self, x):
        block = nn.remat(MaxTextBlock, prevent_cse=False)
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        x, _ = stack(name="layers")(x, None)
        return nn.Dense(5, name="head")(x)


def test_nn_scan_over_nn_remat_blocks_serves_one_adapter_per_layer_read_from_the_scan():
    model, x = MaxTextLike(), _x()
    params = model.init(jax.random.key(0), x)["params"]
    plan = check_drop_in(model, params, x, jaxlora.LoraConfig(rank=2, targets=(jaxlora.ALL_KERNELS,)))
    assert plan.leaves["layers/query/kernel"].stacked_axes == 1
    assert plan.leaves["layers/query/kernel"].a_shape == (3, D, 2)
    assert plan.leaves["layers/out/kernel"].a_shape == (3, N, H, 2)
    assert plan.leaves["head/kernel"].stacked_axes == 0


class Ensemble(nn.Module):
    @nn.compact
    def __call__(self, x):
        members = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=0, out_axes=0)
        return members(6, name="members")(x)


def test_nn_vmap_kernels_get_one_adapter_per_mapped_member():
    model, x = Ensemble(), _x((4, 3, D))  # each of the 4 members its own input rows
    params = model.init(jax.random.key(0), x)["params"]
    plan = check_drop_in(model, params, x, jaxlora.LoraConfig(rank=2))
    assert plan.leaves["members/kernel"].a_shape == (4, D, 2)


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(D, F, rngs=rngs)
        self.down = nnx.LinearGeneral(F, (2, 4), rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.relu(self.up(x))).reshape(x.shape)


class NnxStack(nnx.Module):
    """nnx.vmap-made layers run by nnx.scan over nnx.remat blocks, an nnx.jit'd head."""

    def __init__(self, rngs):
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NnxBlock(rngs)

        self.layers = make(rngs.fork(split=3))
        self.head = nnx.Linear(D, 5, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(h, block):
            return nnx.remat(lambda b, h: b(h))(block, h)

        @nnx.jit
        def head(module, h):
            return module(h)

        return head(self.head, body(x, self.layers))


def test_nnx_scan_remat_vmap_and_jit_are_served_with_stacks_read_from_the_scan():
    model, x = NnxStack(nnx.Rngs(0)), _x()
    params = nnx.state(model, nnx.Param)
    plan = check_drop_in(model, params, x, jaxlora.LoraConfig(rank=2, targets=(".*kernel",)))
    assert plan.leaves["layers/up/kernel"].a_shape == (3, D, 2)
    assert plan.leaves["layers/down/kernel"].b_shape == (3, 2, 2, 4)


class NnxMapped(nnx.Module):
    def __init__(self, rngs):
        self.members = nnx.vmap(lambda r: nnx.Linear(D, 6, rngs=r), in_axes=0, out_axes=0)(rngs.fork(split=4))

    def __call__(self, x):
        return nnx.vmap(lambda m, x: m(x), in_axes=(0, 0), out_axes=0)(self.members, x)


def test_nnx_vmap_over_members_gets_one_adapter_per_member():
    model, x = NnxMapped(nnx.Rngs(0)), _x((4, 3, D))
    plan = check_drop_in(model, nnx.state(model, nnx.Param), x, jaxlora.LoraConfig(rank=2, targets=(".*kernel",)))
    assert plan.leaves["members/kernel"].a_shape == (4, D, 2)


class Bridged(nn.Module):
    """A linen model whose blocks are nnx modules (nnx.bridge.to_linen, as MaxText builds layers)."""

    @nn.compact
    def __call__(self, x):
        x = nnx.bridge.to_linen(NnxBlock, name="block")(x)
        return nn.Dense(5, name="head")(x)


def test_nnx_bridge_to_linen_layers_are_served():
    model, x = Bridged(), _x()
    params = model.init(jax.random.key(0), x)["params"]
    check_drop_in(model, params, x, jaxlora.LoraConfig(rank=2, targets=(".*kernel",)))


def test_nnx_bridge_to_nnx_wrapping_a_linen_model_is_served():
    model = nnx.bridge.ToNNX(MaxTextLike(), rngs=nnx.Rngs(0))
    x = _x()
    nnx.bridge.lazy_init(model, x)
    check_drop_in(model, nnx.state(model, nnx.Param), x, jaxlora.LoraConfig(rank=2, targets=(".*kernel",)))


def test_flax_multi_head_attention_linen_and_nnx_q_k_v_need_no_fan_in_ndim():
    x = _x()
    linen = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=D)
    params = linen.init(jax.random.key(0), x)["params"]
    plan = check_drop_in(linen, params, x, jaxlora.LoraConfig(rank=2))
    assert plan.leaves["query/kernel"].a_shape == (D, 2) and plan.leaves["out/kernel"].a_shape == (2, 4, 2)
    mha = nnx.MultiHeadAttention(num_heads=2, in_features=D, qkv_features=D, decode=False, rngs=nnx.Rngs(0))
    plan = check_drop_in(mha, nnx.state(mha, nnx.Param), x, jaxlora.LoraConfig(rank=2, targets=(".*kernel",)))
    assert plan.leaves["query/kernel"].a_shape == (D, 2)


def test_gradients_through_an_einsum_layout_equal_jax_grad_of_the_plain_formula():
    model, x = GemmaLike(), _x()
    params = model.init(jax.random.key(0), x)["params"]
    config = jaxlora.LoraConfig(rank=2, alpha=4.0, targets=(r".*/w", r"mlp/.*"))
    plan = jaxlora.plan(params, config, model=model, example=x)
    _, adapters = jaxlora.init(jax.random.key(1), params, plan)
    adapters = jax.tree.map(lambda a: a + 0.1, adapters)
    s = plan.leaves["attn/q_einsum/w"].scale

    def formula(adapters):  # the q/kv/out/gating/linear updates written out, one einsum each
        ad = {p: v for p, v in jaxlora._src.paths.flatten_adapters(adapters).items()}
        delta = {
            "attn/q_einsum/w": ("dr,rnh->ndh",),
            "attn/kv_einsum/w": ("dr,rckh->ckdh",),
            "attn/attn_vec_einsum/w": ("nhr,rd->nhd",),
        }
        p = jax.tree.map(lambda w: w, params)
        for path, (eqn,) in delta.items():
            a, b = ad[path]["lora_a"], ad[path]["lora_b"]
            node = p
            *parents, leaf = path.split("/")
            for name in parents:
                node = node[name]
            node[leaf] = node[leaf] + s * jnp.einsum(eqn, a, b)
        for name, eqn in (("gating_einsum", "dr,rcf->cfd"), ("linear", "fr,rd->fd")):
            pair = ad[f"mlp/{name}"]
            p["mlp"][name] = p["mlp"][name] + s * jnp.einsum(eqn, pair["lora_a"], pair["lora_b"])
        return jnp.sum(jnp.sin(model.apply({"params": p}, x)))

    served = jaxlora.apply_fn(model, plan, strict=True)
    got = jax.grad(lambda ad: jnp.sum(jnp.sin(served({"params": params}, ad, x))))(adapters)
    want = jax.grad(formula)(adapters)
    scale = max(float(jnp.abs(w).max()) for w in jax.tree.leaves(want))
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * scale), got, want)


def test_an_einsum_step_never_computes_a_kernel_sized_array():
    """The hand-written backward pass of a served einsum computes dx, dA and dB, never a kernel-sized dW."""
    wide = 256

    class Wide(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Einsum((N, wide, H), name="q")("btd,ndh->btnh", x)

    model, x = Wide(), _x((2, 5, wide))
    params = model.init(jax.random.key(0), x)["params"]
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, targets=("q/w",)), model=model, example=x)
    _, adapters = jaxlora.init(jax.random.key(1), params, plan)
    served = jaxlora.apply_fn(model, plan, strict=True)

    def loss(adapters, x):
        return jnp.sum(served({"params": params}, adapters, x) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(adapters, x)
    sizes = _shapes(jaxpr.jaxpr)
    assert (N, wide, H) not in sizes and (wide, N, H) not in sizes and (wide, N * H) not in sizes, sizes
    merged = jax.make_jaxpr(jax.grad(lambda a, x: jnp.sum(model.apply({"params": jaxlora.merge(params, a, plan)}, x)
                                                            ** 2), argnums=(0, 1)))(adapters, x)  # fmt: skip
    assert (N, wide, H) in _shapes(merged.jaxpr)  # the check sees a merged kernel when there is one


def _shapes(jaxpr) -> set[tuple[int, ...]]:
    found = set()
    for eqn in jaxpr.eqns:
        found |= {tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars}
        for sub in jax.core.jaxprs_in_params(eqn.params):
            found |= _shapes(sub)
    return found


class Looped(nn.Module):
    """A kernel used inside lax.cond branches, a fori_loop (a scan holding it as a constant) or a while_loop."""

    loop: str = "fori"

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.3), (D, D))
        x = jax.lax.cond(x.sum() > 0, lambda: jnp.tanh(x @ w), lambda: jnp.sin(x @ w))
        if self.loop == "fori":
            return jax.lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ w), x)
        return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.tanh(c[1] @ w)), (0, x))[1]


def test_kernels_inside_cond_branches_and_loops_are_served():
    model, x = Looped(), _x((3, D))
    params = model.init(jax.random.key(0), x)["params"]
    check_drop_in(model, params, x, jaxlora.LoraConfig(rank=2, targets=("w",)))
    model = Looped(loop="while")  # no reverse-mode derivative exists for it: the forward pass alone
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, targets=("w",)), model=model, example=x)
    _, adapters = jaxlora.init(jax.random.key(1), params, plan)
    adapters = jax.tree.map(lambda a: a + 0.2, adapters)
    out = jaxlora.apply_fn(model, plan, strict=True)({"params": params}, adapters, x)
    want = model.apply({"params": formula_merge(params, adapters, plan)}, x)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_peft_files_round_trip_einsum_layouts_and_kernels_named_w(tmp_path):
    model, x = GemmaLike(), _x()
    params = model.init(jax.random.key(0), x)["params"]
    both = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, targets=(r"mlp/.*",)), model=model, example=x)
    _, adapters = jaxlora.init(jax.random.key(1), params, both)
    with pytest.raises(ValueError, match=r"'mlp/gating_einsum' and 'mlp/linear' to PEFT: both map to the torch module"):
        jaxlora.peft_format.save_peft(tmp_path / "shared", params, adapters, both)  # one scope, two weights
    assert not (tmp_path / "shared").exists()
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, alpha=4.0, targets=(r".*/w",)), model=model, example=x)
    _, adapters = jaxlora.init(jax.random.key(1), params, plan)
    adapters = jax.tree.map(lambda a: a + 0.1, adapters)
    path = jaxlora.peft_format.save_peft(tmp_path / "peft", params, adapters, plan)
    _, loaded, loaded_plan = jaxlora.peft_format.load_peft(path, params, layouts=plan)
    jax.tree.map(np.testing.assert_array_equal, loaded, adapters)
    assert {p: leaf.in_axes for p, leaf in loaded_plan.leaves.items()} == {
        p: leaf.in_axes for p, leaf in plan.leaves.items()
    }
    out = jaxlora.apply_fn(model, loaded_plan, strict=True)({"params": params}, loaded, x)
    want = model.apply({"params": formula_merge(params, adapters, plan)}, x)
    np.testing.assert_allclose(out, want, atol=1e-5 * float(np.abs(want - model.apply({"params": params}, x)).max()))
    with pytest.raises(ValueError, match=r"which do not fit our 'attn/(q|kv)_einsum/w' of shape"):
        jaxlora.peft_format.load_peft(path, params)  # without the layouts, inputs would be the leading axes


GEMMA_LIKE_NAMES = (  # GemmaLike's kernels as torch modules: split kernels by a group, shared-scope leaves alone
    ("attn/q_einsum", "attn.q_proj", "linear"),
    ("attn/kv_einsum", "attn.{k,v}_proj", "linear"),
    ("attn/attn_vec_einsum", "attn.o_proj", "linear"),
    ("mlp/gating_einsum", "mlp.{gate,up}_proj", "linear"),
    ("mlp/linear", "mlp.down_proj", "linear"),
)


def test_peft_files_split_a_kernel_into_torch_modules_and_join_them_back_exactly(tmp_path):
    """A name map group writes a kernel as one torch module per slice of its first axis (the same A, B sliced), and
    reads them back: the same adapters where the A's are equal; where they differ (torch-trained), one adapter of
    rank 2r whose update, slice by slice, is each torch module's own s·B A."""
    from safetensors.numpy import load_file, save_file

    model, x = GemmaLike(), _x()
    params = model.init(jax.random.key(0), x)["params"]
    config = jaxlora.LoraConfig(rank=2, alpha=4.0, targets=(r".*/w", r"mlp/.*"))
    plan = jaxlora.plan(params, config, model=model, example=x)
    _, adapters = jaxlora.init(jax.random.key(1), params, plan)
    adapters = jax.tree.map(lambda a: a + jax.random.normal(jax.random.key(2), a.shape), adapters)
    path = jaxlora.peft_format.save_peft(tmp_path / "peft", params, adapters, plan, name_map=GEMMA_LIKE_NAMES)
    tensors = load_file(path / "adapter_model.safetensors")
    key = "base_model.model.{}.lora_{}.weight".format
    np.testing.assert_array_equal(tensors[key("attn.k_proj", "A")], tensors[key("attn.v_proj", "A")])
    gating_b = np.asarray(adapters["mlp"]["gating_einsum"]["lora_b"])  # (r, 2, F)
    np.testing.assert_array_equal(tensors[key("mlp.up_proj", "B")], gating_b[:, 1].T)
    _, loaded, loaded_plan = jaxlora.peft_format.load_peft(path, params, name_map=GEMMA_LIKE_NAMES, layouts=plan)
    jax.tree.map(np.testing.assert_array_equal, loaded, adapters)

    tensors[key("attn.v_proj", "A")] = np.random.default_rng(0).normal(size=(2, D)).astype(np.float32)
    save_file(tensors, path / "adapter_model.safetensors")
    _, joined, joined_plan = jaxlora.peft_format.load_peft(path, params, name_map=GEMMA_LIKE_NAMES, layouts=plan)
    assert joined_plan.leaves["attn/kv_einsum/w"].rank == 4 and joined_plan.leaves["mlp/gating_einsum"].rank == 2
    w = np.asarray(params["attn"]["kv_einsum"]["w"])  # (2, K, D, H); torch's (K·H, D) per slice
    delta = np.asarray(formula_merge(params, joined, joined_plan)["attn"]["kv_einsum"]["w"]) - w
    for i, name in enumerate(("attn.k_proj", "attn.v_proj")):
        want = loaded_plan.leaves["attn/kv_einsum/w"].scale * tensors[key(name, "B")] @ tensors[key(name, "A")]
        got = delta[i].transpose(0, 2, 1).reshape(K * H, D)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    leading = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, targets=(r"attn/kv_einsum/w",)))  # axis 0 an input
    _, leading_adapters = jaxlora.init(jax.random.key(1), params, leading)
    with pytest.raises(ValueError, match=r"'attn/kv_einsum/w' .* as the 2 torch modules .* build the plan with model="):
        jaxlora.peft_format.save_peft(tmp_path / "no", params, leading_adapters, leading, name_map=GEMMA_LIKE_NAMES)
    with pytest.raises(ValueError, match=r"'attn.k_proj' is a slice of .*'attn/kv_einsum/w'.*layouts="):
        jaxlora.peft_format.load_peft(path, params, name_map=GEMMA_LIKE_NAMES)
