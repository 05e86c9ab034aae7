"""GPT-2 in flax against the Hugging Face reference: weights, logits, greedy decoding, name map, bad files."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require_module
from safetensors.numpy import save_file

from jaxlora.models import gpt2 as gpt2_lib
from jaxlora.models.gpt2 import GPT2, GPT2Classifier, GPT2Config, generate_greedy, load_hf_weights

torch = require_module("torch")
transformers = require_module("transformers")

VOCAB = 97


def _hf_config(**overrides):
    # A larger initializer_range than GPT-2's 0.02 makes random logits spread out, so greedy decoding
    # produces varied tokens instead of repeating one.
    kw = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=64, initializer_range=0.3)
    kw.update(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    kw.update(overrides)
    return transformers.GPT2Config(**kw)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A tiny random GPT2LMHeadModel saved with save_pretrained (keys carry the "transformer." prefix)."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(_hf_config()).eval()
    directory = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def loaded(hf_model):
    _, directory = hf_model
    return gpt2_lib.config_from_hf(directory), load_hf_weights(directory)


def _state_dict(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _save(tensors: dict[str, np.ndarray], path) -> None:
    save_file({k: np.array(v) for k, v in tensors.items()}, str(path))


def _hub_layout(model) -> dict[str, np.ndarray]:
    """Keys as in the hub's openai-community/gpt2 file: no prefix, with the attention-mask buffers."""
    tensors = {k.removeprefix("transformer."): v for k, v in _state_dict(model).items() if k != "lm_head.weight"}
    for i in range(model.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    return tensors


def _ids(shape, seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, shape)


def test_params_tree_mirrors_hugging_face_names(loaded):
    config, params = loaded
    assert set(params) == {"wte", "wpe", "h_0", "h_1", "ln_f"}
    assert params["h_0"]["attn"]["c_attn"]["kernel"].shape == (32, 96)
    assert params["h_1"]["mlp"]["c_proj"]["kernel"].shape == (128, 32)
    assert params["ln_f"]["scale"].dtype == jnp.float32
    assert config == GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3)


def test_logits_match_reference(hf_model, loaded):
    model, _ = hf_model
    config, params = loaded
    ids = _ids((3, 17))
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits.numpy()
    logits = GPT2(config).apply({"params": params}, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)
    hidden = GPT2(config).apply({"params": params}, jnp.asarray(ids), return_hidden=True)
    np.testing.assert_allclose(np.asarray(hidden @ params["wte"]["embedding"].T), expected, atol=1e-4, rtol=0)


def test_attention_mask_matches_reference_with_left_padding(hf_model, loaded):
    model, _ = hf_model
    config, params = loaded
    ids = _ids((2, 9), seed=1)
    mask = np.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        expected = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    logits = GPT2(config).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(logits)[mask == 1], expected[mask == 1], atol=1e-4, rtol=0)


def test_greedy_continuation_matches_reference(hf_model, loaded):
    model, _ = hf_model
    config, params = loaded
    prompt = _ids((2, 5), seed=2)
    with torch.no_grad():
        expected = model.generate(
            torch.tensor(prompt),
            attention_mask=torch.ones_like(torch.tensor(prompt)),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
        ).numpy()
    tokens = generate_greedy(GPT2(config), params, prompt, max_new_tokens=12)
    np.testing.assert_array_equal(np.asarray(tokens), expected)
    assert len(set(expected[0, 5:].tolist())) > 1, "degenerate reference: pick another seed"
    single = generate_greedy(GPT2(config), params, prompt[1], max_new_tokens=12)
    np.testing.assert_array_equal(np.asarray(single), expected[1])


def test_greedy_generation_compiles_once_per_buffer_size(loaded):
    config, params = loaded
    gpt2_lib.generation._greedy_fill.clear_cache()
    generate_greedy(GPT2(config), params, _ids((1, 4), seed=3), max_new_tokens=6)
    generate_greedy(GPT2(config), params, _ids((1, 3), seed=4), max_new_tokens=7)  # same buffer length 10
    assert gpt2_lib.generation._greedy_fill._cache_size() == 1
    with pytest.raises(ValueError, match="n_positions"):
        generate_greedy(GPT2(config), params, _ids((1, 60)), max_new_tokens=5)


def test_classifier_matches_sequence_classification_reference(hf_model, loaded):
    """Our head at the last real token == HF GPT2ForSequenceClassification (score, last non-pad token)."""
    model, _ = hf_model
    config, params = loaded
    torch.manual_seed(1)
    reference = transformers.GPT2ForSequenceClassification(_hf_config(num_labels=2, pad_token_id=VOCAB - 1)).eval()
    reference.transformer.load_state_dict(model.transformer.state_dict())
    lengths = np.array([11, 4, 7])
    ids = _ids((3, 11), seed=5) % (VOCAB - 1)
    for row, n in enumerate(lengths):
        ids[row, n:] = VOCAB - 1
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).logits.numpy()
    head = {"kernel": jnp.asarray(reference.score.weight.detach().numpy().T)}
    classifier = GPT2Classifier(config, num_classes=2)
    variables = {"params": {**params, "head": head}}
    by_lengths = classifier.apply(variables, jnp.asarray(ids), lengths=jnp.asarray(lengths))
    by_mask = classifier.apply(variables, jnp.asarray(ids), attention_mask=jnp.asarray(ids != VOCAB - 1))
    np.testing.assert_allclose(np.asarray(by_lengths), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(by_mask), expected, atol=1e-4, rtol=0)
    # Padding does not change the prediction; reading the final position (the recipe's choice) does.
    short = classifier.apply(variables, jnp.asarray(ids[1:2, :4]))
    np.testing.assert_allclose(np.asarray(short), expected[1:2], atol=1e-4, rtol=0)
    last_position = classifier.apply(variables, jnp.asarray(ids))
    assert not np.allclose(np.asarray(last_position)[1], expected[1], atol=1e-3)


def test_classifier_init_adds_only_the_head():
    config = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    params = GPT2Classifier(config, num_classes=3).init(jax.random.key(0), jnp.zeros((2, 5), jnp.int32))["params"]
    assert set(params) == {"wte", "wpe", "h_0", "ln_f", "head"}
    assert jax.tree.map(jnp.shape, params["head"]) == {"kernel": (16, 3)}


def test_dropout_needs_rng_and_changes_output_only_when_not_deterministic(loaded):
    config, params = loaded
    ids = jnp.asarray(_ids((1, 8)))
    model = GPT2(config)
    a = model.apply({"params": params}, ids)
    b = model.apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.key(0)})
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_hub_layout_without_prefix_with_buffers_and_tied_head(hf_model, loaded, tmp_path):
    model, _ = hf_model
    _, params = loaded
    tensors = _hub_layout(model)
    tensors["lm_head.weight"] = tensors["wte.weight"]
    _save(tensors, tmp_path / "model.safetensors")  # no config.json: shapes are inferred from the weights
    again = load_hf_weights(tmp_path / "model.safetensors")
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_gpt2model_checkpoint_and_shards(hf_model, loaded, tmp_path):
    model, _ = hf_model
    _, params = loaded
    model.transformer.save_pretrained(tmp_path / "base")
    jax.tree.map(np.testing.assert_array_equal, load_hf_weights(tmp_path / "base"), params)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    jax.tree.map(np.testing.assert_array_equal, load_hf_weights(tmp_path / "sharded"), params)


def test_half_precision_weights_are_upcast(hf_model, loaded, tmp_path):
    model, _ = hf_model
    _, params = loaded
    tensors = {k: v.astype(np.float16) for k, v in _hub_layout(model).items()}
    _save(tensors, tmp_path / "fp16.safetensors")
    half = load_hf_weights(tmp_path / "fp16.safetensors")
    assert half["wte"]["embedding"].dtype == jnp.float32
    np.testing.assert_allclose(half["h_1"]["mlp"]["c_fc"]["kernel"], params["h_1"]["mlp"]["c_fc"]["kernel"], atol=3e-3)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("h.1.mlp.c_fc.bias"), r"missing keys \['h\.1\.mlp\.c_fc\.bias'\]"),
        (
            lambda t: t.update({"h.0.attn.q_proj.weight": np.zeros((32, 32), np.float32)}),
            r"unexpected keys \['h\.0\.attn\.q_proj",
        ),
        (
            lambda t: t.update({"h.1.mlp.c_fc.weight": np.zeros((128, 32), np.float32)}),
            r"'h\.1\.mlp\.c_fc\.weight' has shape \(128, 32\), expected \(32, 128\)",
        ),
        (lambda t: t.update({"lm_head.weight": t["wte.weight"] + 1}), "only tied"),
        (lambda t: [t.pop(k) for k in list(t) if k.startswith("w")], "Not a GPT-2 checkpoint"),
        (lambda t: t.update({"transformer.ln_f.bias": t["ln_f.bias"]}), "both 'ln_f.bias'"),
    ],
    ids=["missing", "unexpected", "shape", "untied-head", "not-gpt2", "both-layouts"],
)
def test_bad_checkpoints_name_the_key(hf_model, tmp_path, edit, message):
    model, _ = hf_model
    tensors = _hub_layout(model)
    edit(tensors)
    _save(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        load_hf_weights(tmp_path / "model.safetensors")


def test_config_mismatch_is_reported(hf_model, tmp_path):
    model, _ = hf_model
    _save(_hub_layout(model), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"n_layer=3.*missing keys \['h\.2\."):
        load_hf_weights(
            tmp_path / "model.safetensors",
            config=GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=3, n_head=2),
        )


def test_unreadable_and_absent_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"cannot read .* as a safetensors file"):
        load_hf_weights(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"Give the path of a GPT-2 model\.safetensors file"):
        load_hf_weights(tmp_path / "absent" / "model.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"No model\.safetensors"):
        load_hf_weights(tmp_path / "empty")


def test_offline_hub_id_says_offline_and_how_to_give_weights(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        FileNotFoundError, match=r"offline or unreachable.*Give the path of a GPT-2 model\.safetensors file"
    ):
        load_hf_weights("openai-community/gpt2")


def test_peft_name_map():
    assert gpt2_lib.torch_param_name("h_3/attn/c_attn/kernel") == "transformer.h.3.attn.c_attn.weight"
    assert gpt2_lib.torch_param_name("h_0/ln_1/scale") == "transformer.h.0.ln_1.weight"
    assert gpt2_lib.torch_param_name("wte/embedding") == "transformer.wte.weight"
    assert gpt2_lib.torch_module_name("h_11/mlp/c_proj") == ("transformer.h.11.mlp.c_proj", "conv1d")
    assert gpt2_lib.torch_module_name("head") == ("score", "linear")
    with pytest.raises(KeyError, match="h_0/attn/q_proj"):
        gpt2_lib.torch_module_name("h_0/attn/q_proj")


def test_presets_have_published_sizes():
    expected = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}
    for name, count in expected.items():
        config = GPT2Config.from_name(name)
        shapes = jax.eval_shape(lambda c=config: GPT2(c).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
        assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == count, name
    assert GPT2Config.from_name("openai-community/gpt2-xl", dropout=0.0).n_head == 25
    with pytest.raises(ValueError, match="gpt2-medium"):
        GPT2Config.from_name("gpt3")
    with pytest.raises(ValueError, match="divisible"):
        GPT2Config(n_embd=30, n_head=4)


def test_hf_config_json_roundtrip(tmp_path):
    hf = _hf_config(activation_function="gelu", n_inner=40, resid_pdrop=0.0).to_dict()
    config = GPT2Config.from_hf_dict(json.loads(json.dumps(hf)))
    assert (config.activation, config.mlp_width, config.dropout) == ("gelu", 40, 0.0)
