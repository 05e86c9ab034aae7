#!/usr/bin/env bash
# Builds the documentation site into docs/_build/html: Sphinx + MyST, every guide's code cells executed top to
# bottom (myst-nb), the API pages generated from the docstrings; any warning or failing cell fails the build.
# Pages are read one after another (-j 1): kernels started in parallel can race for a port. Sets up .venv with the
# docs extra first (as scripts/test.sh does with the test extra); JAXLORA_DOCS_PYTHON names another Python that
# already has it. Then open docs/_build/html/index.html, or check it in a browser with
#   .venv/bin/python scripts/check_docs_site.py
set -euo pipefail
cd "$(dirname "$0")/.."
python="${JAXLORA_DOCS_PYTHON:-}"
if [ -z "$python" ]; then
  bash scripts/setup.sh docs
  python=.venv/bin/python
fi
start=$(date +%s)
rm -rf docs/_build/html
JAX_PLATFORMS=cpu PYTHONWARNINGS="${PYTHONWARNINGS:-}" "$python" -m sphinx -W --keep-going -j "${JAXLORA_DOCS_JOBS:-1}" ${JAXLORA_DOCS_VERBOSE:+-v} -q -b html -d docs/_build/doctrees docs docs/_build/html
echo "docs: built docs/_build/html in $(( $(date +%s) - start )) s (every code cell executed)"
