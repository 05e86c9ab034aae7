#!/usr/bin/env bash
# Lint and the test suite, in .venv (set up on first use). By default the fast set; with --all (as .ci/run
# does) also the tests marked slow: the examples' end-to-end runs, the MNIST build, the README's snippets, the
# child processes (killed mid-save, simulated devices, several processes) and the benchmark smoke run, and
# tests/zoo (the drop-in contract on gemma's and tunix's models) in its own .venv-zoo (scripts/setup.sh zoo), which
# installs and runs in the background beside the main suite (its log is printed at the end).
# Other arguments go to pytest (e.g. a file, -k, -x, or -m "slow" for the slow set alone). The tests run in one
# process per core (pytest-xdist, each test file in one process so that its compiled functions are shared; files
# with the most slow tests first, so that no long file starts last); -n 0 runs them in this process (for -s or a
# debugger). Most tests compile with XLA's cheaper CPU code generation (tests/conftest.py says why and which do not):
# --all runs the few marked default_codegen in a second pytest run, with XLA's default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
select=(-m "not slow")
zoo=0
if [ "${1:-}" = "--all" ]; then
  shift
  select=()
  zoo=1
elif [ "${JAXLORA_TEST_JAX_CACHE:-0}" = "1" ] && [ "${CI:-}" != "true" ]; then
  # Opt-in, for the fast set alone outside CI: jax's persistent compilation cache in .cache/jax (gitignored), so
  # that a second run loads the compiled programs instead of compiling them again. Measured 2026-12-02 on the 2
  # cores (load average about 2.5 from other jobs): without the cache 178 s wall / 339 s CPU; with it a first (cold)
  # run 200-223 s / 379-408 s (it writes ~5000 entries, 44 MB, and saves nothing within one run), the second
  # (warm) run 132-141 s / 251-264 s; every test passes both ways. Off by default because the cold run is the one
  # that must stay under 4 minutes; --all (so .ci/run) and CI=true never use it. `rm -rf .cache/jax` empties it
  # (entries are keyed by program, jax version and XLA flags, so it only grows).
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$PWD/.cache/jax}"
  export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}"
  export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="${JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES:--1}"
fi
.venv/bin/ruff check .
xdist=(-n auto --dist loadfile --no-loadscope-reorder)  # the files in tests/conftest.py's order, not by test count
if [ "$zoo" = 0 ]; then
  exec .venv/bin/python -m pytest "${xdist[@]}" ${select[@]+"${select[@]}"} "$@"
fi
# .venv-zoo installs (scripts/setup.sh zoo) and its tests run in the background while the main suite runs; a failing
# suite stops them (a later setup.sh zoo finishes the install, its marker file not being written yet).
zoo_log="$(mktemp)"
(bash scripts/setup.sh zoo && .venv-zoo/bin/python -m pytest -n auto --dist load -m zoo "$@" tests/zoo) > "$zoo_log" 2>&1 &
zoo_run=$!
trap 'kill "$zoo_run" 2> /dev/null || true' EXIT
# pytest's exit status 5 says that a selection (-k, a file) left one of the runs with no test: not a failure
run() { "$@" || { status=$?; [ "$status" = 5 ] || exit "$status"; }; }
run .venv/bin/python -m pytest "${xdist[@]}" --durations=20 -m "not default_codegen" "$@"  # the slowest 20 in the log
run .venv/bin/python -m pytest "${xdist[@]}" --durations=5 -m default_codegen "$@"
status=0
wait "$zoo_run" || status=$?
trap - EXIT
echo "tests/zoo (in .venv-zoo):"
cat "$zoo_log"
[ "$status" = 0 ] || [ "$status" = 5 ] || exit "$status"
