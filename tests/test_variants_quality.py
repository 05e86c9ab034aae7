"""QLoRA quality on a small setting: the spam recipe's first steps on an NF4 base stay within the stated tolerance
of the float32 base (benchmarks/variants_quality.py, --quick: the example's tiny offline GPT-2)."""

from __future__ import annotations

import math

import pytest
from conftest import SHARED_DATA, require_data

from benchmarks import variants_quality


@pytest.mark.slow
def test_nf4_base_trains_within_the_tolerance_of_the_float32_base(tmp_path):
    argv = [
        "--quick",
        "--steps", "30",
        "--data-dir", str(require_data(SHARED_DATA / "sms_spam" / "SMSSpamCollection", "SMS Spam Collection")),
        "--bpe-dir", str(require_data(SHARED_DATA / "gpt2_bpe", "GPT-2 BPE files")),
        "--work", str(tmp_path / "work"),
        "--out", str(tmp_path / "quality.json"),
    ]  # fmt: skip
    result = variants_quality.main(argv)
    assert (tmp_path / "quality.json").is_file()
    fp32, nf4 = result["runs"]["float32"], result["runs"]["nf4"]
    for run in (fp32, nf4):
        assert len(run["losses"]) == 30 and all(math.isfinite(x) for x in run["losses"])
        assert sum(run["losses"][-10:]) / 10 < run["losses"][0]  # both runs learn
    assert nf4["losses"] != fp32["losses"]  # the NF4 base really is another base
    for check in result["checks"].values():
        assert check["allowed"] == pytest.approx(
            variants_quality.LOSS_ATOL + variants_quality.LOSS_RTOL * check["float32"]
        )
        assert check["ok"] == (check["abs_diff"] <= check["allowed"])
    assert result["ok"], result["checks"]
    errors = result["relative_error"]  # every block kernel and both embedding tables, each with NF4's error
    assert {"wte/embedding", "wpe/embedding"} <= set(errors) and len(errors) == 2 + 4 * 2
    assert all(0.01 < e < 0.2 for e in errors.values()), errors
    assert result["frozen_bytes"]["nf4"] <= 0.3 * result["frozen_bytes"]["float32"]


@pytest.mark.slow
def test_loftq_starts_closer_to_the_float32_weights_than_kaiming_on_the_nf4_base(tmp_path):
    """--inits: every NF4 run reports its gaps to the float32 run; LoftQ's Q + s·A B is nearer W than Q alone."""
    argv = [
        "--quick", "--inits", "--steps", "5", "--eval-batches", "2", "--loftq-iter", "1", "3",
        "--data-dir", str(require_data(SHARED_DATA / "sms_spam" / "SMSSpamCollection", "SMS Spam Collection")),
        "--bpe-dir", str(require_data(SHARED_DATA / "gpt2_bpe", "GPT-2 BPE files")),
        "--work", str(tmp_path / "work"),
        "--out", str(tmp_path / "inits.json"),
    ]  # fmt: skip
    result = variants_quality.main(argv)
    gaps = result["gaps_to_float32"]
    assert set(gaps) == {"nf4 + kaiming", "nf4 + loftq (loftq_iter=1)", "nf4 + loftq (loftq_iter=3)"}
    reference = result["runs"]["float32 + kaiming"]
    for name, gap in gaps.items():
        run = result["runs"][name]
        assert gap["val_loss_gap_before"] == pytest.approx(run["val_loss_before"] - reference["val_loss_before"])
        assert gap["val_loss_gap_after"] == pytest.approx(run["val_loss"] - reference["val_loss"])
    errors = [gaps[name]["init_reconstruction_error"] for name in gaps]
    assert errors[2] < errors[1] < errors[0], errors
    assert result["runs"]["float32 + kaiming"]["init_reconstruction_error"] == 0.0
