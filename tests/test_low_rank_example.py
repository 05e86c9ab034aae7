"""The low-rank example: a rank-2 10x10 matrix is exactly B·A from its SVD, with 40 numbers instead of 100."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from conftest import REPO

EXAMPLE = REPO / "examples" / "low_rank.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("low_rank_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rank_two_matrix_is_b_times_a(example, tmp_path):
    facts = example.run(example.parse_args(["--out", str(tmp_path)]))
    assert facts["shape"] == (10, 10)
    assert facts["rank"] == 2 and facts["nonzero_singular_values"] == 2
    assert facts["factored_equal"] and facts["max_abs_difference"] < 1e-10
    assert facts["jaxlora_equal"]
    assert (facts["full_params"], facts["factored_params"]) == (100, 40)
    assert (tmp_path / "low_rank.png").read_bytes()[:4] == b"\x89PNG"


def test_quick_runs_every_check_without_the_plot(example, tmp_path, capsys):
    facts = example.run(example.parse_args(["--quick", "--out", str(tmp_path)]))
    assert facts["factored_equal"] and facts["jaxlora_equal"] and facts["nonzero_singular_values"] == 2
    assert (facts["full_params"], facts["factored_params"]) == (100, 40)
    assert facts["plot"] is None and not any(tmp_path.iterdir())
    assert "plot: skipped (--quick)" in capsys.readouterr().out


def test_svd_factors_reproduce_the_matrix(example):
    rng = np.random.default_rng(1)
    w = example.low_rank_matrix(rng, 6, 9, 3)
    b, a, s = example.svd_factors(w, 3)
    assert b.shape == (6, 3) and a.shape == (3, 9)
    np.testing.assert_allclose(b @ a, w, atol=1e-12)
    np.testing.assert_allclose(a @ a.T, np.eye(3), atol=1e-12)  # A = V_rᵀ has orthonormal rows
    assert s[3:].max() < 1e-12 * s[0]
    truncated_b, truncated_a, _ = example.svd_factors(w, 1)  # fewer factors than the rank: no longer exact
    assert not np.allclose(truncated_b @ truncated_a, w)


def test_rank_out_of_range_is_refused(example, tmp_path):
    with pytest.raises(ValueError, match=r"--rank must be in 1\.\.min"):
        example.run(example.parse_args(["--rank", "11", "--out", str(tmp_path)]))
