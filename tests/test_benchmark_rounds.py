"""Interleaved benchmark rounds: per-round ratios, their median and spread, and "within noise" verdicts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # benchmarks/ is a folder of the repository, not an installed package

from benchmarks import report, run  # noqa: E402

PEFT_TARGET = "fp32 GPT-2 LoRA r16 step vs PEFT r16"


def _ok(median: float, **extra) -> dict:
    return {"status": "ok", "step_s": {"median": median, "min": median, "max": median}, **extra}


def _round(lora: float, peft: float) -> dict:
    return {"jax_gpt2_lora_r16": _ok(lora, peak_rss_mb=100.0), "torch_gpt2_peft_r16": _ok(peft, peak_rss_mb=200.0)}


def _peft_target(rounds: list[dict]) -> dict:
    return next(t for t in report.targets_over_rounds(rounds) if t["target"] == PEFT_TARGET)


def test_target_is_the_median_of_per_round_ratios_not_the_ratio_of_medians():
    # Round by round the LoRA step is 0.5x, 0.8x and 1.2x PEFT's; the ratio of the two rows' medians is 0.9 / 1.5.
    rounds = [_round(0.5, 1.0), _round(1.6, 2.0), _round(0.9, 0.75)]
    target = _peft_target(rounds)
    assert target["value"] == pytest.approx(0.8)
    assert target["round_values"] == pytest.approx([0.5, 0.8, 1.2])
    assert target["spread"] == pytest.approx([0.5, 1.2])


@pytest.mark.parametrize(
    ("ratios", "verdict", "met"),
    [
        ([0.5, 0.6, 0.7], "met", True),
        ([0.8, 0.84, 0.9], "within noise", False),  # the 0.85 limit lies inside the spread
        ([0.9, 1.0, 1.1], "missed", False),
    ],
)
def test_a_limit_inside_the_spread_is_within_noise(ratios, verdict, met):
    target = _peft_target([_round(r, 1.0) for r in ratios])
    assert target["verdict"] == verdict and target["met"] is met
    assert verdict.replace("missed", "**missed**") in report.targets_table([target])


def test_one_round_keeps_the_single_value_and_missing_rounds_are_not_measured():
    target = _peft_target([_round(0.7, 1.0)])
    assert target["value"] == pytest.approx(0.7) and target["verdict"] == "met"
    lora_only = {"jax_gpt2_lora_r16": _ok(1.0, peak_rss_mb=100.0)}
    absent = _peft_target([lora_only, lora_only])
    assert absent["value"] is None and absent["verdict"] == "not measured"


def test_tables_show_each_configuration_in_its_median_round():
    rounds = [_round(3.0, 1.0), _round(1.0, 1.0), _round(2.0, 1.0)]
    rounds[1]["jax_gpt2_lora_r16"]["peak_rss_mb"] = 111.0
    rounds[2]["jax_gpt2_lora_r16"]["peak_rss_mb"] = 222.0
    combined = report.combine_rounds(rounds)
    lora = combined["jax_gpt2_lora_r16"]
    assert lora["step_s"]["median"] == 2.0 and lora["peak_rss_mb"] == 222.0
    assert lora["round_step_medians"] == [3.0, 1.0, 2.0]


def test_rounds_alternate_the_order_and_start_fresh_processes(monkeypatch, tmp_path):
    calls: list[list[str]] = []

    def fake_worker(worker, names, profile, timeout, python, overrides):
        calls.append(names)
        return {n: _ok(1.0 + len(calls) / 100, peak_rss_mb=10.0) for n in names}, None

    monkeypatch.setattr(run, "run_worker", fake_worker)
    args = run.parse_args(
        ["--only", r"^(jax_gpt2_lora_r16|torch_gpt2_peft_r16)$", "--rounds", "3", "--out", str(tmp_path)]
    )
    result = run.run_all(args)
    assert calls == [["jax_gpt2_lora_r16"], ["torch_gpt2_peft_r16"]] * 1 + [
        ["torch_gpt2_peft_r16"],
        ["jax_gpt2_lora_r16"],
        ["jax_gpt2_lora_r16"],
        ["torch_gpt2_peft_r16"],
    ]
    assert len(result["rounds"]) == 3 and result["schedule"]["rounds"] == 3
    target = next(t for t in result["targets"] if t["target"] == PEFT_TARGET)
    assert len(target["round_values"]) == 3


def _qwen3_result(step: float, compile_s: float = 6.0, memory: int = 2**20, rss: float = 1000.0) -> dict:
    return _ok(step, compile_s=compile_s, step_peak_bytes=memory, step_temp_bytes=memory, peak_rss_mb=rss)


def test_tunix_qwen3_ratios_are_judged_per_round_and_skip_failed_rounds():
    """jaxlora / qwix is the median of the per-round ratios (not a ratio of medians), and a round in which either
    configuration failed contributes no ratio."""
    from benchmarks import tunix_qwen3

    rounds = [
        {"jaxlora": _qwen3_result(1.0), "jaxlora_merged": _qwen3_result(2.0), "qwix": _qwen3_result(2.0)},
        {"jaxlora": _qwen3_result(3.0), "jaxlora_merged": _qwen3_result(4.0), "qwix": _qwen3_result(6.0)},
        {"jaxlora": _qwen3_result(2.0), "jaxlora_merged": _qwen3_result(2.5), "qwix": _qwen3_result(1.0)},
        {"jaxlora": _qwen3_result(1.0), "jaxlora_merged": _qwen3_result(9.0), "qwix": {"status": "failed"}},
    ]
    summary = tunix_qwen3.summary(rounds)
    step = summary["ratios"]["step jaxlora / qwix"]
    assert step["rounds"] == [0.5, 0.5, 2.0] and step["median"] == 0.5  # the ratio of the medians is 2.0 / 2.0
    assert (step["min"], step["max"]) == (0.5, 2.0)
    merged = summary["ratios"]["step jaxlora / jaxlora_merged"]
    assert merged["rounds"] == [0.5, 0.75, 0.8, 1 / 9] and merged["median"] == pytest.approx((0.5 + 0.75) / 2)
    assert summary["configs"]["qwix"]["step_s"] == 2.0  # the median over the rounds that ran
    table = tunix_qwen3.markdown(
        {"summary": summary, "shape": {}, "command": "cmd", "date": "d", "rounds": 4, "load_average_before": [1.0]}
    )
    assert "| step jaxlora / qwix | 0.50 | 0.50-2.00 |" in table
