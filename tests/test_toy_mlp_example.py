"""The PEFT toy-MLP walkthrough, in its --quick mode, plus the walkthrough's parameter counts at full size."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import load_example

import jaxlora


@pytest.fixture(scope="module")
def example():
    return load_example("toy_mlp")


@pytest.fixture(scope="module")
def facts(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_mlp")
    return example.run(example.parse_args(["--quick", "--out", str(out)]))


def test_full_size_counts_match_the_walkthrough(example):
    # shapes only (jax.eval_shape): the published numbers 442,602 / 12,660 of 455,262 / 13,062
    model = example.MLP(example.FULL.hidden)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 20), np.float32))["params"])
    cfg = jaxlora.LoraConfig(rank=3, alpha=8.0, targets=(r"Dense_[01]/kernel",))
    plan = jaxlora.plan(params, cfg)
    assert plan.num_original == 442_602
    assert plan.num_lora == 12_660
    assert plan.num_original + plan.num_lora == 455_262
    with_head = dataclasses.replace(cfg, modules_to_save=(r"Dense_2/.*",))
    assert jaxlora.plan(params, with_head).num_trainable == 13_062


@pytest.mark.slow
def test_quick_counts(facts):
    f, (h0, h1) = facts["sizes"]["features"], facts["sizes"]["hidden"]
    assert facts["base_params"] == f * h0 + h0 + h0 * h1 + h1 + h1 * 2 + 2
    assert facts["lora_params"] == 3 * (f + h0) + 3 * (h0 + h1)
    assert facts["lora_all_params"] == facts["base_params"] + facts["lora_params"]
    assert facts["head_trainable"] == facts["lora_params"] + h1 * 2 + 2


@pytest.mark.slow
def test_adapters_start_as_a_no_op(facts):
    assert facts["update_zero_at_init"]
    np.testing.assert_allclose(facts["adapted_loss_at_init"], facts["pretrained_loss"], rtol=1e-6)
    # one epoch on the task the base already learnt: the loss stays about where pretraining left it
    assert 0.7 * facts["pretrained_loss"] < facts["same_task_loss"] < 1.05 * facts["pretrained_loss"]


@pytest.mark.slow
def test_downstream_training_learns_and_freezes_the_base(facts):
    for history in (facts["downstream_lora_history"], facts["downstream_head_history"]):
        assert history[-1] < history[0]
    assert facts["downstream_loss"] < facts["downstream_base_loss"]
    # measured on rows it never trained on: the adapter generalises, it does not only fit its training rows
    assert facts["downstream_heldout_loss"] < 0.9 * facts["downstream_heldout_base_loss"]
    assert facts["downstream_heldout_accuracy"] > 0.65  # quick mode measured 0.724 (chance: about 0.5)
    assert facts["base_unchanged"] and facts["frozen_unchanged"]


@pytest.mark.slow
def test_merge_gives_a_plain_model_with_the_same_outputs(facts):
    assert facts["merged_params"] == facts["base_params"]
    assert facts["merged_same_structure"]
    assert facts["merged_max_diff"] < 1e-5


@pytest.mark.slow
def test_reload_in_a_new_process(facts):
    assert set(facts["reload"]) == {"orbax checkpoint", "PEFT file"}
    for diff in facts["reload"].values():
        assert diff < 1e-6
    # float32 adapters and head, plus a small JSON header
    assert 4 * facts["head_trainable"] <= facts["peft_file_bytes"] <= 4 * facts["head_trainable"] + 4096


@pytest.mark.slow
def test_analysis_figures(facts):
    assert set(facts["amplification"]) == {"Dense_0/kernel", "Dense_1/kernel"}
    assert all(np.isfinite(v) and v > 0 for v in facts["amplification"].values())
    for phi in facts["similarity"].values():
        assert phi.shape == (3, 3)
        assert phi.min() >= 0.0 and phi.max() <= 1.0 + 1e-5
    assert Path(facts["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
