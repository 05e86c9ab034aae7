"""The README's quickstart runs as written."""

from __future__ import annotations

import re

from conftest import REPO


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
