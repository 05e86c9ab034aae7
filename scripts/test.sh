#!/usr/bin/env bash
# Lint and the test suite, in .venv (set up on first use). By default the fast set; with --all (as .ci/run
# does) also the tests marked slow: the examples' end-to-end runs, the MNIST build, the README's snippets, the
# child processes (killed mid-save, simulated devices, several processes) and the benchmark smoke run.
# Other arguments go to pytest (e.g. a file, -k, -x, or -m "slow" for the slow set alone). The tests run in one
# process per core (pytest-xdist, each test file in one process so that its compiled functions are shared);
# -n 0 runs them in this process (for -s or a debugger).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
select=(-m "not slow")
if [ "${1:-}" = "--all" ]; then
  shift
  select=()
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -n auto --dist loadfile ${select[@]+"${select[@]}"} "$@"
