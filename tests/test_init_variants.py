"""OLoRA, LoftQ and EVA initialisations, each against an independent reference: the real `peft` package on the same
weights (OLoRA, EVA) or a plain-numpy LoftQ from the paper's algorithm (PEFT's LoftQ needs bitsandbytes on CUDA)."""

from __future__ import annotations

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


@pytest.mark.parametrize("init", ["olora", "pissa"])
def test_trained_residual_adapters_export_as_peft_converts_them_and_load_back(tmp_path, init):
    """PEFT's path_initial_model_for_weight_conversion: [A | A0], [B ; -B0] at rank 2r over the ORIGINAL weights.
    The file equals the one PEFT writes for the same trained factors; PEFT and jaxlora load it onto the original
    base and compute the trained model (the residual base + trained adapters)."""
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
    for key in theirs:
        np.testing.assert_allclose(mine[key], theirs[key], atol=2e-5)
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


@pytest.mark.parametrize("iterations", [1, 3])
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


def test_loftq_refuses_what_nf4_cannot_hold_by_name():
    params = {"odd": {"kernel": jnp.ones((48, 16))}}
    with pytest.raises(ValueError, match=r"'odd/kernel'.*48 input features are not a multiple of 64"):
        jaxlora.init(jax.random.key(0), params, jaxlora.LoraConfig(rank=2, init="loftq"))
    stacked = jaxlora.LoraConfig(rank=2, init="loftq", stacked_axes={"odd/kernel": 1})
    with pytest.raises(ValueError, match=r"'odd/kernel'.*\(stacked\)"):
        jaxlora.init(jax.random.key(0), {"odd": {"kernel": jnp.ones((2, 64, 16))}}, stacked)
    with pytest.raises(ValueError, match="loftq_bits must be 4"):
        jaxlora.LoraConfig(init="loftq", loftq_bits=8)
