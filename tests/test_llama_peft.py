"""LoRA on the unrolled Llama / Qwen2 through jaxlora, and PEFT adapter directories both ways against real ``peft``."""

from __future__ import annotations

import json
import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxlora
from jaxlora.models import llama
from jaxlora.peft_format import load_peft, save_peft

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 101
ATOL = 1e-4
PEFT_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hf_checkpoint(directory, kind: str, tied: bool):
    torch.manual_seed(0)
    kw = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, initializer_range=0.3, tie_word_embeddings=tied, attn_implementation="eager",
    )  # fmt: skip
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny untied Llama checkpoint and the same weights in our unrolled layout, split for jaxlora."""
    directory = _hf_checkpoint(tmp_path_factory.mktemp("llama"), "llama", tied=False)
    model = llama.load_hf_weights(directory, scan_layers=False)
    return directory, model


def _torch_base(directory):
    return transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()


def _tokens() -> np.ndarray:
    return np.random.default_rng(1).integers(0, VOCAB, (2, 12))


def _randomise(adapters, seed: int, std: float = 0.2):
    """Trained-looking adapters: every A and B non-zero."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noise = [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, noise)


def _load_without_peft_warnings(model, directory, caplog):
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(model, str(directory)).eval()
    from_peft = [f"{w.category.__name__}: {w.message}" for w in caught if "/peft/" in w.filename]
    from_peft += [r.getMessage() for r in caplog.records if r.name.startswith("peft")]
    assert from_peft == []
    return loaded


def _logits_with(graphdef, state, adapters, config, ids) -> np.ndarray:
    return np.asarray(nnx.merge(graphdef, jaxlora.merge(state, adapters, config))(jnp.asarray(ids)))


def test_jax_to_peft(tmp_path, tiny_llama, caplog):
    directory, model = tiny_llama
    graphdef, state = nnx.split(model)
    config = jaxlora.LoraConfig(
        rank=4,
        alpha=8.0,
        targets=(llama.PEFT_TARGETS,),
        rank_pattern={r"layers/1/mlp/up_proj/kernel": 2},
        alpha_pattern={r"layers/0/self_attn/v_proj/kernel": 3.0},
        modules_to_save=(r"norm/scale",),
    )
    state, adapters = jaxlora.init(jax.random.key(1), state, config)
    assert len(jaxlora.plan(state, config).leaves) == 14  # 7 linears x 2 layers
    adapters = _randomise(adapters, 2)
    state["norm"]["scale"] = nnx.Param(state["norm"]["scale"][...] * 1.5 + 0.1)  # a trained modules_to_save leaf
    save_peft(
        tmp_path / "adapter", state, adapters, config, name_map=llama.peft_name_map(model.config),
        base_model_name_or_path=str(directory), task_type="CAUSAL_LM",
    )  # fmt: skip
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["rank_pattern"] == {"model.layers.1.mlp.up_proj": 2}
    assert written["modules_to_save"] == ["model.norm"] and written["fan_in_fan_out"] is False

    peft_model = _load_without_peft_warnings(_torch_base(directory), tmp_path / "adapter", caplog)
    with torch.no_grad():
        got = peft_model(input_ids=torch.tensor(_tokens())).logits.numpy()
    want = _logits_with(graphdef, state, adapters, config, _tokens())
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    base = np.asarray(model(jnp.asarray(_tokens())))
    assert not np.allclose(want, base, atol=1e-2)


def test_peft_to_jax(tmp_path, tiny_llama):
    directory, model = tiny_llama
    peft_config = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=PEFT_MODULES,
        rank_pattern={"gate_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 5},
        use_rslora=True,
        task_type="CAUSAL_LM",
    )
    peft_model = peft.get_peft_model(_torch_base(directory), peft_config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = peft_model.eval()(input_ids=torch.tensor(_tokens())).logits.numpy()

    graphdef, state = nnx.split(model)
    state, adapters, plan = load_peft(tmp_path / "adapter", state, name_map=llama.peft_name_map(model.config))
    config = plan.config
    assert config.scale_for("layers/1/self_attn/q_proj/kernel") == 5 / 2
    assert config.rank_for("layers/0/mlp/gate_proj/kernel") == 2
    assert adapters["layers"]["1"]["mlp"]["down_proj"]["kernel"]["lora_a"].shape == (64, 4)
    np.testing.assert_allclose(_logits_with(graphdef, state, adapters, config, _tokens()), want, atol=ATOL, rtol=0)


def test_qwen2_tied_round_trip_through_peft(tmp_path, caplog):
    """Qwen2 (q/k/v biases, tied head): export, load in PEFT, and import the same directory back."""
    directory = _hf_checkpoint(tmp_path / "qwen2", "qwen2", tied=True)
    model = llama.load_hf_weights(directory, scan_layers=False)
    graphdef, state = nnx.split(model)
    config = jaxlora.LoraConfig(rank=2, alpha=4.0, targets=(llama.PEFT_TARGETS,))
    state, adapters = jaxlora.init(jax.random.key(3), state, config)
    adapters = _randomise(adapters, 4)
    name_map = llama.peft_name_map(model.config)
    save_peft(tmp_path / "adapter", state, adapters, config, name_map=name_map, task_type="CAUSAL_LM")
    peft_model = _load_without_peft_warnings(_torch_base(directory), tmp_path / "adapter", caplog)
    with torch.no_grad():
        got = peft_model(input_ids=torch.tensor(_tokens())).logits.numpy()
    want = _logits_with(graphdef, state, adapters, config, _tokens())
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    again_state, again_adapters, again_config = load_peft(tmp_path / "adapter", state, name_map=name_map)
    jax.tree.map(np.testing.assert_array_equal, again_adapters, adapters)
    np.testing.assert_allclose(_logits_with(graphdef, again_state, again_adapters, again_config, _tokens()), want)

    embed = jaxlora.LoraConfig(rank=2, targets=(r"embed_tokens/embedding",))
    _, embed_adapters = jaxlora.init(jax.random.key(5), state, embed)
    with pytest.raises(ValueError, match="tied to the output head"):
        save_peft(tmp_path / "embed", state, embed_adapters, embed, name_map=name_map)


def test_training_the_unrolled_model_changes_only_adapters(tiny_llama):
    """One optimiser step on the LoRA-merged NNX state: the base kernels stay, the loss falls."""
    import optax

    _, model = tiny_llama
    graphdef, state = nnx.split(model)
    config = jaxlora.LoraConfig(rank=4, alpha=8.0, targets=(llama.PEFT_TARGETS,))
    state, adapters = jaxlora.init(jax.random.key(1), state, config)
    trainable, frozen = jaxlora.partition(state, adapters, config)
    tx = jaxlora.optimizer(optax.adam(1e-2), config)
    opt_state = tx.init(trainable)
    ids = jnp.asarray(_tokens())

    @jax.jit
    def step(trainable, opt_state):
        def loss_fn(trainable):
            s, a = jaxlora.combine(trainable, frozen)
            logits = nnx.merge(graphdef, jaxlora.merge(s, a, config))(ids[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses = []
    for _ in range(5):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    new_state, _ = jaxlora.combine(trainable, frozen)
    q_kernel = lambda s: s["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
    np.testing.assert_array_equal(q_kernel(new_state), q_kernel(state))


def test_scanned_llama_lora_is_served_per_layer_and_exchanged_with_peft(tmp_path, tiny_llama, caplog):
    """The scanned layout: one adapter per stacked layer, served factored inside nnx.scan, per-layer PEFT keys."""
    directory, _ = tiny_llama
    model = llama.load_hf_weights(directory, scan_layers=True)
    params = nnx.state(model, nnx.Param)
    config = jaxlora.LoraConfig(
        rank=4, alpha=8.0, targets=(llama.PEFT_TARGETS_SCANNED,), stacked_axes=llama.STACKED_AXES
    )
    plan = jaxlora.plan(params, config)
    _, adapters = jaxlora.init(jax.random.key(1), params, plan)
    assert adapters["layers"]["self_attn"]["q_proj"]["kernel"]["lora_a"].shape[0] == model.config.num_hidden_layers
    ids = jnp.asarray(_tokens())
    np.testing.assert_array_equal(jaxlora.apply_nnx(model, adapters, plan, ids), model(ids))  # B = 0
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    noise = [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    adapters = jax.tree.unflatten(tree, [x + n for x, n in zip(leaves, noise, strict=True)])
    got = jaxlora.apply_nnx_fn(plan, strict=True)(model, adapters, ids)  # strict: nothing merged on the side

    name_map = llama.peft_name_map(model.config, scan_layers=True)
    save_peft(tmp_path / "adapter", params, adapters, plan, name_map=name_map, task_type="CAUSAL_LM")
    peft_model = _load_without_peft_warnings(_torch_base(directory), tmp_path / "adapter", caplog)
    with torch.no_grad():
        want = peft_model(input_ids=torch.tensor(_tokens())).logits.numpy()
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    _, again, again_plan = load_peft(tmp_path / "adapter", params, name_map=name_map)
    assert again_plan.leaves["layers/mlp/down_proj/kernel"].stacked_axes == 1
    np.testing.assert_allclose(jaxlora.apply_nnx(model, again, again_plan, ids), want, atol=ATOL, rtol=0)
