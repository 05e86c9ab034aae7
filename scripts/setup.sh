#!/usr/bin/env bash
# Creates .venv (if missing) and installs jaxlora with the extra named in $1 ("examples" or "test").
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-examples}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -m pip install -q -e ".[${extra}]"
