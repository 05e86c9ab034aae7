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
