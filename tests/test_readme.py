"""The README's quickstart runs as written."""

from __future__ import annotations

import re

import pytest
from conftest import REPO


@pytest.mark.slow  # end to end (see pyproject.toml: --all and .ci/run run it)
def test_readme_quickstart_runs_as_written(capsys):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md#quickstart", "exec"), {"__name__": "quickstart"})
    assert "LoRA parameters" in capsys.readouterr().out


def test_readme_names_the_two_commands_that_ci_runs():
    readme = (REPO / "README.md").read_text()
    assert "bash scripts/demo.sh" in readme and "bash scripts/test.sh" in readme
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


@pytest.mark.slow  # end to end (see pyproject.toml: --all and .ci/run run it)
def test_readme_variant_snippets_run_as_written(capsys):
    """The DoRA, quantized-base and LoRA+ snippets of the README run."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Variants", 1)[1].split("\n## ", 1)[0]
    snippets = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(snippets) == 3
    for i, code in enumerate(snippets):
        exec(compile(code, f"README.md#variants-{i}", "exec"), {"__name__": "variants"})
    assert "nf4/64" in capsys.readouterr().out


def test_readme_variant_figures_come_from_the_results_files():
    """The Variants section quotes benchmarks/results/variants.json and variants_quality.json as they are."""
    import json
    import statistics

    readme = (REPO / "README.md").read_text()
    section = " ".join(readme.split("## Variants", 1)[1].split("\n## ", 1)[0].split())
    quality = json.loads((REPO / "benchmarks" / "results" / "variants_quality.json").read_text())
    for check in quality["checks"].values():
        for key in ("float32", "nf4", "allowed"):
            assert f"{check[key]:.4f}" in section, (key, check[key])
    assert f"{quality['mean_relative_error']:.4f}" in section and quality["ok"]
    rounds = json.loads((REPO / "benchmarks" / "results" / "variants.json").read_text())["rounds"]
    for p in sorted({r["pass"] for r in rounds}):
        step = {r["config"]: r["step_s"]["median"] for r in rounds if r["pass"] == p}
        for config in step:
            assert f"{step[config]:.2f}" in section, (p, config)
        for num, den in (
            ("jax_gpt2_lora_r16_dora", "jax_gpt2_lora_r16"),
            ("torch_gpt2_peft_r16_dora", "torch_gpt2_peft_r16"),
        ):
            assert f"{step[num] / step[den]:.2f}x" in section, (p, num)
    nf4 = [r for r in rounds if r["config"] == "jax_gpt2_lora_r16_nf4"]
    fp32 = [r for r in rounds if r["config"] == "jax_gpt2_lora_r16"]
    ratio = statistics.median(n["frozen_bytes"] / f["frozen_bytes"] for n, f in zip(nf4, fp32, strict=True))
    assert f"{ratio:.3f}x" in section and ratio <= 0.3
