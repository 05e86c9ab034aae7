"""The digit-9 story end to end: on real MNIST (the targets), and offline on scikit-learn's 8x8 digits."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SHARED_DATA, require_data

EXAMPLE = REPO / "examples" / "mnist.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def example():
    sys.path.insert(0, str(EXAMPLE.parent))  # the example imports its sibling mnist_data
    spec = importlib.util.spec_from_file_location("mnist_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _check_story_invariants(facts: dict, num_classes: int = 10) -> None:
    """What must hold whatever the data: frozen base, exact disabled-LoRA predictions, merge, plots."""
    assert facts["base_bit_identical"]
    assert facts["disabled_identical"]
    np.testing.assert_array_equal(facts["wrong_disabled"], facts["wrong_before"])
    assert facts["accuracy_disabled"] == facts["accuracy_before"]
    assert facts["wrong_before"].shape == facts["wrong_lora"].shape == (num_classes,)
    assert facts["merged_mismatches"] <= 0.001 * facts["test_size"]
    assert facts["adapter_bytes"] < facts["model_bytes"]
    assert facts["reloaded_identical"]
    assert len(facts["finetune_losses"]) == 100
    assert facts["finetune_losses"][-10:].mean() < facts["finetune_losses"][:10].mean()
    for plot in facts["plots"]:
        assert Path(plot).read_bytes()[:8] == PNG_MAGIC


def test_mnist_story_meets_its_targets(example, tmp_path):
    tfds_dir = Path(os.environ.get("TFDS_DATA_DIR") or SHARED_DATA / "tfds")
    require_data(tfds_dir / "mnist" / "3.0.1", "MNIST in tfds array_record format")
    args = ["--dataset", "mnist", "--data-dir", str(tfds_dir), "--no-download", "--out", str(tmp_path)]
    facts = example.run(example.parse_args(args))

    assert facts["dataset"] == "mnist"
    assert (facts["train_size"], facts["test_size"]) == (60_000, 10_000)
    assert len(facts["pretrain_losses"]) == 6000
    assert facts["accuracy_before"] >= 0.95
    assert (facts["num_original"], facts["num_lora"]) == (2_807_010, 6_794)
    assert round(facts["lora_percent"], 3) == 0.242
    before, after = facts["wrong_before"], facts["wrong_lora"]
    assert after[9] <= 20 < before[9]
    others = np.arange(10) != 9
    assert after[others].sum() > before[others].sum()  # the adapter only saw 9s: the other digits suffer
    assert facts["adapter_bytes"] * 100 < facts["model_bytes"]
    _check_story_invariants(facts)


def test_digits_story_offline(example, tmp_path, capsys):
    empty = tmp_path / "no_tfds_data"
    empty.mkdir()
    args = ["--quick", "--data-dir", str(empty), "--no-download", "--out", str(tmp_path / "out")]
    facts = example.run(example.parse_args(args))  # --dataset auto falls back to the bundled digits

    printed = capsys.readouterr().out
    assert sum("using scikit-learn's 8x8 digits" in line for line in printed.splitlines()) == 1
    assert facts["dataset"] == "digits"
    assert (facts["train_size"], facts["test_size"]) == (1437, 360)
    # MLP 64-128-256-10 with a rank-1 adapter on every kernel: r·(in + out) summed over the layers.
    assert facts["num_lora"] == (64 + 128) + (128 + 256) + (256 + 10)
    assert facts["accuracy_before"] >= 0.85
    before, after = facts["wrong_before"], facts["wrong_lora"]
    assert after[9] < before[9]  # the adapter fixes nines it got wrong (measured: 1 -> 0) ...
    others = np.arange(10) != 9
    assert after[others].sum() > before[others].sum()  # ... and, having seen only 9s, breaks others (20 -> 152)
    _check_story_invariants(facts)


def test_cli_help_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "--dataset" in result.stdout and "digit-9" in result.stdout
