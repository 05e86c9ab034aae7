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


def test_readme_is_short_and_its_other_code_blocks_are_commands_or_install_lines():
    """At most 200 lines; the guides hold the rest (their code runs when the docs are built)."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    languages = re.findall(r"^```(\w*)", readme, re.M)[::2]  # opening fences
    assert languages.count("python") == 1 and set(languages) <= {"python", "bash", "text"}, languages


def test_readme_headline_figures_are_the_committed_results():
    """Each headline figure is the named target of benchmarks/results/latest.json, rounded as printed."""
    import json

    readme = " ".join((REPO / "README.md").read_text().split())
    run = json.loads((REPO / "benchmarks" / "results" / "latest.json").read_text())
    targets = {t["target"]: t for t in run["targets"]}
    quoted = re.findall(r"\*\*([\d.]+)x\*\*[^*]*?\(target \"([^\"]+)\"\)", readme)
    assert len(quoted) == 3, quoted
    for figure, name in quoted:
        assert name in targets, name
        assert figure == f"{targets[name]['value']:.2f}", (name, figure, targets[name]["value"])


def test_readme_links_point_at_files_that_exist():
    readme = (REPO / "README.md").read_text()
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        assert (REPO / link).exists(), link
