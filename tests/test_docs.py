"""The documentation's own checks that need no build: every code block runs somewhere, every public name and page
is reachable, the performance page reads its figures from the committed results.

Building the site (`bash scripts/docs.sh`, which executes every `{code-cell}` and fails on any warning) and the
browser check (`scripts/check_docs_site.py`) run in `.ci/run` after the tests.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import shlex
import sys

from conftest import REPO

import jaxlora

DOCS = REPO / "docs"
FENCE = re.compile(r"^(`{3,}|:{3,})\s*(\{[\w-]+\})?\s*([\w-]*)", re.MULTILINE)


def _fences(text: str) -> list[tuple[str, str]]:
    """(directive, language) of every opening fence: ('{code-cell}', 'python'), ('', 'bash'), ..."""
    found, inside = [], None
    for line in text.splitlines():
        match = FENCE.match(line)
        if not match:
            continue
        if inside is not None and line.strip() == inside:
            inside = None
            continue
        if inside is None and (match.group(2) or match.group(3)):
            found.append((match.group(2) or "", match.group(3) or ""))
            inside = match.group(1)
    return found


def _pages():
    return sorted(DOCS.glob("*.md")) + sorted((DOCS / "guides").glob("*.md"))


def test_every_code_block_is_executed_by_the_build_or_run_by_the_newcomer_script():
    """Python only in {code-cell}s (myst-nb runs them at build time); shell only in bash blocks whose every command
    scripts/newcomer.sh knows; anything else is output or a listing (text) or a directive without code."""
    newcomer = (REPO / "scripts" / "newcomer.sh").read_text()
    allowed = {"toctree", "warning", "note", "eval-rst"}
    for page in _pages():
        text = page.read_text()
        for directive, language in _fences(text):
            where = f"{page.relative_to(REPO)}: a ```{directive}{language} block"
            if directive == "{code-cell}":
                assert language == "python", where
            elif directive:
                assert directive.strip("{}") in allowed, where
            else:
                assert language in ("bash", "text"), f"{where}: python belongs in a {{code-cell}}, run at build time"
        for block in re.findall(r"^```bash\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
            for line in block.splitlines():
                command = line.split("  #")[0].strip()
                if command:
                    assert f'"{command}"' in newcomer, f"{page.name}: newcomer.sh has no expectation for {command!r}"


def test_guides_with_code_are_notebooks_that_the_build_executes():
    for page in _pages():
        text = page.read_text()
        if "{code-cell}" in text:
            assert text.startswith("---\nfile_format: mystnb\n"), f"{page.name}: myst-nb executes only notebooks"


def test_every_guide_and_page_is_in_the_table_of_contents_and_the_bring_your_own_model_slot_is_free():
    index = (DOCS / "index.md").read_text()
    listed = set(re.findall(r"^(guides/\w+|development|api/index)$", index, re.MULTILINE))
    on_disk = {f"guides/{p.stem}" for p in (DOCS / "guides").glob("*.md")} | {"development", "api/index"}
    assert listed == on_disk, listed ^ on_disk


def test_every_public_module_has_an_api_page_generated_from_its_all():
    sys.path.insert(0, str(DOCS))
    try:
        conf = importlib.import_module("conf")
    finally:
        sys.path.remove(str(DOCS))
    public = {"jaxlora"} | {  # a public module declares what it exports; the models' building blocks do not
        info.name
        for info in pkgutil.walk_packages(jaxlora.__path__, "jaxlora.")
        if "._" not in info.name
        and info.name not in ("jaxlora.peft", "jaxlora.models")  # 0.1's alias of peft_format; a re-export
        and hasattr(importlib.import_module(info.name), "__all__")
    }
    public = {name for name in public if not name.startswith("jaxlora.models.llama.")}  # llama's own pieces
    assert public == set(conf.API_MODULES), public ^ set(conf.API_MODULES)
    for module in conf.API_MODULES:
        names = conf.public_names(module)
        assert names, f"{module} has no __all__: its API page would be empty"
        for name in names:
            assert hasattr(importlib.import_module(module), name), f"{module}.__all__ names {name}, which is missing"


def test_the_performance_page_reads_its_tables_from_the_committed_results():
    page = (DOCS / "guides" / "performance.md").read_text()
    assert "benchmarks/results/latest.json" in page and (REPO / "benchmarks/results/latest.json").is_file()
    prose = re.sub(r"```\{code-cell\}.*?```", "", page, flags=re.DOTALL)
    assert not re.search(r"\d+\.\d+ ?(s|x|ms|MiB)\b", prose), "a figure typed into the performance page's prose"


def test_docs_sh_builds_with_warnings_as_errors_and_ci_runs_it_and_the_browser_check():
    script = (REPO / "scripts" / "docs.sh").read_text()
    sphinx = next(line for line in script.splitlines() if "-m sphinx" in line)
    assert {"-W", "--keep-going", "docs/_build/html"} <= set(shlex.split(sphinx.replace('"$python"', "python")))
    ci = (REPO / ".ci" / "run").read_text()
    # the build runs beside the tests; the browser check only after both, and a failed build fails CI
    assert ci.index("scripts/docs.sh") < ci.index('wait "$docs" ||') < ci.index("check_docs_site.py")
    assert ci.index("scripts/test.sh --all") < ci.index("check_docs_site.py")
