#!/usr/bin/env bash
# Lint and the whole test suite, in a virtual environment set up from nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
.venv/bin/ruff check .
exec .venv/bin/python -m pytest "$@"
