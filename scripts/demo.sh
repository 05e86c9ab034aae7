#!/usr/bin/env bash
# The main demo: the MNIST digit-9 LoRA story (falls back to scikit-learn's digits when MNIST cannot be had).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh examples
exec .venv/bin/python examples/mnist.py "$@"
