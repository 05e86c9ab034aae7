"""The serving example: three adapters in one mixed batch, every row equal to its adapter merged and run alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import load_example


@pytest.fixture(scope="module")
def example():
    return load_example("multi_adapter")


def test_help_exits_cleanly_and_offers_quick(example, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_without_the_sms_collection_synthetic_messages_stand_in(example, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(example.spam_data, "SHARED_DATA", tmp_path / "none")
    monkeypatch.setattr(example.spam_data, "DEFAULT_CACHE", tmp_path / "cache")
    args = example.parse_args(["--quick", "--no-download"])
    messages, source = example.sms_messages(args, np.random.default_rng(0))
    assert source == "synthetic" and "synthetic messages" in capsys.readouterr().out
    assert len(messages) == args.sms and {label for label, _ in messages} == {0, 1}
    assert all(len(text) <= args.sms_chars for _, text in messages)
    with pytest.raises(SystemExit, match="Unavailable"):  # an explicit --data-dir that is not there is an error
        example.sms_messages(example.parse_args(["--data-dir", str(tmp_path / "nowhere")]), np.random.default_rng(0))


@pytest.mark.slow
def test_quick_serves_a_mixed_batch_equal_to_each_adapter_merged_alone(example, tmp_path):
    metrics = example.main(["--quick", "--out", str(tmp_path)])
    assert metrics["all_rows_equal_merged_alone"] is True
    rows = metrics["rows"]
    assert len(rows) == 8 and {r["adapter"] for r in rows} == {"spam", "weather", "shout", "base"}
    assert all(r["equals_merged_alone"] for r in rows)
    # The adapters were trained: the same kind of prompt gives different text under different adapters.
    assert len({r["greedy"] for r in rows}) > 4
    assert metrics["bank_bytes"] >= 3 * metrics["one_adapter_bytes"]
    assert 0.0 <= metrics["spam_accuracy_held_out"] <= 1.0
    assert json.loads((tmp_path / "metrics.json").read_text())["rows"] == rows


# The serving snippet that the README held is a cell of docs/guides/multi_adapter.md, run by every docs build.
