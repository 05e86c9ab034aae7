"""scripts/setup.sh installs only when pyproject.toml or the pinned constraints changed, and shows first setup."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

from conftest import REPO

FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for the venv's python: records every call; `-m pip install` prints what pip prints.
echo "$*" >> "$(dirname "$0")/../calls.log"
if [ "$1 $2 $3" = "-m pip install" ] && [ "$4" != "-q" ]; then
  echo "Collecting jax>=0.4.35"
  echo "Collecting flax>=0.10"
  echo "  Downloading flax-0.12.8-py3-none-any.whl (500 kB)"
  echo "Installing collected packages: jax, flax, jaxlora"
  exit "${FAKE_PIP_EXIT:-0}"
fi
"""

FAKE_SYSTEM_PYTHON = """#!/usr/bin/env bash
# Stands in for python3 -m venv: creates .venv/bin/python as the fake above.
mkdir -p "$3/bin"
cp "$(dirname "$0")/fake_venv_python" "$3/bin/python"
"""


def _executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _setup(repo, extra, **env):
    environment = {**os.environ, "PYTHON": str(repo / "tools" / "python3"), **env}
    return subprocess.run(
        ["bash", "scripts/setup.sh", extra], cwd=repo, env=environment, capture_output=True, text=True, check=False
    )


def _pip_installs(repo):
    log = repo / ".venv" / "calls.log"
    return [line for line in log.read_text().splitlines() if line.startswith("-m pip install")] if log.exists() else []


def test_setup_installs_once_per_pyproject_and_shows_progress(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    shutil.copy(REPO / "scripts" / "constraints.txt", repo / "scripts" / "constraints.txt")
    (repo / "pyproject.toml").write_text('[project]\nname = "x"\n')
    (repo / "tools").mkdir()
    _executable(repo / "tools" / "fake_venv_python", FAKE_PYTHON)
    _executable(repo / "tools" / "python3", FAKE_SYSTEM_PYTHON)

    first = _setup(repo, "examples")
    assert first.returncode == 0, first.stderr
    assert "first run only" in first.stdout and "setup: Collecting flax>=0.10" in first.stdout
    assert "Downloading" not in first.stdout  # pip's detail stays in .venv/pip.log
    assert "Downloading flax" in (repo / ".venv" / "pip.log").read_text()
    assert _pip_installs(repo) == [
        "-m pip install -q --upgrade pip",
        "-m pip install --no-compile --progress-bar off -c scripts/constraints.txt -e .[examples]",
    ]

    again = _setup(repo, "examples")
    assert again.returncode == 0 and again.stdout == "" and len(_pip_installs(repo)) == 2  # nothing to do

    test_extra = _setup(repo, "test")  # a wider extra installs once; then it covers "examples" too
    assert "jaxlora[test]" in test_extra.stdout and len(_pip_installs(repo)) == 3
    assert _setup(repo, "examples").stdout == "" and len(_pip_installs(repo)) == 3
    docs_extra = _setup(repo, "docs")  # the docs extra includes the test extra: it covers both afterwards
    assert "jaxlora[docs]" in docs_extra.stdout and len(_pip_installs(repo)) == 4
    assert _setup(repo, "test").stdout == _setup(repo, "examples").stdout == "" and len(_pip_installs(repo)) == 4
    assert _setup(repo, "docs").stdout == "" and len(_pip_installs(repo)) == 4

    (repo / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "2"\n')
    changed = _setup(repo, "examples")
    assert "pyproject.toml or scripts/constraints.txt changed" in changed.stdout and len(_pip_installs(repo)) == 5

    with open(repo / "scripts" / "constraints.txt", "a") as constraints:
        constraints.write("jax==0.0.1\n")  # a new pin installs again
    assert "changed" in _setup(repo, "examples").stdout and len(_pip_installs(repo)) == 6

    (repo / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "3"\n')
    failed = _setup(repo, "examples", FAKE_PIP_EXIT="1")
    assert failed.returncode == 1 and "pip failed" in failed.stderr and "Collecting jax" in failed.stderr
    assert _setup(repo, "examples").returncode == 0
    assert len(_pip_installs(repo)) == 8  # a failed install is not recorded: the next run installs again
