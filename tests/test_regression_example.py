"""The shifted-regression example, in its --quick mode: the structural facts of the story hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import load_example


@pytest.fixture(scope="module")
def example():
    return load_example("regression")


@pytest.fixture(scope="module")
def facts(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("regression")
    return example.run(example.parse_args(["--quick", "--out", str(out)]))


@pytest.mark.slow
def test_pretraining_fits_and_the_shift_costs_about_d_in(facts):
    d_in = facts["sizes"]["d_in"]
    assert facts["pretrain_loss"] < 0.05
    assert 0.5 * d_in < facts["base_loss_new"] < 2.0 * d_in


@pytest.mark.slow
def test_lora_leaves_the_base_untouched(facts):
    assert facts["base_unchanged"]
    assert facts["base_loss_new_after"] == facts["base_loss_new"]


@pytest.mark.slow
def test_rank_one_lora_recovers_the_shift_and_merges(facts):
    history = [loss for _, loss in facts["lora_history"]]
    assert history[-1] < history[0]
    assert facts["lora_loss"] < facts["base_loss_new"] / 100  # B = 0 at init: training starts at the base's loss
    assert facts["lora_epochs"] == 100  # fixed epochs: the figure is not set by a stopping threshold
    assert facts["merged_loss_heldout"] <= 0.5  # on held-out samples of the new task
    assert facts["merged_loss_heldout"] < facts["base_loss_new"] / 100
    np.testing.assert_allclose(facts["merged_loss"], facts["lora_loss"], rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_analysis_figures(facts):
    assert set(facts["amplification"]) == {"Dense_0/kernel", "Dense_1/kernel"}
    assert all(np.isfinite(v) and v > 0 for v in facts["amplification"].values())
    # the learned first-layer direction is the all-ones direction of the shift θ + 1·1ᵀ
    assert facts["a_ones_similarity"] > 0.9
    phi = facts["similarity"]
    assert phi.shape == (4, 8)
    assert phi.min() >= 0.0 and phi.max() <= 1.0 + 1e-5
    assert phi[0, 0] > 0.9
    png = Path(facts["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
