#!/usr/bin/env bash
# Creates .venv (if missing) and installs jaxlora with the extra named in $1 ("examples", "test" or "docs").
# Versions are pinned by scripts/constraints.txt (the set the tests last passed with).
# "zoo" instead creates .venv-zoo with jaxlora[zoo] pinned by scripts/constraints-zoo.txt: the peer model
# libraries of tests/zoo (gemma, tunix) need versions that conflict with the test set's, so they get their own venv.
# pip runs only when pyproject.toml or the constraints changed since the last install of that extra (or of "test",
# which includes "examples", or of "docs", which includes "test"): the install is editable, so code changes need none.
# pip's full output goes to $venv/pip.log. pip leaves the .py files uncompiled (--no-compile): Python compiles a module
# when it is first imported, so only what is used gets compiled (measured 2026-12-07 on the 2 cores, nothing else
# running: .venv-zoo installed in 2 min 07 s and 112 s of CPU, against 4 min 34 s and 244 s with pip compiling all
# of its 28,000 files).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-examples}"
python="${PYTHON:-python3}"
venv=.venv
constraints=scripts/constraints.txt
extras="$extra"
if [ "$extra" = zoo ]; then
  venv=.venv-zoo
  constraints=scripts/constraints-zoo.txt
  extras=zoo  # the peer libraries and pytest: no torch or peft (the test extra) to install
fi
want="$(cat pyproject.toml "$constraints" | sha256sum | cut -d' ' -f1)"

covers="$extra"
[ "$extra" = examples ] && covers="examples test docs"
[ "$extra" = test ] && covers="test docs"
if [ -x "$venv"/bin/python ]; then
  for have in $covers; do
    if [ "$(cat "$venv/.installed-$have" 2>/dev/null)" = "$want" ]; then
      exit 0  # installed from this very pyproject.toml
    fi
  done
fi

if [ ! -x "$venv"/bin/python ]; then
  echo "setup: creating $venv and installing jaxlora[$extras] (first run only: a few minutes of downloads)"
  "$python" -m venv "$venv"
  "$venv"/bin/python -m pip install -q --upgrade pip
else
  echo "setup: pyproject.toml or $constraints changed (or jaxlora[$extras] is new here): installing jaxlora[$extras] into $venv"
fi
rm -f "$venv"/.installed-*
set +e
PYTHONUNBUFFERED=1 "$venv"/bin/python -m pip install --no-compile --progress-bar off -c "$constraints" -e ".[${extras}]" 2>&1 | tee "$venv"/pip.log |
  grep --line-buffered -E '^(Collecting|Installing collected packages)' |
  awk '{ print "setup: " substr($0, 1, 110); fflush() }'
status="${PIPESTATUS[0]}"
set -e
if [ "$status" -ne 0 ]; then
  echo "setup: pip failed (exit $status); the end of $venv/pip.log:" >&2
  tail -n 25 "$venv"/pip.log >&2
  exit "$status"
fi
echo "$want" > "$venv/.installed-$extra"
echo "setup: done ($(grep -c '^Collecting' "$venv"/pip.log) packages collected; full log in $venv/pip.log)"
