#!/usr/bin/env bash
# A newcomer's first hour, automated. Clones the repository (default: this checkout's committed HEAD; or the
# path or URL given as $1) into a temporary folder with no ../shared beside it, then runs the README's two
# commands and every command of the bash blocks of README.md and the guides (docs/guides/*.md) exactly as written,
# checking each against what the page promises (offline: the documented fallbacks and one-line errors; online: real MNIST and real runs).
# Any deviation (an unexpected exit code, a traceback, a missing line, a README command this script has no
# expectation for) makes it exit non-zero. Not part of .ci/run: it builds a fresh .venv (minutes of pip).
#
#   bash scripts/newcomer.sh [REPO] [--keep]     # --keep: leave the temporary clone for inspection
set -uo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
source_repo="$here"
keep=0
for arg in "$@"; do
  case "$arg" in
    --keep) keep=1 ;;
    *) source_repo="$arg" ;;
  esac
done

work="$(mktemp -d "${TMPDIR:-/tmp}/jaxlora-newcomer.XXXXXX")"
logs="$work/logs"
mkdir -p "$logs"
cleanup() { if [ "$keep" = 1 ]; then echo "kept: $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT

say() { echo "newcomer: $*"; }
deviations=0
deviate() {
  say "DEVIATION: $*"
  deviations=$((deviations + 1))
}

git clone -q "$source_repo" "$work/jaxlora" || { say "cannot clone $source_repo"; exit 2; }
cd "$work/jaxlora" || exit 2
say "cloned $source_repo at $(git rev-parse --short HEAD) into $work/jaxlora"
[ -e ../shared ] && { say "$work/shared exists: this is not a newcomer's setting"; exit 2; }

# Online or not decides what the README promises.
if python3 -c "import urllib.request; urllib.request.urlopen('https://storage.googleapis.com/cvdf-datasets/mnist/t10k-labels-idx1-ubyte.gz', timeout=10)" 2>/dev/null; then
  online=1
  say "internet: yes (expecting real MNIST and real downloads)"
else
  online=0
  say "internet: no (expecting the documented offline fallbacks and one-line errors)"
fi

# Every command of the ```bash blocks of the README and the guides, comments stripped, in order, each once.
mapfile -t commands < <(awk '/^```bash/{inside=1; next} /^```/{inside=0} inside' README.md docs/guides/*.md |
  sed -e 's/[[:space:]]*#.*$//' -e '/^[[:space:]]*$/d' | awk '!seen[$0]++')
say "${#commands[@]} documented commands: $(printf '[%s] ' "${commands[@]}")"

# check NAME LOG STATUS: what the README promises for the command NAME; prints why not, returns 1 on a deviation.
expect() {
  local command="$1" log="$2" err="$3" status="$4"
  local want_status=0 problems=()
  has() { grep -qF -- "$1" "$log"; }
  count() { grep -cF -- "$1" "$log"; }
  case "$command" in
    "bash scripts/demo.sh" | ".venv/bin/python examples/mnist.py")
      if [ "$online" = 1 ]; then
        has "dataset: mnist" || problems+=("no 'dataset: mnist' line")
      else
        [ "$(count "so using scikit-learn's bundled 8x8 digits instead")" = 1 ] || problems+=("not exactly one fallback line")
        has "no MNIST (offline" || problems+=("the fallback line does not say 'offline'")
        has "To get MNIST:" || problems+=("the fallback line does not say how to get MNIST")
        has "digit 9: 18 -> 4 wrong of 36" || problems+=("the digits figures differ from the README's (18 -> 4 nines)")
      fi
      has "the whole story took" || problems+=("the story did not finish") ;;
    ".venv/bin/python examples/mnist.py --dataset digits")
      has "dataset: digits" || problems+=("no 'dataset: digits' line")
      has "digit 9: 18 -> 4 wrong of 36" || problems+=("the digits figures differ from the README's (18 -> 4 nines)") ;;
    "bash scripts/test.sh")
      grep -qE "[0-9]+ passed" "$log" || problems+=("no 'N passed' summary")
      grep -qE "[0-9]+ (failed|error)" "$log" && problems+=("failures or errors") ;;
    ".venv/bin/python examples/low_rank.py" | ".venv/bin/python examples/low_rank.py --quick")
      has "W·x == B·(A·x)? True" || problems+=("the factored product is not exact") ;;
    ".venv/bin/python examples/gpt2_spam.py --offline-pretrain" | ".venv/bin/python examples/gpt2_spam.py --weights gpt2")
      if [ "$online" = 1 ]; then
        has "Accuracy:" || problems+=("no accuracy line")
      else
        want_status=1
        local lines
        lines=$(grep -c '^error: ' "$err")
        local want_lines=2
        [ "$command" = ".venv/bin/python examples/gpt2_spam.py --weights gpt2" ] && want_lines=3
        [ "$lines" = "$want_lines" ] || problems+=("$lines 'error:' lines on stderr, expected $want_lines (one per missing thing)")
        [ "$(wc -l < "$err")" = "$want_lines" ] || problems+=("stderr holds more than the error lines")
        grep -q "^error: GPT-2's BPE tokenizer: .*--bpe-dir" "$err" || problems+=("no line naming the tokenizer and --bpe-dir")
        grep -q "^error: the SMS Spam Collection: .*--data-dir" "$err" || problems+=("no line naming the data and --data-dir")
      fi ;;
    ".venv/bin/python examples/gpt2_spam.py --quick")
      [ "$(count "--quick runs offline: byte tokens (not GPT-2's BPE) and synthetic SMS")" = 1 ] ||
        problems+=("not one line saying that --quick runs offline on byte tokens and synthetic SMS")
      has "Accuracy:" || problems+=("no accuracy line") ;;
    ".venv/bin/python examples/llama_sft.py --quick")
      [ "$(count "--quick runs offline: byte tokens (not GPT-2's BPE) and synthetic SMS")" = 1 ] ||
        problems+=("not one line saying that --quick runs offline on byte tokens and synthetic SMS")
      has "PEFT adapter:" || problems+=("no PEFT adapter line") ;;
    ".venv/bin/python examples/llama_sft.py")
      if [ "$online" = 1 ]; then
        has "PEFT adapter:" || problems+=("no PEFT adapter line")
      else
        want_status=1
        [ "$(grep -c '^error: ' "$err")" = 2 ] || problems+=("not 2 'error:' lines on stderr (one per missing thing)")
        [ "$(wc -l < "$err")" = 2 ] || problems+=("stderr holds more than the error lines")
        grep -q "^error: GPT-2's BPE tokenizer: .*--bpe-dir" "$err" || problems+=("no line naming the tokenizer and --bpe-dir")
        grep -q "^error: the SMS Spam Collection: .*--data-dir" "$err" || problems+=("no line naming the data and --data-dir")
      fi ;;
    ".venv/bin/python examples/distributed.py --local-processes 2 --devices-per-process 2 --model-parallel 2")
      has "Trained 20 steps on 2 processes, 4 devices" || problems+=("no summary of a 2-process run")
      has "[Gloo]" && problems+=("gloo's connection lines in the output")
      [ -f runs/distributed/summary.json ] || problems+=("no runs/distributed/summary.json") ;;
    ".venv/bin/python examples/distributed.py")
      has "Trained 20 steps on 1 process, 1 device" || problems+=("no summary of a 1-process run") ;;
    ".venv/bin/python examples/serve.py" | ".venv/bin/python examples/serve.py --quick")
      grep -qE "adapter merged: ([0-9]+)/\1 equal" "$log" || problems+=("a request differs from running it alone") ;;
    ".venv/bin/python examples/multi_adapter.py" | ".venv/bin/python examples/multi_adapter.py --quick")
      has "Every row equals its adapter merged and run alone: True" || problems+=("the mixed batch differs from the rows alone") ;;
    *)
      problems+=("the README shows this command but newcomer.sh has no expectation for it: add one") ;;
  esac
  [ "$status" = "$want_status" ] || problems+=("exit status $status, expected $want_status")
  grep -q "Traceback (most recent call last)" "$log" "$err" && problems+=("a traceback")
  if [ "${#problems[@]}" -gt 0 ]; then
    printf '%s; ' "${problems[@]}"
    return 1
  fi
  return 0
}

summary=()
run() {  # run NUMBER COMMAND: runs it as written, with a 40-minute limit, and checks it
  local n="$1" command="$2"
  local log="$logs/$n.out" err="$logs/$n.err"
  say "[$n] \$ $command"
  local start end status
  start=$(date +%s)
  timeout 2400 bash -c "$command" 2> "$err" < /dev/null | tee "$log" | sed -u 's/^/    | /'
  status="${PIPESTATUS[0]}"
  sed 's/^/    ! /' "$err"  # stderr after stdout (kept apart: the one-line errors are checked there)
  end=$(date +%s)
  local why
  if why=$(expect "$command" "$log" "$err" "$status"); then
    summary+=("ok        $((end - start)) s  $command")
  else
    deviate "[$n] $command: $why"
    summary+=("DEVIATION $((end - start)) s  $command")
  fi
}

i=0
for command in "${commands[@]}"; do
  i=$((i + 1))
  run "$i" "$command"
done
# The demo a second time: no reinstall, the pretrained base from the cache.
i=$((i + 1))
run "$i" "bash scripts/demo.sh"
grep -q "^setup:" "$logs/$i.out" && deviate "the second demo run set up .venv again"
grep -q "restored the pretrained base" "$logs/$i.out" || deviate "the second demo run pretrained again"

say "venv size: $(du -sh .venv 2>/dev/null | cut -f1)"
say "summary:"
printf '    %s\n' "${summary[@]}"
if [ "$deviations" -gt 0 ]; then
  say "$deviations deviation(s)"
  exit 1
fi
say "every README command behaved as documented"
