"""PEFT adapter files both ways, with torch + transformers + peft as the oracle: same logits on both sides."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_module
from models import MLP, Zoo

import jaxlora
from jaxlora import name_maps
from jaxlora.peft_format import load_peft, save_peft

torch = require_module("torch")
transformers = require_module("transformers")
peft = require_module("peft")
from safetensors.numpy import load_file, save_file  # noqa: E402

from jaxlora.models import gpt2 as gpt2_lib  # noqa: E402

ATOL = 1e-4


def _randomise(adapters, seed: int, std: float = 0.1):
    """Trained-looking adapters: every A and B non-zero."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )


def _randomise_torch(model, seed: int, std: float = 0.1) -> None:
    """PEFT's LoRA factors and modules_to_save copies set to random values (B non-zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.copy_(param + std * torch.randn(param.shape, generator=generator))


def _load_without_peft_warnings(model, directory: Path, caplog):
    """``PeftModel.from_pretrained``, failing on any warning PEFT emits about the files."""
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(model, str(directory)).eval()
    from_peft = [f"{w.category.__name__}: {w.message}" for w in caught if "/peft/" in w.filename]
    from_peft += [r.getMessage() for r in caplog.records if r.name.startswith("peft")]
    assert from_peft == []
    return loaded


# ----------------------------------------------------------------------------------------------------------------
# MLP: flax linear1.. <-> a torch module with the same attribute names, or an nn.Sequential


class TorchMLP(torch.nn.Module):
    def __init__(self, sizes):
        super().__init__()
        self.names = [f"linear{i + 1}" for i in range(len(sizes) - 1)]
        for name, n_in, n_out in zip(self.names, sizes[:-1], sizes[1:], strict=True):
            setattr(self, name, torch.nn.Linear(n_in, n_out))

    def forward(self, x):
        for i, name in enumerate(self.names):
            x = getattr(self, name)(x)
            x = torch.relu(x) if i < len(self.names) - 1 else x
        return x


SIZES = (10, 16, 8, 3)


def _flax_mlp(seed: int = 0):
    model = MLP(SIZES[1:])
    return model, model.init(jax.random.key(seed), jnp.zeros((1, SIZES[0])))["params"]


def _copy_into_torch(params, linears) -> None:
    with torch.no_grad():
        for name, linear in linears.items():
            linear.weight.copy_(torch.tensor(np.asarray(params[name]["kernel"]).T))
            linear.bias.copy_(torch.tensor(np.asarray(params[name]["bias"])))


def _x(batch: int = 6) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, SIZES[0])).astype(np.float32)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_mlp_jax_to_peft(tmp_path, caplog, use_rslora):
    model, base = _flax_mlp()
    config = jaxlora.LoraConfig(
        rank=3,
        alpha=6.0,
        targets=(r"linear[12]/kernel",),
        rank_pattern={r"linear2/kernel": 2},
        alpha_pattern={r"linear2/kernel": 5.0},
        use_rslora=use_rslora,
        modules_to_save=(r"linear3/.*",),
    )
    _, adapters = jaxlora.init(jax.random.key(1), base, config)
    adapters = _randomise(adapters, 2)
    trained = {**base, "linear3": jax.tree.map(lambda w: w + 0.3, base["linear3"])}
    save_peft(tmp_path / "adapter", trained, adapters, config)

    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["target_modules"] == ["linear1", "linear2"]
    assert (written["r"], written["lora_alpha"], written["use_rslora"]) == (3, 6, use_rslora)
    assert (written["rank_pattern"], written["alpha_pattern"]) == ({"linear2": 2}, {"linear2": 5})
    assert written["modules_to_save"] == ["linear3"] and written["fan_in_fan_out"] is False
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in tensors.items()} == {
        "base_model.model.linear1.lora_A.weight": (3, 10),
        "base_model.model.linear1.lora_B.weight": (16, 3),
        "base_model.model.linear2.lora_A.weight": (2, 16),
        "base_model.model.linear2.lora_B.weight": (8, 2),
        "base_model.model.linear3.weight": (3, 8),
        "base_model.model.linear3.bias": (3,),
    }

    torch_model = TorchMLP(SIZES)
    _copy_into_torch(base, {n: getattr(torch_model, n) for n in torch_model.names})
    peft_model = _load_without_peft_warnings(torch_model, tmp_path / "adapter", caplog)
    got = peft_model(torch.tensor(_x())).detach().numpy()
    want = model.apply({"params": jaxlora.merge(trained, adapters, config)}, _x())
    np.testing.assert_allclose(got, want, atol=ATOL)
    factored = jaxlora.apply(model, {"params": trained}, adapters, config, _x())
    np.testing.assert_allclose(got, factored, atol=ATOL)
    assert not np.allclose(want, model.apply({"params": base}, _x()), atol=1e-2)


def test_mlp_peft_to_jax_through_a_sequential_name_map(tmp_path):
    model, base = _flax_mlp()
    torch_model = torch.nn.Sequential(
        torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    )
    _copy_into_torch(base, {"linear1": torch_model[0], "linear2": torch_model[2], "linear3": torch_model[4]})
    peft_config = peft.LoraConfig(
        r=4, lora_alpha=12, target_modules=["0", "2"], rank_pattern={"2": 2}, modules_to_save=["4"]
    )
    peft_model = peft.get_peft_model(torch_model, peft_config)
    _randomise_torch(peft_model, 0)
    peft_model.save_pretrained(tmp_path / "adapter")
    want = peft_model.eval()(torch.tensor(_x())).detach().numpy()

    name_map = name_maps.sequential(["linear1", "linear2", "linear3"])
    params, adapters, plan = load_peft(tmp_path / "adapter", base, name_map=name_map)
    config = plan.config
    assert jax.tree.map(np.shape, adapters) == {
        "linear1": {"kernel": {"lora_a": (10, 4), "lora_b": (4, 16)}},
        "linear2": {"kernel": {"lora_a": (16, 2), "lora_b": (2, 8)}},
    }
    assert config.scale_for("linear1/kernel") == 3.0 and config.scale_for("linear2/kernel") == 6.0
    assert jaxlora.plan(params, config).saved == ("linear3/bias", "linear3/kernel")
    got = model.apply({"params": jaxlora.merge(params, adapters, config)}, _x())
    np.testing.assert_allclose(got, want, atol=ATOL)
    np.testing.assert_allclose(jaxlora.apply(model, {"params": params}, adapters, config, _x()), want, atol=ATOL)


def test_a_peft_adapter_with_rank_above_min_in_out_loads_with_a_warning(tmp_path):
    """PEFT allows r > min(in, out) (r=5 on linear3, 8 -> 3); the file loads, warns, and computes what PEFT does."""
    model, base = _flax_mlp()
    torch_model = TorchMLP(SIZES)
    _copy_into_torch(base, {n: getattr(torch_model, n) for n in torch_model.names})
    peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(r=5, lora_alpha=10, target_modules=["linear3"]))
    _randomise_torch(peft_model, 0)
    peft_model.save_pretrained(tmp_path / "adapter")
    want = peft_model.eval()(torch.tensor(_x())).detach().numpy()

    with pytest.warns(UserWarning, match=re.escape("'linear3/kernel' has rank 5, above min(fan_in, fan_out) = 3")):
        params, adapters, plan = load_peft(tmp_path / "adapter", base)
    assert plan.leaves["linear3/kernel"].rank == 5 and plan.leaves["linear3/kernel"].scale == 2.0
    np.testing.assert_allclose(model.apply({"params": jaxlora.merge(params, adapters, plan)}, _x()), want, atol=ATOL)
    np.testing.assert_allclose(jaxlora.apply(model, {"params": params}, adapters, plan, _x()), want, atol=ATOL)
    assert not np.allclose(want, model.apply({"params": base}, _x()), atol=1e-2)
    with pytest.warns(UserWarning, match="above min"):  # a jaxlora checkpoint of it loads again too
        jaxlora.checkpoint.save_adapter(tmp_path / "ours", params, adapters, plan)
        _, again, _ = jaxlora.checkpoint.load_adapter(tmp_path / "ours", params)
    jax.tree.map(np.testing.assert_array_equal, again, adapters)
    # a new config asking for such a rank is still refused: the relaxation is for files that exist
    with pytest.raises(ValueError, match="exceeds min"):
        jaxlora.plan(base, jaxlora.LoraConfig(rank=5, targets=("linear3/kernel",)))


def test_n_dimensional_kernels_round_trip(tmp_path):
    """DenseGeneral / Einsum kernels are written as flattened torch Linear layers and read back unchanged."""
    model = Zoo()
    tokens = jnp.arange(10).reshape(2, 5) % 32
    base = model.init(jax.random.key(0), tokens)["params"]
    config = jaxlora.LoraConfig(
        rank=2,
        alpha=3.0,
        targets=(r"embed/embedding", r"heads/kernel", r"merge_heads/kernel", r"einsum/kernel"),
        fan_in_ndim={r"heads/kernel": 1},
        rank_pattern={r"einsum/kernel": 3},
    )
    _, adapters = jaxlora.init(jax.random.key(1), base, config)
    adapters = _randomise(adapters, 3)
    save_peft(tmp_path / "zoo", base, adapters, config)
    shapes = {k: v.shape for k, v in load_file(tmp_path / "zoo" / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.heads.lora_A.weight"] == (2, 12)  # (r, in)
    assert shapes["base_model.model.heads.lora_B.weight"] == (12, 2)  # (out = 3·4, r)
    assert shapes["base_model.model.embed.lora_embedding_A"] == (2, 32)  # (r, num)
    params, restored, again = load_peft(tmp_path / "zoo", base)
    assert again.config.fan_in_ndim == {r"heads/kernel": 1}
    jax.tree.map(np.testing.assert_array_equal, restored, adapters)
    np.testing.assert_allclose(
        model.apply({"params": jaxlora.merge(params, restored, again)}, tokens),
        model.apply({"params": jaxlora.merge(base, adapters, config)}, tokens),
        atol=1e-6,
    )


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(6, name="fc")(x)


class _Nested(nn.Module):
    """Two modules whose torch names end alike: "fc" and "block.fc", which PEFT's suffix matching confuses."""

    @nn.compact
    def __call__(self, x):
        return _Block(name="block")(jnp.tanh(nn.Dense(6, name="fc")(x)))


class TorchNested(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(5, 6)
        self.block = torch.nn.Module()
        self.block.fc = torch.nn.Linear(6, 6)

    def forward(self, x):
        return self.block.fc(torch.tanh(self.fc(x)))


@pytest.mark.parametrize(
    ("targets", "rank_pattern", "want_targets", "want_ranks"),
    [
        ((r"fc/kernel",), {}, "fc", {}),  # a plain ["fc"] would also adapt block.fc
        ((r"fc/kernel", r"block/fc/kernel"), {r"fc/kernel": 2}, ["block.fc", "fc"], {"^fc": 2}),
    ],
)
def test_names_that_suffix_other_modules(tmp_path, caplog, targets, rank_pattern, want_targets, want_ranks):
    model = _Nested()
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    base = model.init(jax.random.key(0), x)["params"]
    config = jaxlora.LoraConfig(rank=3, targets=targets, rank_pattern=rank_pattern)
    _, adapters = jaxlora.init(jax.random.key(1), base, config)
    adapters = _randomise(adapters, 5)
    save_peft(tmp_path / "a", base, adapters, config)
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (written["target_modules"], written["rank_pattern"]) == (want_targets, want_ranks)

    torch_model = TorchNested()
    _copy_into_torch(base, {"fc": torch_model.fc})
    _copy_into_torch(base["block"], {"fc": torch_model.block.fc})
    peft_model = _load_without_peft_warnings(torch_model, tmp_path / "a", caplog)
    got = peft_model(torch.tensor(x)).detach().numpy()
    np.testing.assert_allclose(got, model.apply({"params": jaxlora.merge(base, adapters, config)}, x), atol=ATOL)
    _, restored, again = load_peft(tmp_path / "a", base)
    jax.tree.map(np.testing.assert_array_equal, restored, adapters)
    assert again.config.rank_for("fc/kernel") == config.rank_for("fc/kernel")


# ----------------------------------------------------------------------------------------------------------------
# GPT-2: transformers' GPT2LMHeadModel against jaxlora.models.gpt2 with PEFT_NAME_MAP


def _hf_gpt2(directory: Path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=97, n_positions=16, bos_token_id=0, eos_token_id=0
    )
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(directory)
    return hf


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny random GPT-2 saved by transformers, and the same weights in our flax GPT-2."""
    directory = tmp_path_factory.mktemp("gpt2")
    _hf_gpt2(directory)
    model = gpt2_lib.GPT2(gpt2_lib.config_from_hf(directory))
    return directory, model, gpt2_lib.load_hf_weights(directory)


def _tokens() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 97, (2, 12))


GPT2_TARGETS = (r"h_\d+/(attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)/kernel", r"wpe/embedding")


def test_gpt2_jax_to_peft(tmp_path, gpt2, caplog):
    directory, model, base = gpt2
    config = jaxlora.LoraConfig(
        rank=4,
        alpha=8.0,
        targets=GPT2_TARGETS,
        rank_pattern={r"h_1/mlp/c_fc/kernel": 2},
        alpha_pattern={r"h_0/attn/c_proj/kernel": 3.0},
        modules_to_save=(r"ln_f/.*",),
    )
    _, adapters = jaxlora.init(jax.random.key(1), base, config)
    adapters = _randomise(adapters, 4, std=0.2)
    trained = {**base, "ln_f": jax.tree.map(lambda w: w * 1.5 + 0.1, base["ln_f"])}
    save_peft(
        tmp_path / "adapter",
        trained,
        adapters,
        config,
        name_map=gpt2_lib.PEFT_NAME_MAP,
        base_model_name_or_path=str(directory),
        task_type="CAUSAL_LM",
    )
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["fan_in_fan_out"] is True and written["modules_to_save"] == ["transformer.ln_f"]
    assert written["rank_pattern"] == {"transformer.h.1.mlp.c_fc": 2}
    assert "transformer.wpe" in written["target_modules"] and len(written["target_modules"]) == 9

    torch_model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    peft_model = _load_without_peft_warnings(torch_model, tmp_path / "adapter", caplog)
    assert isinstance(peft_model, peft.PeftModelForCausalLM)
    with torch.no_grad():
        got = peft_model(input_ids=torch.tensor(_tokens())).logits.numpy()
    want = model.apply({"params": jaxlora.merge(trained, adapters, config)}, _tokens())
    np.testing.assert_allclose(got, want, atol=ATOL)
    np.testing.assert_allclose(jaxlora.apply(model, {"params": trained}, adapters, config, _tokens()), want, atol=ATOL)
    assert not np.allclose(want, model.apply({"params": base}, _tokens()), atol=1e-2)


def test_gpt2_peft_to_jax(tmp_path, gpt2):
    directory, model, base = gpt2
    torch_model = transformers.GPT2LMHeadModel.from_pretrained(directory)
    peft_config = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["c_attn", "c_proj", "c_fc", "wpe"],
        fan_in_fan_out=True,
        rank_pattern={"c_fc": 2},
        alpha_pattern={"h.1.attn.c_attn": 5},
        use_rslora=True,
        modules_to_save=["ln_f"],
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT notes that wpe (an Embedding) ignores fan_in_fan_out
        peft_model = peft.get_peft_model(torch_model, peft_config)
    _randomise_torch(peft_model, 1, std=0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = peft_model.eval()(input_ids=torch.tensor(_tokens())).logits.numpy()

    params, adapters, plan = load_peft(tmp_path / "adapter", base, name_map=gpt2_lib.PEFT_NAME_MAP)
    config = plan.config
    assert config.use_rslora and config.scale_for("h_1/attn/c_attn/kernel") == 5 / 2
    assert config.scale_for("h_0/mlp/c_fc/kernel") == 16 / np.sqrt(2)
    got = model.apply({"params": jaxlora.merge(params, adapters, config)}, _tokens())
    np.testing.assert_allclose(got, want, atol=ATOL)
    np.testing.assert_allclose(jaxlora.apply(model, {"params": params}, adapters, config, _tokens()), want, atol=ATOL)


# ----------------------------------------------------------------------------------------------------------------
# Bad files: each a clear error


@pytest.fixture
def mlp_adapter(tmp_path):
    """A valid exported MLP adapter (linear1, linear2 adapted; linear3 saved in full) and its base."""
    _, base = _flax_mlp()
    config = jaxlora.LoraConfig(rank=3, targets=(r"linear[12]/kernel",), modules_to_save=(r"linear3/.*",))
    _, adapters = jaxlora.init(jax.random.key(1), base, config)
    return save_peft(tmp_path / "adapter", base, _randomise(adapters, 0), config), base


def _edit_tensors(directory: Path, edit) -> None:
    file = directory / "adapter_model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def _edit_config(directory: Path, **changes) -> None:
    file = directory / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def test_corrupted_safetensors(mlp_adapter):
    directory, base = mlp_adapter
    file = directory / "adapter_model.safetensors"
    file.write_bytes(np.random.default_rng(0).bytes(4000))
    pattern = (
        rf"cannot read {re.escape(str(file))} as a safetensors file \(SafetensorError: .+\); "
        "it is truncated or corrupted: export the adapter again"
    )
    with pytest.raises(ValueError, match=pattern):
        load_peft(directory, base)


def test_truncated_safetensors(mlp_adapter):
    directory, base = mlp_adapter
    file = directory / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    pattern = (
        rf"cannot read {re.escape(str(file))} as a safetensors file \(SafetensorError: .+\); "
        "it is truncated or corrupted"
    )
    with pytest.raises(ValueError, match=pattern):
        load_peft(directory, base)


def test_missing_factor(mlp_adapter):
    directory, base = mlp_adapter
    _edit_tensors(directory, lambda t: t.pop("base_model.model.linear2.lora_B.weight"))
    message = (
        f"{directory / 'adapter_model.safetensors'} has no base_model.model.linear2.lora_B.weight; "
        "the file is incomplete: export it again"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        load_peft(directory, base)


def test_missing_module(mlp_adapter):
    directory, base = mlp_adapter
    _edit_tensors(directory, lambda t: [t.pop(k) for k in list(t) if ".linear2." in k])
    message = (
        f"{directory / 'adapter_model.safetensors'} is missing the LoRA weights of ['linear2'], which "
        "adapter_config.json targets (target_modules=['linear1', 'linear2']); the file is incomplete: export it again"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        load_peft(directory, base)


def test_missing_saved_weight(mlp_adapter):
    directory, base = mlp_adapter
    _edit_tensors(directory, lambda t: t.pop("base_model.model.linear3.bias"))
    message = (
        f"{directory / 'adapter_model.safetensors'} is missing base_model.model.linear3.bias, the full weight of "
        "'linear3' that modules_to_save ['linear3'] names; the file is incomplete: export it again"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        load_peft(directory, base)


def test_wrong_shapes(mlp_adapter):
    directory, base = mlp_adapter
    _edit_tensors(
        directory, lambda t: t.update({"base_model.model.linear1.lora_A.weight": np.zeros((3, 11), np.float32)})
    )
    message = (
        f"{directory / 'adapter_model.safetensors'}: 'linear1' has lora A (3, 11) and lora B (16, 3), which do not "
        "fit our 'linear1/kernel' of shape (10, 16) (expected (3, 10) and (16, 3)); "
        "the adapter belongs to a different model"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        load_peft(directory, base)


def test_wrong_saved_shape(mlp_adapter):
    directory, base = mlp_adapter
    _edit_tensors(directory, lambda t: t.update({"base_model.model.linear3.weight": np.zeros((8, 3), np.float32)}))
    message = (
        f"{directory / 'adapter_model.safetensors'}: base_model.model.linear3.weight has shape (8, 3), expected "
        "(3, 8) for our kernel of shape (8, 3); the adapter belongs to a different model"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        load_peft(directory, base)


def test_rank_disagreeing_with_the_config(mlp_adapter):
    directory, base = mlp_adapter
    _edit_config(directory, rank_pattern={"linear2": 2})
    message = (
        f"{directory / 'adapter_model.safetensors'}: 'linear2' has LoRA rank 3, but adapter_config.json gives r=2 "
        "for it; the weights and the config do not belong together"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        load_peft(directory, base)


def test_modules_the_name_map_does_not_know(tmp_path):
    _, base = _flax_mlp()
    torch_model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    peft.get_peft_model(torch_model, peft.LoraConfig(r=2, target_modules=["0", "2"])).save_pretrained(tmp_path / "a")
    message = (
        f"{tmp_path / 'a' / 'adapter_model.safetensors'} has LoRA weights for torch modules ['0', '2'] that no "
        "parameter of `params` maps to (our modules map to e.g. ['linear1', 'linear2', 'linear3']); "
        "pass the name map of this model family"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        load_peft(tmp_path / "a", base)


def _peft_adapter(directory: Path, config) -> Path:
    torch_model = TorchMLP(SIZES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(torch_model, config)
        _randomise_torch(peft_model, 0)
        peft_model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize(
    ("peft_config", "named"),
    [
        (lambda: peft.LoraConfig(r=2, target_modules=["linear1"], lora_bias=True), "lora_bias"),
        (lambda: peft.LoraConfig(r=2, target_modules=["linear1"], bias="all"), "bias='all'"),
    ],
)
def test_unsupported_peft_features_are_named(tmp_path, peft_config, named):
    _, base = _flax_mlp()
    directory = _peft_adapter(tmp_path / "a", peft_config())
    message = (
        f"{directory / 'adapter_config.json'} uses PEFT features jaxlora does not support: {named}; "
        "loading it as plain LoRA would give a different model"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        load_peft(directory, base)


def test_other_peft_types_are_refused(tmp_path):
    _, base = _flax_mlp()
    directory = _peft_adapter(tmp_path / "a", peft.IA3Config(target_modules=["linear1"], feedforward_modules=[]))
    message = f"{directory / 'adapter_config.json'}: peft_type is 'IA3'; jaxlora reads only LORA adapters"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_peft(directory, base)


def test_dora_weights_without_the_config_flag_are_refused(tmp_path):
    """A file whose config was edited to hide DoRA still names the magnitude vectors it holds."""
    _, base = _flax_mlp()
    directory = _peft_adapter(tmp_path / "a", peft.LoraConfig(r=2, target_modules=["linear1"], use_dora=True))
    _edit_config(directory, use_dora=False)
    message = (
        f"{directory / 'adapter_model.safetensors'} holds keys jaxlora cannot place: "
        "['base_model.model.linear1.lora_magnitude_vector'] (these come from DoRA magnitude vectors while "
        "adapter_config.json says use_dora=false, which jaxlora does not support)"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        load_peft(directory, base)


def test_pickled_bin_files_are_not_read(mlp_adapter):
    directory, base = mlp_adapter
    (directory / "adapter_model.safetensors").rename(directory / "adapter_model.bin")
    message = (
        f"no adapter_model.safetensors in {directory} (adapter_model.bin is a pickle, which is not read: "
        "re-save with safe_serialization=True)"
    )
    with pytest.raises(FileNotFoundError, match=re.escape(message)):
        load_peft(directory, base)


def test_export_refuses_pissa_and_existing_directories(mlp_adapter):
    directory, base = mlp_adapter
    config = jaxlora.LoraConfig(rank=2, targets=(r"linear1/kernel",), init="pissa")
    residual, adapters = jaxlora.init(jax.random.key(0), base, config)
    with pytest.raises(ValueError, match=re.escape("init='pissa' adapters are relative to the residual base")):
        save_peft(directory.parent / "pissa", residual, adapters, config)
    assert not (directory.parent / "pissa").exists()
    plain = jaxlora.LoraConfig(rank=2, targets=(r"linear1/kernel",))
    _, adapters = jaxlora.init(jax.random.key(0), base, plain)
    with pytest.raises(FileExistsError, match=re.escape(f"{directory} already exists; pass overwrite=True")):
        save_peft(directory, base, adapters, plain)
    save_peft(directory, base, adapters, plain, overwrite=True)
    assert json.loads((directory / "adapter_config.json").read_text())["target_modules"] == ["linear1"]


def test_loading_does_not_modify_the_given_params(mlp_adapter):
    directory, base = mlp_adapter
    before = copy.deepcopy(jax.tree.map(np.asarray, base))
    params, _, _ = load_peft(directory, base)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, base), before)
    assert params is not base


def test_gpt2_tied_embedding_adapter_is_refused_both_ways(tmp_path, gpt2):
    """jaxlora adapts wte's lookup and the tied LM head together; PEFT only the lookup: never exchange it."""
    directory, _, base = gpt2
    config = jaxlora.LoraConfig(rank=2, targets=(r"wte/embedding",))
    _, adapters = jaxlora.init(jax.random.key(1), base, config)
    with pytest.raises(ValueError, match=r"'wte/embedding'.*tied to the output head"):
        save_peft(tmp_path / "out", base, adapters, config, name_map=gpt2_lib.PEFT_NAME_MAP)
    assert not (tmp_path / "out").exists()

    torch_model = transformers.GPT2LMHeadModel.from_pretrained(directory)
    peft_model = peft.get_peft_model(torch_model, peft.LoraConfig(r=2, target_modules=["wte"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"'transformer.wte' has an Embedding LoRA on a table tied to the output head"):
        load_peft(tmp_path / "adapter", base, name_map=gpt2_lib.PEFT_NAME_MAP)


# ----------------------------------------------------------------------------------------------------------------
# GPT-2 with scanned blocks: stacked adapters written as per-layer PEFT keys and restacked on import


@pytest.fixture(scope="module")
def gpt2_scanned(gpt2):
    directory, model, _base = gpt2
    config = dataclasses.replace(model.config, scan_layers=True)
    return directory, gpt2_lib.GPT2(config), gpt2_lib.load_hf_weights(directory, config)


SCANNED_TARGETS = (r"h/(attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)/kernel",)


def test_scanned_gpt2_equals_the_unscanned_model_and_transformers(gpt2, gpt2_scanned):
    directory, model, base = gpt2
    _, scanned, stacked = gpt2_scanned
    assert stacked["h"]["attn"]["c_attn"]["kernel"].shape == (2, 32, 96)
    want = model.apply({"params": base}, _tokens())
    np.testing.assert_allclose(scanned.apply({"params": stacked}, _tokens()), want, atol=1e-5)
    with torch.no_grad():
        hf = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
        reference = hf(input_ids=torch.tensor(_tokens())).logits.numpy()
    np.testing.assert_allclose(scanned.apply({"params": stacked}, _tokens()), reference, atol=ATOL)
    assert jax.tree.all(jax.tree.map(np.array_equal, gpt2_lib.unstack_layers(stacked), base))


def test_scanned_gpt2_jax_to_peft_writes_per_layer_keys(tmp_path, gpt2_scanned, caplog):
    directory, model, base = gpt2_scanned
    config = jaxlora.LoraConfig(
        rank=4, alpha=8.0, targets=SCANNED_TARGETS, stacked_axes={"h/.*": 1}, layers_to_transform={"h/mlp/.*": (1,)}
    )
    plan = jaxlora.plan(base, config)
    _, adapters = jaxlora.init(jax.random.key(1), base, plan)
    adapters = _randomise(adapters, 4, std=0.2)
    save_peft(tmp_path / "adapter", base, adapters, plan, name_map=gpt2_lib.PEFT_NAME_MAP_SCANNED)
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "transformer.h.1.attn.c_attn" in written["target_modules"] and len(written["target_modules"]) == 6
    assert "transformer.h.0.mlp.c_fc" not in written["target_modules"]  # layer 0 of the MLP is not adapted
    torch_model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    peft_model = _load_without_peft_warnings(torch_model, tmp_path / "adapter", caplog)
    with torch.no_grad():
        got = peft_model(input_ids=torch.tensor(_tokens())).logits.numpy()
    want = jaxlora.apply_fn(model, plan, strict=True)({"params": base}, adapters, _tokens())
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert not np.allclose(want, model.apply({"params": base}, _tokens()), atol=1e-2)
    _, again, again_plan = load_peft(tmp_path / "adapter", base, name_map=gpt2_lib.PEFT_NAME_MAP_SCANNED)
    assert again_plan.leaves["h/mlp/c_fc/kernel"].layers == (1,)
    np.testing.assert_allclose(jaxlora.apply(model, {"params": base}, again, again_plan, _tokens()), want, atol=1e-5)


def test_scanned_gpt2_peft_to_jax_restacks_the_layers(tmp_path, gpt2_scanned):
    directory, model, base = gpt2_scanned
    torch_model = transformers.GPT2LMHeadModel.from_pretrained(directory)
    peft_config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM"
    )
    peft_model = peft.get_peft_model(torch_model, peft_config)
    _randomise_torch(peft_model, 1, std=0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = peft_model.eval()(input_ids=torch.tensor(_tokens())).logits.numpy()
    params, adapters, plan = load_peft(tmp_path / "adapter", base, name_map=gpt2_lib.PEFT_NAME_MAP_SCANNED)
    assert adapters["h"]["attn"]["c_attn"]["kernel"]["lora_a"].shape == (2, 32, 4)
    assert plan.leaves["h/attn/c_attn/kernel"].stacked_axes == 1
    got = jaxlora.apply_fn(model, plan, strict=True)({"params": params}, adapters, _tokens())
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_the_peft_names_that_lora_config_maps_are_fields_of_peft_lora_config():
    """Each PEFT keyword LoraConfig translates is a real field of peft.LoraConfig (the independent reference)."""
    from jaxlora._src.config import _PEFT_NAMES

    peft_fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert set(_PEFT_NAMES) <= peft_fields, set(_PEFT_NAMES) - peft_fields
    for name in ("r", "lora_alpha", "target_modules", "lora_dropout"):
        with pytest.raises(TypeError, match=rf"unknown keyword '{name}': PEFT's {name} is jaxlora's"):
            jaxlora.LoraConfig(**{name: getattr(peft.LoraConfig(), name)})


def test_a_peft_adapter_config_given_to_from_dict_points_to_load_peft():
    data = json.loads(json.dumps(peft.LoraConfig(r=4, target_modules=["fc1"]).to_dict(), default=str))
    with pytest.raises(ValueError, match=r"PEFT's adapter_config.json names.*jaxlora.peft_format.load_peft"):
        jaxlora.LoraConfig.from_dict(data)
