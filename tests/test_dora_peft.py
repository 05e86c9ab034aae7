"""DoRA PEFT files both ways (use_dora, lora_magnitude_vector) with real peft as the oracle: same logits."""

from __future__ import annotations

import json
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_peft_interop import (
    ATOL,
    SIZES,
    TorchMLP,
    _copy_into_torch,
    _edit_tensors,
    _flax_mlp,
    _load_without_peft_warnings,
    _randomise,
    _tokens,
    _x,
    gpt2,  # noqa: F401  (the module-scoped fixture)
)

import jaxlora
from jaxlora.models import gpt2 as gpt2_lib
from jaxlora.peft_format import load_peft, save_peft

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _randomise_dora_torch(model, seed: int, std: float = 0.1) -> None:
    """PEFT's LoRA factors and DoRA magnitudes moved to random values (B non-zero, m away from ‖W‖)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(param + std * torch.randn(param.shape, generator=generator))


def test_mlp_dora_jax_to_peft(tmp_path, caplog):
    model, base = _flax_mlp()
    config = jaxlora.LoraConfig(rank=3, alpha=6.0, targets=(r"linear[12]/kernel",), use_dora=True)
    _, adapters = jaxlora.init(jax.random.key(1), base, config)
    adapters = _randomise(adapters, 2)
    save_peft(tmp_path / "adapter", base, adapters, config)
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["use_dora"] is True

    torch_model = TorchMLP(SIZES)
    _copy_into_torch(base, {n: getattr(torch_model, n) for n in torch_model.names})
    peft_model = _load_without_peft_warnings(torch_model, tmp_path / "adapter", caplog)
    with torch.no_grad():
        got = peft_model(torch.tensor(_x())).numpy()
    want = jaxlora.apply(model, {"params": base}, adapters, config, _x())
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert not np.allclose(want, model.apply({"params": base}, _x()), atol=1e-2)


def test_mlp_dora_peft_to_jax_and_back(tmp_path):
    model, base = _flax_mlp()
    torch_model = TorchMLP(SIZES)
    _copy_into_torch(base, {n: getattr(torch_model, n) for n in torch_model.names})
    peft_model = peft.get_peft_model(
        torch_model, peft.LoraConfig(r=2, lora_alpha=5, target_modules=["linear1", "linear3"], use_dora=True)
    )
    _randomise_dora_torch(peft_model, 3)
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = peft_model.eval()(torch.tensor(_x())).numpy()

    params, adapters, plan = load_peft(tmp_path / "adapter", base)
    assert plan.config.use_dora and adapters["linear1"]["kernel"]["magnitude"].shape == (16,)
    np.testing.assert_allclose(jaxlora.apply(model, {"params": params}, adapters, plan, _x()), want, atol=ATOL)
    np.testing.assert_allclose(model.apply({"params": jaxlora.merge(params, adapters, plan)}, _x()), want, atol=ATOL)
    save_peft(tmp_path / "again", params, adapters, plan)
    _, again, _ = load_peft(tmp_path / "again", base)
    jax.tree.map(np.testing.assert_array_equal, again, adapters)


GPT2_TARGETS = (r"h_\d+/(attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)/kernel",)


def test_gpt2_dora_both_ways(tmp_path, gpt2, caplog):  # noqa: F811
    directory, model, base = gpt2
    config = jaxlora.LoraConfig(rank=4, alpha=8.0, targets=GPT2_TARGETS, use_dora=True)
    _, adapters = jaxlora.init(jax.random.key(1), base, config)
    adapters = _randomise(adapters, 4, std=0.2)
    save_peft(tmp_path / "adapter", base, adapters, config, name_map=gpt2_lib.PEFT_NAME_MAP, task_type="CAUSAL_LM")
    torch_model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    peft_model = _load_without_peft_warnings(torch_model, tmp_path / "adapter", caplog)
    with torch.no_grad():
        got = peft_model(input_ids=torch.tensor(_tokens())).logits.numpy()
    want = jaxlora.apply(model, {"params": base}, adapters, config, _tokens())
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert not np.allclose(want, model.apply({"params": base}, _tokens()), atol=1e-2)

    torch_model = transformers.GPT2LMHeadModel.from_pretrained(directory)
    peft_config = peft.LoraConfig(
        r=2, lora_alpha=6, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True, task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(torch_model, peft_config)
    _randomise_dora_torch(peft_model, 5, std=0.2)
    peft_model.save_pretrained(tmp_path / "from_peft")
    with torch.no_grad():
        want = peft_model.eval()(input_ids=torch.tensor(_tokens())).logits.numpy()
    params, loaded, plan = load_peft(tmp_path / "from_peft", base, name_map=gpt2_lib.PEFT_NAME_MAP)
    np.testing.assert_allclose(jaxlora.apply(model, {"params": params}, loaded, plan, _tokens()), want, atol=ATOL)


def test_dora_file_without_magnitudes_is_incomplete(tmp_path):
    _, base = _flax_mlp()
    config = jaxlora.LoraConfig(rank=2, targets=(r"linear1/kernel",), use_dora=True)
    _, adapters = jaxlora.init(jax.random.key(1), base, config)
    directory = save_peft(tmp_path / "adapter", base, adapters, config)
    _edit_tensors(directory, lambda t: t.pop("base_model.model.linear1.lora_magnitude_vector"))
    with pytest.raises(ValueError, match=re.escape("has no base_model.model.linear1.lora_magnitude_vector, but")):
        load_peft(directory, base)


def test_loaded_dora_adapters_refuse_a_plain_lora_plan(tmp_path):
    """A DoRA file's adapters used with a config without use_dora: named, with the fix."""
    _, base = _flax_mlp()
    config = jaxlora.LoraConfig(rank=2, targets=(r"linear1/kernel",), use_dora=True)
    _, adapters = jaxlora.init(jax.random.key(1), base, config)
    directory = save_peft(tmp_path / "adapter", base, adapters, config)
    params, loaded, _ = load_peft(directory, base)
    plain = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, targets=(r"linear1/kernel",)))
    with pytest.raises(ValueError, match=r"holds a DoRA 'magnitude', but the config has use_dora=False"):
        jaxlora.apply(_flax_mlp()[0], {"params": params}, loaded, plain, jnp.asarray(_x()))
