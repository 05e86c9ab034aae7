"""OLoRA, LoftQ and EVA initialisations, each against an independent reference: the real `peft` package on the same
weights (OLoRA, EVA) or a plain-numpy LoftQ from the paper's algorithm (PEFT's LoftQ needs bitsandbytes on CUDA)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_module
from models import MLP
from safetensors.numpy import load_file

import jaxlora
from jaxlora import quantization
from jaxlora.peft_format import load_peft, save_peft

torch = require_module("torch")
peft = require_module("peft")

SIZES = (64, 48, 96, 16)  # in 64 -> 48 (wide) -> 96 (tall) -> 16
NAMES = ("linear1", "linear2", "linear3")


class TorchMLP(torch.nn.Module):
    def __init__(self, sizes):
        super().__init__()
        for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
            setattr(self, f"linear{i + 1}", torch.nn.Linear(n_in, n_out))

    def forward(self, x):
        for i, name in enumerate(NAMES):
            x = getattr(self, name)(x)
            x = torch.relu(x) if i < len(NAMES) - 1 else x
        return x


def _flax_mlp(seed: int = 0):
    model = MLP(SIZES[1:])
    return model, model.init(jax.random.key(seed), jnp.zeros((1, SIZES[0])))["params"]


def _torch_copy(params) -> TorchMLP:
    torch_model = TorchMLP(SIZES)
    with torch.no_grad():
        for name in NAMES:
            layer = getattr(torch_model, name)
            layer.weight.copy_(torch.tensor(np.asarray(params[name]["kernel"]).T))
            layer.bias.copy_(torch.tensor(np.asarray(params[name]["bias"])))
    return torch_model.eval()


def _x(batch: int = 5) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, SIZES[0])).astype(np.float32)


def _randomise(adapters, seed: int, std: float = 0.05):
    """Trained-looking adapters: the init plus noise on every factor."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [x + std * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


# ------------------------------------------------------------------------------------------------------------------
# OLoRA


def test_olora_factors_and_residual_equal_peft_on_the_same_weights():
    """PEFT's olora_init: Wᵀ = Q R (torch's (out, in) weight), lora_B = Q[:, :r], lora_A = R[:r], base W - s·B A.
    jaxlora's A (in, r) and B (r, out) are PEFT's transposed; the signs are the Householder QR's, the same in torch
    and jax (compared as they are, no sign fixing)."""
    _, params = _flax_mlp()
    config = jaxlora.LoraConfig(rank=4, alpha=8.0, init="olora", targets=tuple(f"{n}/kernel" for n in NAMES))
    residual, adapters = jaxlora.init(jax.random.key(1), params, config)
    torch_model = peft.get_peft_model(
        _torch_copy(params),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(NAMES), init_lora_weights="olora"),
    )
    for name in NAMES:
        layer = getattr(torch_model.base_model.model, name)
        pair = adapters[name]["kernel"]
        np.testing.assert_allclose(pair["lora_a"], layer.lora_A["default"].weight.detach().numpy().T, atol=2e-5)
        np.testing.assert_allclose(pair["lora_b"], layer.lora_B["default"].weight.detach().numpy().T, atol=2e-5)
        np.testing.assert_allclose(
            residual[name]["kernel"], layer.base_layer.weight.detach().numpy().T, atol=2e-5, rtol=1e-5
        )
    model = MLP(SIZES[1:])
    x = _x()
    adapted = jaxlora.apply(model, {"params": residual}, adapters, config, x)
    np.testing.assert_allclose(adapted, model.apply({"params": params}, x), atol=1e-4)


def test_olora_stacked_layers_each_get_their_own_qr_and_unselected_layers_keep_w():
    w = jax.random.normal(jax.random.key(0), (3, 32, 24))
    params = {"stack": {"kernel": w}}
    config = jaxlora.LoraConfig(
        rank=4, init="olora", stacked_axes={"stack/kernel": 1}, layers_to_transform={"stack/kernel": (0, 2)}
    )
    residual, adapters = jaxlora.init(jax.random.key(1), params, config)
    pair = adapters["stack"]["kernel"]
    for layer in (0, 2):
        q, r = np.linalg.qr(np.asarray(w[layer]).T)
        np.testing.assert_allclose(pair["lora_a"][layer], r[:4].T, atol=2e-5)
        np.testing.assert_allclose(pair["lora_b"][layer], q[:, :4].T, atol=2e-5)
    assert not pair["lora_a"][1].any() and not pair["lora_b"][1].any()
    np.testing.assert_array_equal(residual["stack"]["kernel"][1], w[1])
    scale = config.scale_for("stack/kernel")
    np.testing.assert_allclose(residual["stack"]["kernel"] + scale * pair["lora_a"] @ pair["lora_b"], w, atol=2e-5)


def test_olora_on_nnx_state_returns_the_residual_and_the_module_computes_the_base_model():
    from flax import nnx

    class TwoLayer(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(16, 32, rngs=rngs)
            self.out = nnx.Linear(32, 8, rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.relu(self.hidden(x)))

    module = TwoLayer(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (5, 16))
    base = module(x)
    state = nnx.state(module, nnx.Param)
    config = jaxlora.LoraConfig(rank=4, alpha=8.0, init="olora")
    residual, adapters = jaxlora.init(jax.random.key(1), state, config)
    q, r = np.linalg.qr(np.asarray(state["out"]["kernel"][...]).T)
    np.testing.assert_allclose(adapters["out"]["kernel"]["lora_b"], q[:, :4].T, atol=2e-5)
    np.testing.assert_allclose(adapters["out"]["kernel"]["lora_a"], r[:4].T, atol=2e-5)
    nnx.update(module, residual)
    np.testing.assert_allclose(jaxlora.apply_nnx(module, adapters, config, x), base, atol=1e-4)


@pytest.mark.parametrize("init", ["olora", pytest.param("pissa", marks=pytest.mark.slow)])
def test_trained_residual_adapters_export_as_peft_converts_them_and_load_back(tmp_path, init):
    """PEFT's path_initial_model_for_weight_conversion: [A | A0], [B ; -B0] at rank 2r over the ORIGINAL weights.
    The file equals the one PEFT writes for the same trained factors (OLoRA: tensor by tensor; PiSSA, whose singular
    vectors' signs torch and jax choose differently: the update B'A' of every module); PEFT and jaxlora load it onto
    the original base and compute the trained model (the residual base + trained adapters)."""
    model, params = _flax_mlp()
    config = jaxlora.LoraConfig(rank=4, alpha=8.0, init=init, targets=tuple(f"{n}/kernel" for n in NAMES))
    residual, initial = jaxlora.init(jax.random.key(1), params, config)
    trained = _randomise(initial, seed=3)
    with pytest.raises(ValueError, match="pass initial_adapters="):
        save_peft(tmp_path / "refused", residual, trained, config)
    ours = save_peft(tmp_path / "ours", residual, trained, config, initial_adapters=initial)

    # PEFT's own conversion of the same trained factors
    torch_model = peft.get_peft_model(
        _torch_copy(params),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(NAMES), init_lora_weights=init),
    )
    torch_model.peft_config["default"].init_lora_weights = True
    torch_model.save_pretrained(str(tmp_path / "peft_init"))
    torch_model.peft_config["default"].init_lora_weights = init
    with torch.no_grad():
        for name in NAMES:
            layer = getattr(torch_model.base_model.model, name)
            layer.lora_A["default"].weight.copy_(torch.tensor(np.asarray(trained[name]["kernel"]["lora_a"]).T))
            layer.lora_B["default"].weight.copy_(torch.tensor(np.asarray(trained[name]["kernel"]["lora_b"]).T))
    torch_model.save_pretrained(
        str(tmp_path / "peft_converted"), path_initial_model_for_weight_conversion=str(tmp_path / "peft_init")
    )
    theirs = load_file(tmp_path / "peft_converted" / "adapter_model.safetensors")
    mine = load_file(ours / "adapter_model.safetensors")
    assert sorted(theirs) == sorted(mine)
    if init == "olora":  # the same QR: the same tensors
        for key in theirs:
            np.testing.assert_allclose(mine[key], theirs[key], atol=2e-5)
    for key in (k for k in theirs if "lora_A" in k):  # PiSSA's SVD signs differ between torch and jax: compare B'A'
        b_key = key.replace("lora_A", "lora_B")
        np.testing.assert_allclose(mine[b_key] @ mine[key], theirs[b_key] @ theirs[key], atol=2e-5)
    their_config = json.loads((tmp_path / "peft_converted" / "adapter_config.json").read_text())
    my_config = json.loads((ours / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "init_lora_weights", "rank_pattern", "alpha_pattern"):
        assert my_config[key] == their_config[key], key

    x = _x()
    trained_model = np.asarray(jaxlora.apply(model, {"params": residual}, trained, config, x))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(_torch_copy(params), str(ours)).eval()
    assert [str(w.message) for w in caught if "/peft/" in w.filename] == []  # a plain LoRA file to PEFT
    with torch.no_grad():
        np.testing.assert_allclose(loaded(torch.tensor(x)).numpy(), trained_model, atol=1e-4)
    params_again, adapters_again, plan_again = load_peft(ours, params)
    np.testing.assert_allclose(
        jaxlora.apply(model, {"params": params_again}, adapters_again, plan_again, x), trained_model, atol=1e-4
    )


# ------------------------------------------------------------------------------------------------------------------
# LoftQ

# QLoRA's NF4 code book (Dettmers et al. 2023, appendix E; bitsandbytes' table), written out independently of qwix.
NF4 = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
)  # fmt: skip


def _nf4_numpy(w: np.ndarray, block: int = 64) -> np.ndarray:
    """Absmax NF4 in blocks of `block` input features of each output column (bitsandbytes' layout), dequantized."""
    n_in, n_out = w.shape
    blocks = w.T.reshape(n_out, n_in // block, block)
    absmax = np.abs(blocks).max(axis=-1, keepdims=True)
    codes = np.abs(blocks[..., None] / absmax[..., None] - NF4).argmin(axis=-1)
    return (NF4[codes] * absmax).reshape(n_out, n_in).T


def _loftq_numpy(w: np.ndarray, rank: int, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """LoftQ, Algorithm 1 of Li et al. 2023 in float64: Q = NF4(W - s·A B); s·A B = top-r SVD of W - Q."""
    update = np.zeros_like(w)
    for _ in range(iterations):
        q = _nf4_numpy(w - update)
        u, s, vt = np.linalg.svd(w - q, full_matrices=False)
        update = (u[:, :rank] * s[:rank]) @ vt[:rank]
    return q, update


def _loftq_params():
    """An MLP 128 -> 64 -> 96 whose kernels have a strong low-rank part (where LoftQ helps) plus noise."""
    model = MLP((64, 96))
    params = model.init(jax.random.key(0), jnp.zeros((1, 128)))["params"]
    keys = jax.random.split(jax.random.key(7), 6)

    def kernel(k1, k2, k3, n_in, n_out):
        low = jax.random.normal(k1, (n_in, 6)) @ jax.random.normal(k2, (6, n_out))
        return 0.3 * low / np.sqrt(6) + 0.05 * jax.random.normal(k3, (n_in, n_out))

    params["linear1"]["kernel"] = kernel(*keys[:3], 128, 64)
    params["linear2"]["kernel"] = kernel(*keys[3:], 64, 96)
    return model, params


@pytest.mark.parametrize("iterations", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_loftq_error_after_k_iterations_matches_the_papers_algorithm_in_numpy(iterations):
    """‖W - (Q + s·A B)‖ after k steps within 1% of a plain-numpy LoftQ (float64, the same NF4 table and blocks;
    PEFT's own LoftQ needs bitsandbytes on a CUDA device, not available here); the base comes back as NF4 codes."""
    _, params = _loftq_params()
    config = jaxlora.LoraConfig(rank=4, alpha=16.0, init="loftq", loftq_iter=iterations)
    quantized, adapters = jaxlora.init(jax.random.key(1), params, config)
    for name in ("linear1", "linear2"):
        w = np.asarray(params[name]["kernel"], np.float64)
        q = quantized[name]["kernel"]
        assert quantization.is_quantized(q) and q.qtype == "nf4"
        pair = adapters[name]["kernel"]
        update = config.scale_for(f"{name}/kernel") * np.asarray(pair["lora_a"] @ pair["lora_b"], np.float64)
        ours = np.linalg.norm(w - (np.asarray(quantization.dequantize(q), np.float64) + update))
        q_ref, update_ref = _loftq_numpy(w, 4, iterations)
        reference = np.linalg.norm(w - (q_ref + update_ref))
        assert abs(ours - reference) <= 0.01 * reference, (name, ours, reference)
        assert reference < np.linalg.norm(w - _nf4_numpy(w))  # the adapters do take up some quantization error


@pytest.mark.slow
def test_loftq_more_iterations_lower_the_error_and_the_adapted_model_runs_on_the_nf4_base(tmp_path):
    model, params = _loftq_params()
    errors = []
    for iterations in (1, 2, 4):
        config = jaxlora.LoraConfig(rank=4, alpha=8.0, init="loftq", loftq_iter=iterations)
        quantized, adapters = jaxlora.init(jax.random.key(1), params, config)
        merged = jaxlora.merge(quantization.dequantize_params(quantized), adapters, config)
        errors.append(float(jnp.linalg.norm(merged["linear1"]["kernel"] - params["linear1"]["kernel"])))
    assert errors[2] < errors[1] < errors[0], errors
    x = jax.random.normal(jax.random.key(2), (3, 128))
    adapted = jaxlora.apply(model, {"params": quantized}, adapters, config, x)
    np.testing.assert_allclose(adapted, model.apply({"params": merged}, x), atol=1e-4)
    out = save_peft(tmp_path / "loftq", quantized, adapters, config)  # plain LoRA over the LoftQ base
    assert json.loads((out / "adapter_config.json").read_text())["init_lora_weights"] is True


@pytest.mark.slow
def test_adapter_checkpoints_of_a_loftq_base_fingerprint_its_codes_and_refuse_the_float_weights(tmp_path):
    """The base's content checksum covers an NF4 leaf's codes and scales: the LoftQ base loads, W itself is refused."""
    from jaxlora import checkpoint

    _, params = _loftq_params()
    config = jaxlora.LoraConfig(rank=4, init="loftq")
    quantized, adapters = jaxlora.init(jax.random.key(1), params, config)
    checkpoint.save_adapter(tmp_path / "adapter", quantized, adapters, config)
    _, loaded, plan = checkpoint.load_adapter(tmp_path / "adapter", quantized)
    assert plan.config == config
    np.testing.assert_array_equal(loaded["linear1"]["kernel"]["lora_a"], adapters["linear1"]["kernel"]["lora_a"])
    other, _ = jaxlora.init(jax.random.key(1), params, dataclasses.replace(config, loftq_iter=2))
    for wrong in (params, other):
        with pytest.raises(ValueError, match=r"instead of the residual or NF4 base jaxlora\.init returned"):
            checkpoint.load_adapter(tmp_path / "adapter", wrong)


def test_loftq_refuses_what_nf4_cannot_hold_by_name():
    params = {"odd": {"kernel": jnp.ones((48, 16))}}
    with pytest.raises(ValueError, match=r"'odd/kernel'.*48 input features are not a multiple of 64"):
        jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2, init="loftq"))
    stacked = jaxlora.LoraConfig(rank=2, init="loftq", stacked_axes={"odd/kernel": 1})
    with pytest.raises(ValueError, match=r"'odd/kernel'.*\(stacked\)"):
        jaxlora.init(jax.random.key(0), {"odd": {"kernel": jnp.ones((2, 64, 16))}}, stacked)
    with pytest.raises(ValueError, match="loftq_bits must be 4"):
        jaxlora.LoraConfig(init="loftq", loftq_bits=8)


# ------------------------------------------------------------------------------------------------------------------
# EVA


def _eva_batches(count: int = 6, rows: int = 1024) -> list[np.ndarray]:
    """Inputs with a decaying spectrum (well-separated leading directions) and a mean offset."""
    rng = np.random.default_rng(5)
    rotation, _ = np.linalg.qr(rng.standard_normal((SIZES[0], SIZES[0])))
    spread = 3.0 * 0.6 ** np.arange(SIZES[0])
    return [
        ((rng.standard_normal((rows, SIZES[0])) * spread) @ rotation + 0.5).astype(np.float32) for _ in range(count)
    ]


def _peft_eva(params, batches, rank: int, alpha: float, rho: float):
    """PEFT's EVA on the torch copy of the same MLP and the same batches: the PeftModel."""
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(NAMES),
        init_lora_weights="eva",
        eva_config=peft.EvaConfig(rho=rho),
    )
    model = peft.get_peft_model(_torch_copy(params), config, low_cpu_mem_usage=True)
    initialize_lora_eva_weights(
        model,
        [torch.tensor(b) for b in batches],
        forward_fn=lambda m, x: m(x),
        prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=None,
        show_progress_bar=False,
    )
    return model


def _similarity(u: np.ndarray, v: np.ndarray) -> float:
    """The smallest cosine of the principal angles between the row spaces of u (k, d) and v (k, d)."""
    qu, _ = np.linalg.qr(u.T)
    qv, _ = np.linalg.qr(v.T)
    return float(np.linalg.svd(qu.T @ qv, compute_uv=False).min())


@pytest.mark.parametrize("rho", [pytest.param(1.0, marks=pytest.mark.slow), 2.0])
def test_eva_directions_and_redistributed_ranks_match_peft_on_the_same_activations(tmp_path, rho):
    """Same weights, same batches: each layer's A spans PEFT's leading directions (smallest principal-angle cosine
    >= 0.99 over the leading min(r_ours, r_peft, 3) directions, each direction's |cos| >= 0.99 too), the ranks
    PEFT redistributes are ours, and the PEFT file records the rank_pattern / alpha_pattern PEFT writes."""
    model, params = _flax_mlp()
    batches = _eva_batches()
    config = jaxlora.LoraConfig(rank=4, alpha=8.0, init="eva", eva_rho=rho, targets=tuple(f"{n}/kernel" for n in NAMES))
    plan = jaxlora.plan(params, config)
    forward = jax.jit(lambda adapters, x: jaxlora.apply(model, {"params": params}, adapters, plan, x))
    adapters, new_plan = jaxlora.init_eva(params, plan, forward, batches)
    theirs = _peft_eva(params, batches, rank=4, alpha=8, rho=rho)

    ranks = {}
    for name in NAMES:
        layer = getattr(theirs.base_model.model, name)
        assert hasattr(layer, "lora_A"), name  # no layer lost its adapter here
        their_a = layer.lora_A["default"].weight.detach().numpy()  # (r, in)
        our_a = np.asarray(adapters[name]["kernel"]["lora_a"]).T
        ranks[name] = (our_a.shape[0], their_a.shape[0])
        k = min(3, *ranks[name])
        assert _similarity(our_a[:k], their_a[:k]) >= 0.99, name
        cosines = np.abs(np.sum(our_a[:k] * their_a[:k], axis=1))
        assert (cosines >= 0.99).all(), (name, cosines)
        assert not np.asarray(adapters[name]["kernel"]["lora_b"]).any()
    assert all(ours == peft_rank for ours, peft_rank in ranks.values()), ranks
    assert (len({r for r, _ in ranks.values()}) > 1) == (rho > 1), ranks  # redistributed unless rho = 1 caps it
    assert sum(r for r, _ in ranks.values()) == 3 * 4

    out = save_peft(tmp_path / "eva", params, adapters, new_plan)
    written = json.loads((out / "adapter_config.json").read_text())
    peft_config = theirs.peft_config["default"]
    assert written["rank_pattern"] == peft_config.rank_pattern
    assert written["alpha_pattern"] == peft_config.alpha_pattern
    assert written["init_lora_weights"] == "eva" and written["eva_config"]["rho"] == rho
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(_torch_copy(params), str(out)).eval()
    assert [str(w.message) for w in caught if "/peft/" in w.filename] == []
    trained = _randomise(adapters, seed=4)
    x = _x()
    save_peft(tmp_path / "eva", params, trained, new_plan, overwrite=True)
    loaded = peft.PeftModel.from_pretrained(_torch_copy(params), str(out)).eval()
    with torch.no_grad():
        np.testing.assert_allclose(
            loaded(torch.tensor(x)).numpy(),
            jaxlora.apply(model, {"params": params}, trained, new_plan, x),
            atol=1e-4,
        )


@pytest.mark.slow
def test_eva_on_scanned_gpt2_equals_eva_on_the_unscanned_model_layer_by_layer(tmp_path):
    """nn.scan + jit: each stacked layer gets the directions and rank of the same layer in the unscanned model (a
    stack holds the largest of its layers' ranks, the others padded with zero directions)."""
    import dataclasses

    from jaxlora.models import gpt2

    config = gpt2.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2, dropout=0.0)
    tokens = [np.random.default_rng(i).integers(0, 97, (4, 16)) for i in range(3)]
    model = gpt2.GPT2(config)
    params = model.init(jax.random.key(0), tokens[0])["params"]
    scanned = gpt2.GPT2(dataclasses.replace(config, scan_layers=True))
    stacked = gpt2.stack_layers(params, config.n_layer)
    kinds = "(attn/c_attn|mlp/c_fc|mlp/c_proj)/kernel"
    results = {}
    for name, (net, base, lora) in {
        "unscanned": (model, params, jaxlora.LoraConfig(rank=4, init="eva", targets=(rf"h_\d+/{kinds}",))),
        "scanned": (
            scanned,
            stacked,
            jaxlora.LoraConfig(rank=4, init="eva", targets=(f"h/{kinds}",), stacked_axes={"h/.*": 1}),
        ),
    }.items():
        plan = jaxlora.plan(base, lora)
        forward = jax.jit(
            lambda adapters, t, net=net, base=base, plan=plan: jaxlora.apply(net, {"params": base}, adapters, plan, t)
        )
        results[name] = jaxlora.init_eva(base, plan, forward, tokens)
    (flat, flat_plan), (stack, _) = results["unscanned"], results["scanned"]
    ranks = {path: leaf.rank for path, leaf in flat_plan.leaves.items()}
    assert len(set(ranks.values())) > 1, ranks
    for module in ("attn/c_attn", "mlp/c_fc", "mlp/c_proj"):
        outer, inner = module.split("/")
        stack_a = np.asarray(stack["h"][outer][inner]["kernel"]["lora_a"])
        assert stack_a.shape[-1] == max(ranks[f"h_{i}/{module}/kernel"] for i in range(2))
        for i in range(2):
            a = np.asarray(flat[f"h_{i}"][outer][inner]["kernel"]["lora_a"])
            np.testing.assert_allclose(stack_a[i, :, : a.shape[1]], a, atol=1e-4)
            assert not stack_a[i, :, a.shape[1] :].any()
    # PEFT keeps one rank per module: the stack's zero padding is not written, the ranks are the unscanned ones
    written = {}
    for name, (adapters, plan), base, name_map in (
        ("flat", results["unscanned"], params, gpt2.PEFT_NAME_MAP),
        ("stack", results["scanned"], stacked, gpt2.PEFT_NAME_MAP_SCANNED),
    ):
        out = save_peft(tmp_path / name, base, adapters, plan, name_map=name_map)
        written[name] = json.loads((out / "adapter_config.json").read_text())
    for key in ("rank_pattern", "alpha_pattern", "r", "lora_alpha"):
        assert written["stack"][key] == written["flat"][key], key
    assert len(written["flat"]["rank_pattern"]) > 0


@pytest.mark.slow
def test_eva_on_nnx_takes_the_principal_directions_of_each_layers_inputs():
    """apply_nnx: A's columns are the leading eigenvectors of each layer's input covariance (numpy, float64)."""
    from flax import nnx

    class TwoLayer(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(16, 32, rngs=rngs)
            self.out = nnx.Linear(32, 8, rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.relu(self.hidden(x)))

    module = TwoLayer(nnx.Rngs(0))
    state = nnx.state(module, nnx.Param)
    plan = jaxlora.plan(state, jaxlora.LoraConfig(rank=2, alpha=4.0, init="eva"))
    data = [np.random.default_rng(i).standard_normal((64, 16)).astype(np.float32) for i in range(3)]
    adapters, _ = jaxlora.init_eva(state, plan, lambda a, x: jaxlora.apply_nnx(module, a, plan, x), data)
    x = np.concatenate(data).astype(np.float64)
    hidden = np.maximum(x @ np.asarray(state["hidden"]["kernel"][...]) + np.asarray(state["hidden"]["bias"][...]), 0)
    for name, inputs in (("hidden", x), ("out", hidden)):
        _, vectors = np.linalg.eigh(np.cov(inputs.T))
        a = np.asarray(adapters[name]["kernel"]["lora_a"])
        cosines = np.abs(np.sum(a * vectors[:, ::-1][:, : a.shape[1]], axis=0))
        assert (cosines > 0.999).all(), (name, cosines)


def test_eva_is_refused_by_init_and_needs_the_layers_to_be_called():
    model, params = _flax_mlp()
    config = jaxlora.LoraConfig(rank=2, init="eva")
    with pytest.raises(ValueError, match=r"call jaxlora\.init_eva"):
        jaxlora.init(jax.random.key(0), params, config)
    with pytest.raises(ValueError, match=r"never .or once. computed the layer of 'linear1/kernel'"):
        jaxlora.init_eva(params, config, lambda adapters, x: model.apply({"params": params}, x), _eva_batches(2, 8))


@pytest.mark.slow
def test_eva_on_an_eager_forward_leaves_no_host_callback_queued_behind_other_work(monkeypatch):
    """An eager forward's observations are added at once (no io_callback on concrete arrays), and an eager nnx.scan
    holding host callbacks is waited for before the next operation. An io_callback left queued while the Python
    thread waits for an execution slot holding the GIL deadlocks (seen once in CI, on a loaded machine, in the test
    below); the hang needs that timing, so this checks what gets queued."""
    from flax import nnx

    from jaxlora._src import eva, interpreter
    from jaxlora.models import llama

    concrete_callbacks, waits = [], []
    real_callback, real_wait = eva.io_callback, interpreter._wait_if_eager

    def callback(fn, result, *args):
        concrete_callbacks.append(not any(isinstance(x, jax.core.Tracer) for x in args))
        return real_callback(fn, result, *args)

    monkeypatch.setattr(eva, "io_callback", callback)
    monkeypatch.setattr(interpreter, "_wait_if_eager", lambda outs: waits.append(len(outs)) or real_wait(outs))
    config = llama.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    tokens = [jnp.asarray(np.random.default_rng(i).integers(0, 64, (2, 12))) for i in range(2)]
    for scan_layers, targets in ((False, llama.PEFT_TARGETS), (True, llama.PEFT_TARGETS_SCANNED)):
        module = llama.Llama(config, scan_layers=scan_layers, rngs=nnx.Rngs(0))
        stacked = llama.STACKED_AXES if scan_layers else {}
        plan = jaxlora.plan(nnx.state(module, nnx.Param), jaxlora.LoraConfig(rank=4, init="eva", targets=(targets,),
                                                                            stacked_axes=stacked))  # fmt: skip
        waits.clear()
        forward = lambda a, t, module=module, plan=plan: jaxlora.apply_nnx(module, a, plan, t)
        jaxlora.init_eva(nnx.state(module, nnx.Param), plan, forward, tokens)
        assert waits, "no eager operation that an observer saw was waited for"
    assert concrete_callbacks and not any(concrete_callbacks), "an io_callback was queued on concrete arrays"


def test_eva_on_an_nnx_scanned_llama_equals_eva_on_the_unscanned_layers():
    """nnx.scan: the stacked Llama layers get the directions and ranks of the same layers unscanned."""
    from flax import nnx

    from jaxlora.models import llama

    config = llama.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    tokens = [jnp.asarray(np.random.default_rng(i).integers(0, 64, (2, 12))) for i in range(3)]
    flat_module = llama.Llama(config, scan_layers=False, rngs=nnx.Rngs(0))
    scanned_module = llama.Llama(config, scan_layers=True, rngs=nnx.Rngs(1))
    nnx.update(scanned_module, llama.stack_layers(nnx.to_pure_dict(nnx.state(flat_module, nnx.Param))))
    results = {}
    for name, module, lora in (
        ("flat", flat_module, jaxlora.LoraConfig(rank=4, init="eva", targets=(llama.PEFT_TARGETS,))),
        (
            "scanned",
            scanned_module,
            jaxlora.LoraConfig(
                rank=4, init="eva", targets=(llama.PEFT_TARGETS_SCANNED,), stacked_axes=llama.STACKED_AXES
            ),
        ),
    ):
        state = nnx.state(module, nnx.Param)
        plan = jaxlora.plan(state, lora)
        results[name] = jaxlora.init_eva(
            state, plan, lambda a, t, module=module, plan=plan: jaxlora.apply_nnx(module, a, plan, t), tokens
        )
    (flat, flat_plan), (stacked, _) = results["flat"], results["scanned"]
    ranks = {path: leaf.rank for path, leaf in flat_plan.leaves.items()}
    assert len(set(ranks.values())) > 1, ranks
    for group, proj in (("mlp", "down_proj"), ("mlp", "up_proj"), ("self_attn", "o_proj")):
        stack_a = np.asarray(stacked["layers"][group][proj]["kernel"]["lora_a"])
        for i in range(2):
            a = np.asarray(flat["layers"][str(i)][group][proj]["kernel"]["lora_a"])
            assert a.shape[1] == ranks[f"layers/{i}/{group}/{proj}/kernel"]
            np.testing.assert_allclose(stack_a[i, :, : a.shape[1]], a, atol=1e-4)
            assert not stack_a[i, :, a.shape[1] :].any()


def test_the_initialisations_guide_runs_and_quotes_the_loftq_results_file():
    """The guide "Choosing an initialisation": its cell runs as written and its figures are the results file's."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    section = (root / "docs" / "guides" / "initialisations.md").read_text()
    (code,) = re.findall(r"```\{code-cell\} python\n(.*?)```", section, re.S)
    namespace = {"__name__": "guide"}
    exec(compile(code, "docs/guides/initialisations.md", "exec"), namespace)
    assert namespace["plan"].config.init == "eva" and namespace["adapters"]["kernel"]["lora_a"].shape[0] == 32
    gaps = json.loads((root / "benchmarks" / "results" / "loftq_quality.json").read_text())["gaps_to_float32"]
    text = " ".join(section.split())
    for name in ("nf4 + kaiming", "nf4 + loftq (loftq_iter=1)", "nf4 + loftq (loftq_iter=5)"):
        for key in ("lm_loss_gap_at_init", "init_reconstruction_error", "val_loss_gap_after"):
            assert f"{gaps[name][key]:.4f}" in text, (name, key)
