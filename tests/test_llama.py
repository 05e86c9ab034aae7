"""Llama / Qwen2 in flax NNX against Hugging Face transformers: logits, generation, KV cache, checkpoints, layouts."""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxlora.models import kv_cache, llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 101
ATOL = 1e-4
# rope_scaling of Llama 3.1's kind, with a short original context so that the tiny sequences here span all
# three of its frequency bands (kept, blended, divided).
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
CHECKPOINTS = {
    # GQA everywhere: 4 query heads share 2 key/value heads.
    "llama-untied-rope3": ("llama", dict(tie_word_embeddings=False, rope_scaling=LLAMA3_ROPE, rope_theta=500.0)),
    "llama-tied-bias": ("llama", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-untied": ("qwen2", dict(tie_word_embeddings=False, num_key_value_heads=1)),
}


def hf_config(kind: str, **overrides):
    # A large initializer_range spreads the random logits out, so greedy decoding produces varied tokens.
    kw = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, initializer_range=0.3, max_position_embeddings=64, attn_implementation="eager",
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    kw.update(overrides)
    return (transformers.LlamaConfig if kind == "llama" else transformers.Qwen2Config)(**kw)


def hf_model(kind: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = hf_config(kind, **overrides)
    cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.Qwen2ForCausalLM
    model = cls(config).eval()
    with torch.no_grad():  # random biases and norm scales, so that a missed or misplaced one shows
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.2 * torch.randn(param.shape))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (transformers model, directory of its save_pretrained safetensors checkpoint)."""
    out = {}
    for i, (name, (kind, overrides)) in enumerate(CHECKPOINTS.items()):
        model = hf_model(kind, seed=i, **copy.deepcopy(overrides))  # transformers edits rope dicts in place
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory, safe_serialization=True)
        out[name] = model, directory
    return out


def _ids(shape, seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, shape)


def _torch_logits(model, ids, mask=None):
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kwargs).logits.float().numpy()


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_logits_match_transformers(checkpoints, name, scan):
    reference, directory = checkpoints[name]
    model = llama.load_hf_weights(directory, scan_layers=scan)
    assert model.scan_layers is scan and model.dtype == jnp.float32
    ids = _ids((2, 24))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), _torch_logits(reference, ids), atol=ATOL, rtol=0)


def test_left_padding_matches_transformers(checkpoints):
    reference, directory = checkpoints["qwen2-untied"]
    model = llama.load_hf_weights(directory)
    ids, mask = _ids((2, 11), seed=1), np.ones((2, 11), np.int64)
    mask[0, :4] = 0
    got = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(got[mask == 1], _torch_logits(reference, ids, mask)[mask == 1], atol=ATOL, rtol=0)


def test_parameter_tree_and_layouts(checkpoints):
    _, directory = checkpoints["llama-untied-rope3"]
    scanned = llama.load_hf_weights(directory)
    unrolled = llama.load_hf_weights(directory, scan_layers=False)
    stacked = nnx.to_pure_dict(nnx.state(scanned))
    assert stacked["layers"]["self_attn"]["k_proj"]["kernel"].shape == (2, 32, 16)  # (L, hidden, kv_heads * d)
    assert set(stacked) == {"embed_tokens", "layers", "norm", "lm_head"}
    flat = nnx.to_pure_dict(nnx.state(unrolled))
    assert flat["layers"][1]["mlp"]["down_proj"]["kernel"].shape == (64, 32)
    jax.tree.map(np.testing.assert_array_equal, llama.unstack_layers(stacked), flat)
    jax.tree.map(np.testing.assert_array_equal, llama.stack_layers(flat), stacked)
    for source, target in ((scanned, unrolled), (unrolled, scanned)):
        converted = llama.convert_layout(source, scan_layers=target.scan_layers)
        assert converted.scan_layers is target.scan_layers
        jax.tree.map(np.testing.assert_array_equal, nnx.state(converted), nnx.state(target))
        ids = jnp.asarray(_ids((1, 5)))
        np.testing.assert_allclose(converted(ids), source(ids), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unrolled already"):
        llama.unstack_layers(flat)
    with pytest.raises(ValueError, match=r"keys 0\.\.L-1"):
        llama.stack_layers(stacked)


@pytest.mark.parametrize(
    ("name", "scan"), [("llama-untied-rope3", True), ("llama-untied-rope3", False), ("qwen2-tied", True)]
)
def test_greedy_generation_matches_transformers(checkpoints, name, scan):
    reference, directory = checkpoints[name]
    model = llama.load_hf_weights(directory, scan_layers=scan)
    prompt = _ids((2, 5), seed=2)
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor(prompt), attention_mask=torch.ones(2, 5, dtype=torch.long), max_new_tokens=12,
            do_sample=False, pad_token_id=0,
        ).numpy()  # fmt: skip
    assert len(set(expected[0, 5:].tolist())) > 2, "degenerate reference: pick another seed"
    np.testing.assert_array_equal(np.asarray(llama.generate(model, prompt, max_new_tokens=12)), expected)
    if not scan:
        np.testing.assert_array_equal(np.asarray(llama.generate(model, prompt[1], max_new_tokens=12)), expected[1])


def test_greedy_generation_with_left_padding_and_eos_matches_transformers(checkpoints):
    reference, directory = checkpoints["llama-untied-rope3"]
    model = llama.load_hf_weights(directory)
    prompt, mask = _ids((3, 6), seed=3), np.ones((3, 6), np.int64)
    mask[1, :3] = mask[2, :1] = 0
    prompt[mask == 0] = 0
    with torch.no_grad():
        free = reference.generate(
            torch.tensor(prompt), attention_mask=torch.tensor(mask), max_new_tokens=10, do_sample=False,
            pad_token_id=0,
        ).numpy()  # fmt: skip
    eos = int(free[1, 8])  # a token that row 1 emits early; the other rows may emit it later or never
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor(prompt), attention_mask=torch.tensor(mask), max_new_tokens=10, do_sample=False,
            pad_token_id=VOCAB - 1, eos_token_id=eos,
        ).numpy()  # fmt: skip
    got = np.asarray(llama.generate(model, prompt, 10, attention_mask=mask, eos_token_id=eos, pad_token_id=VOCAB - 1))
    np.testing.assert_array_equal(got[:, : expected.shape[1]], expected)  # transformers stops once all rows end
    assert (got[:, expected.shape[1] :] == VOCAB - 1).all()
    assert (got[1, 9:] == VOCAB - 1).all() and got[1, 8] == eos


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_kv_cache_decoding_equals_full_recomputation(checkpoints, scan):
    """Each cache row holds its own tokens from slot 0: a prefill of prompts of 3 and 6 tokens (row 0
    right-padded), each row's length then set to its real tokens, then a token per step at each row's own offset,
    gives every row the logits of the uncached model run on that row's tokens alone."""
    _, directory = checkpoints["qwen2-untied"]
    model = llama.load_hf_weights(directory, scan_layers=scan)
    ids, real = _ids((2, 14), seed=4), np.array([3, 6])
    cache = llama.init_cache(model.config, batch=2, max_length=16)
    logits, cache = model(jnp.asarray(ids[:, :6]), kv_cache=cache)
    assert cache.lengths.tolist() == [6, 6]
    cache = kv_cache.advance(cache, jnp.asarray(real - 6))  # row 0 forgets its padding, which it then overwrites
    steps = [[np.asarray(logits[row, : real[row]])] for row in range(2)]
    decode = nnx.jit(lambda m, token, c: m.decode(token, c))  # the alias of m(token, kv_cache=c)
    for t in range(8):
        logits, cache = decode(model, jnp.asarray(ids[[0, 1], real + t][:, None]), cache)
        for row in range(2):
            steps[row].append(np.asarray(logits[row]))
    assert cache.lengths.tolist() == [11, 14]
    for row, n in enumerate((11, 14)):
        full = np.asarray(model(jnp.asarray(ids[row : row + 1, :n])))[0]
        np.testing.assert_allclose(np.concatenate(steps[row]), full, atol=1e-5, rtol=0, err_msg=f"row {row}")


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_left_padded_rows_decode_as_each_prompt_alone_without_a_cache(checkpoints, scan):
    """generate of a left-padded batch of prompts of different lengths gives every row the greedy tokens of the
    uncached model (its plain forward over a growing buffer, no KV cache) run on that prompt alone."""
    _, directory = checkpoints["llama-untied-rope3"]
    model = llama.load_hf_weights(directory, scan_layers=scan)
    prompts = [_ids((n,), seed=10 + n) for n in (7, 1, 4)]
    ids, mask = np.zeros((3, 7), np.int64), np.zeros((3, 7), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, 7 - len(prompt) :], mask[row, 7 - len(prompt) :] = prompt, 1
    got = np.asarray(llama.generate(model, ids, 9, attention_mask=mask))
    np.testing.assert_array_equal(got[:, :7], ids)  # the prompt as given, then the new tokens
    forward = nnx.jit(lambda m, buffer: m(buffer))
    for row, prompt in enumerate(prompts):
        buffer = np.zeros((1, 16), np.int64)  # one shape for every prompt: causal, so the tail changes nothing
        buffer[0, : len(prompt)] = prompt
        for n in range(len(prompt), len(prompt) + 9):
            buffer[0, n] = np.argmax(np.asarray(forward(model, jnp.asarray(buffer)))[0, n - 1])
        np.testing.assert_array_equal(got[row, 7:], buffer[0, len(prompt) : len(prompt) + 9], err_msg=f"row {row}")
    assert len(set(got[0, 7:].tolist())) > 2, "degenerate reference: pick other seeds"


def test_sampling_filters_match_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = np.random.RandomState(5).standard_normal((3, VOCAB)).astype(np.float32) * 3
    for top_k, top_p in ((5, 1.0), (None, 0.8), (7, 0.5), (None, 0.05)):
        want = torch.tensor(logits)
        if top_k is not None:
            want = TopKLogitsWarper(top_k)(None, want)
        if top_p < 1.0:
            want = TopPLogitsWarper(top_p)(None, want)
        got = np.asarray(llama.filter_logits(jnp.asarray(logits), top_k or 0, top_p))
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want.numpy()), err_msg=f"{top_k=} {top_p=}")
        np.testing.assert_array_equal(got[np.isfinite(got)], logits[np.isfinite(got)])


def test_sampled_generation(checkpoints):
    _, directory = checkpoints["qwen2-tied"]
    model = llama.load_hf_weights(directory)
    prompt = _ids((4, 3), seed=6)
    greedy = np.asarray(llama.generate(model, prompt, 8))

    def sample(seed, **kw):
        return np.asarray(llama.generate(model, prompt, 8, rng=jax.random.key(seed), **kw))

    np.testing.assert_array_equal(sample(0, top_k=1), greedy)  # only the argmax survives
    np.testing.assert_array_equal(sample(0, temperature=1e-4), greedy)
    np.testing.assert_array_equal(sample(1), sample(1))
    assert not np.array_equal(sample(1), sample(2))
    assert not np.array_equal(sample(1, temperature=5.0), greedy)
    for bad, message in (
        (dict(temperature=0.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
    ):
        with pytest.raises(ValueError, match=message):
            sample(0, **bad)
    with pytest.raises(ValueError, match="pad batched prompts on the left"):
        llama.generate(model, prompt, 2, attention_mask=np.array([[1, 1, 0]] * 4))


def test_sharded_and_bfloat16_checkpoints(checkpoints, tmp_path):
    reference, directory = checkpoints["llama-untied-rope3"]
    reference.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    for scan in (True, False):
        sharded = nnx.to_pure_dict(nnx.state(llama.load_hf_weights(tmp_path / "sharded", scan_layers=scan)))
        single = nnx.to_pure_dict(nnx.state(llama.load_hf_weights(directory, scan_layers=scan)))
        jax.tree.map(np.testing.assert_array_equal, sharded, single)

    half = hf_model("llama", seed=0, **copy.deepcopy(CHECKPOINTS["llama-untied-rope3"][1])).to(torch.bfloat16)
    half.save_pretrained(tmp_path / "bf16")
    model = llama.load_hf_weights(tmp_path / "bf16")  # dtype=None keeps the checkpoint's
    leaves = jax.tree.leaves(nnx.state(model))
    assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.bfloat16)}
    q = half.model.layers[1].self_attn.q_proj.weight.detach()
    ours = np.asarray(model.layers.self_attn.q_proj.kernel[1]).T
    np.testing.assert_array_equal(ours.view(np.uint16), q.view(torch.int16).numpy().view(np.uint16))  # bit-exact
    ids = _ids((2, 10), seed=7)
    got = np.asarray(model(jnp.asarray(ids)).astype(jnp.float32))
    want = _torch_logits(half, ids)
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()  # bf16 rounding, not a wrong model
    as_float32 = llama.load_hf_weights(tmp_path / "bf16", dtype=jnp.float32)
    assert as_float32.dtype == jnp.float32


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_save_hf_weights_loads_in_transformers(checkpoints, tmp_path, scan):
    reference, directory = checkpoints["llama-tied-bias"]
    model = llama.load_hf_weights(directory, scan_layers=scan)
    llama.save_hf_weights(model, tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(again) is type(reference)
    ids = _ids((2, 9), seed=8)
    np.testing.assert_allclose(_torch_logits(again, ids), _torch_logits(reference, ids), atol=1e-6, rtol=0)
    assert llama.config_from_hf(tmp_path / "out") == model.config


def test_config_reads_transformers_4_rope_keys():
    v4 = {
        "model_type": "llama", "vocab_size": 10, "hidden_size": 16, "intermediate_size": 8, "num_hidden_layers": 1,
        "num_attention_heads": 2, "rope_theta": 500000.0, "rope_scaling": {**LLAMA3_ROPE, "rope_type": "llama3"},
    }  # fmt: skip
    config = llama.LlamaConfig.from_hf_dict(v4)
    assert config.rope_theta == 500000.0 and config.rope_scaling_dict == LLAMA3_ROPE
    assert config.num_key_value_heads == 2 and not config.tie_word_embeddings
    v5 = hf_config("llama", rope_scaling=dict(LLAMA3_ROPE), rope_theta=500000.0).to_dict()
    assert llama.LlamaConfig.from_hf_dict(v5).rope_scaling_dict == LLAMA3_ROPE


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(model_type="mistral"), "model_type='mistral'"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(use_sliding_window=True), "sliding-window"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}), "rope_type='yarn'"),
        (dict(num_key_value_heads=3), "multiple of num_key_value_heads=3"),
    ],
)
def test_unsupported_configs_are_named(change, message):
    hf = {**hf_config("qwen2").to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        llama.LlamaConfig.from_hf_dict(hf)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), r"missing keys \['model\.layers\.1\.mlp\.up_proj"),
        (
            lambda t: t.update({"model.layers.2.mlp.up_proj.weight": t["model.layers.1.mlp.up_proj.weight"]}),
            r"unexpected keys \['model\.layers\.2\.mlp",
        ),
        (
            lambda t: t.update({"model.norm.weight": np.ones(7, np.float32)}),
            r"'model\.norm\.weight' has shape \(7,\), expected \(32,\)",
        ),
        (lambda t: t.pop("model.embed_tokens.weight"), "no 'model.embed_tokens.weight'"),
    ],
    ids=["missing", "unexpected", "shape", "not-llama"],
)
def test_bad_checkpoints_name_the_key(checkpoints, tmp_path, edit, message):
    _, directory = checkpoints["llama-untied-rope3"]
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(ValueError, match=message):
        llama.load_hf_weights(tmp_path)


def test_untied_head_in_a_tied_checkpoint_is_refused(checkpoints, tmp_path):
    _, directory = checkpoints["qwen2-tied"]
    tensors = load_file(directory / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(ValueError, match=r"lm_head\.weight differs"):
        llama.load_hf_weights(tmp_path)


def test_absent_unreadable_and_offline(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        llama.load_hf_weights(tmp_path / "absent")
    (tmp_path / "config.json").write_text(json.dumps(hf_config("llama").to_dict()))
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        llama.load_hf_weights(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="could not read"):
        llama.load_hf_weights(tmp_path)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"could not get 'Qwen/Qwen2\.5-0\.5B'.*offline"):
        llama.load_hf_weights("Qwen/Qwen2.5-0.5B")


def test_model_input_errors(checkpoints):
    _, directory = checkpoints["qwen2-tied"]
    model = llama.load_hf_weights(directory)
    with pytest.raises(ValueError, match=r"shape \(batch, length\).*ids\[None\]"):
        model(jnp.zeros((5,), jnp.int32))
    assert llama.hf_param_name("lm_head/kernel") == "lm_head.weight"
    with pytest.raises(KeyError, match="no Llama parameter"):
        llama.hf_param_name("layers/0/attn/c_attn/kernel")
