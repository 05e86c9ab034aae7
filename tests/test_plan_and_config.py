"""Config serialisation, the dry-run plan and its table, and the clear errors for bad input."""

from __future__ import annotations

import dataclasses
import inspect
import re

import jax
import jax.numpy as jnp
import pytest
from models import MLP

import jaxlora


def _mnist_shapes():
    model = MLP((1000, 2000, 10))
    return jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 784)))["params"]


def test_mnist_mlp_rank1_table_shows_the_published_counts_without_allocating():
    params = _mnist_shapes()  # ShapeDtypeStructs: the dry run allocates nothing
    resolved = jaxlora.plan(params, jaxlora.LoraConfig(rank=1, alpha=1.0))
    assert (resolved.num_original, resolved.num_lora) == (2_807_010, 6_794)
    table = str(resolved)
    for text in ("2,807,010", "2,813,804", "6,794", "0.242%", "(784, 1000)", "(1000)", "(784, 1)", "(1, 1000)"):
        assert text in table
    assert [leaf.a_shape for leaf in resolved.leaves.values()] == [(784, 1), (1000, 1), (2000, 1)]


def test_config_round_trips_through_json_and_warns_on_unknown_keys():
    config = jaxlora.LoraConfig(
        rank=4,
        alpha=8,
        rank_pattern={"a/.*": 2},
        alpha_pattern={"b/.*": 1.5},
        use_rslora=True,
        dropout=0.1,
        modules_to_save=("head/.*",),
        fan_in_ndim={"c/kernel": 1},
        init="gaussian",
        init_std=0.5,
    )
    assert jaxlora.LoraConfig.from_json(config.to_json()) == config
    with pytest.warns(UserWarning, match=r"unknown keys \['from_the_future'\]"):
        again = jaxlora.LoraConfig.from_dict({**config.to_dict(), "from_the_future": 1})
    assert again == config


@pytest.mark.parametrize(
    ("keyword", "value", "field"),
    [
        ("r", 4, "rank"),  # Hugging Face PEFT's names
        ("lora_alpha", 8.0, "alpha"),
        ("target_modules", ("dense/kernel",), "targets"),
        ("lora_dropout", 0.1, "dropout"),
        ("exclude_modules", ("head/kernel",), "exclude"),
        ("init_lora_weights", "gaussian", "init"),
        ("ranks", 4, "rank"),  # typos
        ("alhpa", 2.0, "alpha"),
        ("stacked_axis", {"h/.*": 1}, "stacked_axes"),
        ("use_rs_lora", True, "use_rslora"),
    ],
)
def test_an_unknown_keyword_names_itself_and_the_field_that_fixes_it(keyword, value, field):
    """The refusal names the keyword and a field; that field, given the same value, builds the config."""
    with pytest.raises(TypeError, match=rf"unknown keyword '{keyword}': .*\b{field}=") as err:
        jaxlora.LoraConfig(**{keyword: value})
    assert "unexpected keyword argument" not in str(err.value)  # not the bare dataclass error
    assert getattr(jaxlora.LoraConfig(**{field: value}), field) is not None


def test_unknown_keywords_without_a_near_field_list_the_fields_and_known_ones_still_work():
    fields = r"LoraConfig's fields are rank, alpha, targets"
    with pytest.raises(TypeError, match=rf"unknown keywords 'lora_alpha': .*alpha=.*; 'zzz': {fields}"):
        jaxlora.LoraConfig(rank=4, lora_alpha=8, zzz=1)
    with pytest.raises(TypeError, match=r"'bias': jaxlora adds no bias adapters.*modules_to_save"):
        jaxlora.LoraConfig(bias="none")
    with pytest.raises(TypeError, match=r"unknown keyword 'r': .*rank="):
        dataclasses.replace(jaxlora.LoraConfig(), r=2)  # replace goes through the same check
    assert jaxlora.LoraConfig(4, 8.0).alpha == 8.0  # positional arguments and the signature are unchanged
    assert list(inspect.signature(jaxlora.LoraConfig).parameters)[:2] == ["rank", "alpha"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "LoraConfig.from_dict expects a mapping of field names to values (a JSON object), got list"),
        ('"rank"', "expects a mapping of field names to values (a JSON object), got str"),
        ('{"targets": 123}', "LoraConfig.targets must be a regex string or a list of regex strings, got int 123"),
        ('{"exclude": [1]}', "LoraConfig.exclude must be a regex string or a list of regex strings, got list [1]"),
        ('{"modules_to_save": {"a": 1}}', "LoraConfig.modules_to_save must be a regex string or a list of regex"),
        ('{"rank_pattern": [["a", 2]]}', "LoraConfig.rank_pattern must be a mapping (JSON object) from regex strings"),
        ('{"fan_in_ndim": 2}', "LoraConfig.fan_in_ndim must be a mapping (JSON object) from regex strings"),
        ('{"use_rslora": "yes"}', "LoraConfig.use_rslora must be a bool (true or false), got str 'yes'"),
        ('{"dropout": "0.1"}', "LoraConfig.dropout must be a number in [0, 1), got str '0.1'"),
        ('{"init_std": [1]}', "LoraConfig.init_std must be a number > 0 or None, got list [1]"),
        ('{"init": ["kaiming"]}', "LoraConfig.init must be one of"),
        ('{"rank": "8"}', "LoraConfig.rank must be a positive int, got '8'"),
        ("{rank: 8}", "Expecting property name enclosed in double quotes"),  # json.JSONDecodeError is a ValueError
    ],
)
def test_malformed_json_raises_value_error_naming_the_field_and_expected_type(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        jaxlora.LoraConfig.from_json(text)


def test_scales_follow_alpha_over_rank_rslora_and_per_path_overrides():
    config = jaxlora.LoraConfig(rank=4, alpha=8.0, rank_pattern={"x": 16}, alpha_pattern={"y": 2.0})
    assert config.scale_for("z") == 2.0 and config.scale_for("x") == 0.5 and config.scale_for("y") == 0.5
    rs = jaxlora.LoraConfig(rank=4, alpha=8.0, use_rslora=True)
    assert rs.scale_for("z") == 4.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be a positive int, got 0"),
        ({"rank": 2.5}, "rank must be a positive int"),
        ({"alpha": 0}, "alpha must be a finite number > 0"),
        ({"alpha": float("nan")}, "alpha must be a finite number > 0"),
        ({"rank_pattern": {"x": -1}}, r"rank_pattern\['x'\] must be a positive int"),
        ({"targets": ("(",)}, "targets: '\\(' is not a valid regular expression"),
        ({"init": "orthogonal"}, "init must be one of"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"targets": ()}, "targets is empty"),
    ],
)
def test_bad_config_values_are_refused_with_the_field_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jaxlora.LoraConfig(**kwargs)


def test_predicate_selects_but_cannot_be_serialised():
    config = jaxlora.LoraConfig(rank=1, predicate=lambda path, leaf: leaf.shape[1] > 100)
    assert list(jaxlora.plan(_mnist_shapes(), config).leaves) == ["linear1/kernel", "linear2/kernel"]
    with pytest.raises(ValueError, match="predicate is a Python callable"):
        config.to_dict()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"targets": ("linear9/kernel",)}, r"targets: \['linear9/kernel'\] match no parameter path"),
        ({"exclude": ("nothing",)}, r"exclude: \['nothing'\] match no parameter path"),
        ({"modules_to_save": ("head/.*",)}, r"modules_to_save: \['head/.\*'\] match no parameter path"),
        ({"rank_pattern": {"linear1/bias": 2}}, r"rank_pattern: \['linear1/bias'\] match no parameter path"),
        ({"targets": ("linear1/bias",)}, r"LoRA target 'linear1/bias' is a float32 array of shape \(1000,\)"),
        ({"rank": 11}, r"rank 11 for 'linear3/kernel' exceeds min\(fan_in, fan_out\) = 10"),
        ({"modules_to_save": ("linear1/kernel",)}, "both LoRA targets and modules_to_save"),
        ({"fan_in_ndim": {"linear1/kernel": 2}}, "leaves no output axis"),
    ],
)
def test_config_that_does_not_fit_the_params_names_the_path_and_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jaxlora.plan(_mnist_shapes(), jaxlora.LoraConfig(**kwargs))


def test_integer_leaf_targets_are_refused():
    params = {"table": jnp.zeros((4, 4), jnp.int32)}
    with pytest.raises(ValueError, match=r"'table' is a int32 array.*floating-point"):
        jaxlora.plan(params, jaxlora.LoraConfig(rank=1, targets=("table",)))


def test_adapters_from_another_config_or_other_params_are_refused():
    params = jax.tree.map(jnp.zeros_like, _mnist_shapes())
    config = jaxlora.LoraConfig(rank=1)
    _, adapters = jaxlora.init(jax.random.key(0), params, config)
    with pytest.raises(ValueError, match=r"adapter linear1/kernel/lora_a has shape \(784, 1\), but the plan gives"):
        jaxlora.merge(params, adapters, jaxlora.LoraConfig(rank=2))
    with pytest.raises(ValueError, match=r"adapters for leaves the config does not target: \['linear3/kernel'\]"):
        jaxlora.merge(params, adapters, jaxlora.LoraConfig(rank=1, exclude=("linear3/kernel",)))
    with pytest.raises(ValueError, match="must hold exactly 'lora_a' and 'lora_b'"):
        jaxlora.merge(params, {"linear1": {"kernel": {"lora_a": 1}}}, config)


def test_merge_refuses_non_finite_results_naming_the_path():
    params = jax.tree.map(jnp.zeros_like, _mnist_shapes())
    config = jaxlora.LoraConfig(rank=1)
    _, adapters = jaxlora.init(jax.random.key(0), params, config)
    adapters["linear2"]["kernel"]["lora_b"] = adapters["linear2"]["kernel"]["lora_b"].at[0, 3].set(jnp.inf)
    with pytest.raises(FloatingPointError, match="'linear2/kernel' gives NaN or Inf"):
        jaxlora.merge(params, adapters, config)
