"""Runs every benchmark configuration in a fresh worker process and writes JSON, a Markdown table and a bar chart.

    python -m benchmarks.run                 # full run (under 20 minutes on 2 cores), updates benchmarks/README.md
    python -m benchmarks.run --smoke         # tiny shapes, three steps each: checks that every configuration runs
    python -m benchmarks.run --only 'gpt2_(lora|peft)_r16$'   # a subset (regex over configuration names)
    python -m benchmarks.run --rounds 5      # interleaved rounds (full default 3): targets are per-round medians

Results go to `--out` (default `benchmarks/results/` for the full run, `runs/benchmarks-smoke/` for --smoke):
`latest.json`, `latest.md`, `latest.png`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common, report

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
README = REPO / "benchmarks" / "README.md"
WORKERS = {"jax": "benchmarks.jax_worker", "torch": "benchmarks.torch_worker", "lorax": "benchmarks.lorax_worker"}
WORKERS["qwix"] = "benchmarks.qwix_worker"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="jaxlora against full fine-tuning, Hugging Face PEFT and lorax, each configuration in its own "
        "process; writes latest.json, latest.md and latest.png.",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, three steps each (seconds, not minutes)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: benchmarks/results/; --smoke: runs/benchmarks-smoke/)",
    )
    parser.add_argument("--only", default=None, help="regex: run only configurations whose name it searches")
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds per worker process (default 600; smoke 900)"
    )
    parser.add_argument(
        "--lorax-python",
        default=None,
        help="interpreter for the lorax worker (a venv with jax-lorax and the jax it pins); default: this one",
    )
    for field in common.SCHEDULE_FIELDS:
        parser.add_argument(
            f"--{field.replace('_', '-')}", type=int, default=None, help=f"override the profile's {field} (quick looks)"
        )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds: every selected configuration once per round, in alternating order, a fresh "
        "process each; targets are medians of the per-round ratios (default: full 3, smoke 1)",
    )
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite the table in benchmarks/README.md")
    parser.add_argument("--list", action="store_true", help="list the configurations and exit")
    return parser.parse_args(argv)


# The smoke run checks that the code runs, not how fast: XLA's slow optimisation passes only cost it time.
SMOKE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _worker_env(smoke: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    if smoke:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {SMOKE_XLA_FLAGS}".strip()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def run_worker(
    worker: str, names: list[str], profile: str, timeout: float, python: str, overrides: dict[str, int]
) -> tuple[dict[str, Any], str | None]:
    """Runs `names` in one worker process; returns their results and, if the process itself failed, why."""
    with tempfile.TemporaryDirectory(prefix="jaxlora_bench_") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [python, "-m", WORKERS[worker], "--profile", profile, "--result", str(result_file)]
        cmd += [f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()] + names
        try:
            proc = subprocess.run(
                cmd, cwd=REPO, env=_worker_env(profile == "smoke"), capture_output=True, text=True, timeout=timeout
            )
            problem = None if proc.returncode == 0 else f"worker exited with {proc.returncode}: {proc.stderr[-2000:]}"
        except subprocess.TimeoutExpired:
            problem = f"worker timed out after {timeout:.0f}s"
        results = json.loads(result_file.read_text()) if result_file.exists() else {}
    for name in names:
        if name not in results:
            results[name] = {"status": "failed", "error": problem or "no result written"}
    return results, problem


def _git_revision() -> str | None:
    """The repository's commit, with "+dirty" when the working tree differs from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _progress(total: int):
    """A tqdm bar on a terminal; None (plain flushed lines) when output is captured or tqdm is missing."""
    if not sys.stdout.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="config", file=sys.stdout, dynamic_ncols=True)


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    profile = "smoke" if args.smoke else "full"
    configs = [c for c in common.CONFIGS if args.only is None or re.search(args.only, c.name)]
    if not configs:
        raise SystemExit(f"--only {args.only!r} selects no configuration; see --list")
    timeout = args.timeout or (900.0 if args.smoke else 600.0)
    overrides = {f: getattr(args, f) for f in common.SCHEDULE_FIELDS if getattr(args, f) is not None}
    pythons = {w: sys.executable for w in WORKERS} | {"lorax": args.lorax_python or sys.executable}
    rounds = args.rounds or (1 if args.smoke else 3)
    if rounds < 1:
        raise SystemExit(f"--rounds {rounds}: needs at least 1")
    # Full runs give each configuration a fresh process (own compile caches, own peak RSS); the smoke run groups
    # them per worker, since it checks that the code runs, not how fast.
    if args.smoke:
        batches = [(w, [c.name for c in configs if c.worker == w], timeout) for w in WORKERS]
        batches = [(w, names, t) for w, names, t in batches if names]
    else:
        batches = [(c.worker, [c.name], min(timeout, c.timeout_s or timeout)) for c in configs]

    started = time.time()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    per_round: list[dict[str, Any]] = []
    bar = _progress(len(configs) * rounds)
    for round_index in range(rounds):
        # Alternating order: a configuration early in one round is late in the next, so a drift in the machine's
        # load over the run does not favour the configurations listed first.
        results: dict[str, Any] = {}
        for worker, names, worker_timeout in batches if round_index % 2 == 0 else batches[::-1]:
            if bar is not None:
                bar.set_description(names[0] if len(names) == 1 else f"{worker} ({len(names)} configs)")
            out, _ = run_worker(worker, names, profile, worker_timeout, pythons[worker], overrides)
            results.update(out)
            for name in names:
                tag = f"[{round_index + 1}/{rounds}] " if rounds > 1 else ""
                line = f"{tag}{name:<32} {report.one_line(out[name])}"
                (bar.write(line) if bar is not None else print(line, flush=True))
            if bar is not None:
                bar.update(len(names))
        per_round.append(results)
    if bar is not None:
        bar.close()

    run = {
        "profile": profile,
        "command": "python -m benchmarks.run " + shlex.join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": time.time() - started,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "environment": common.environment(),
        "git": _git_revision(),
        "lorax_python": pythons["lorax"],
        "shapes": {
            "gpt2": common.PROFILES[profile].gpt2.__dict__,
            "mlp": common.MLP_LAYERS,
            "regression": common.REGRESSION_LAYERS,
        },
        "schedule": {k: v for k, v in common.PROFILES[profile].__dict__.items() if k != "gpt2"}
        | overrides
        | {"rounds": rounds},
        "results": report.combine_rounds(per_round),
        "rounds": per_round if rounds > 1 else None,
    }
    run["targets"] = report.targets_over_rounds(per_round)
    return run


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for c in common.CONFIGS:
            print(f"{c.name:<34} {c.worker:<6} {c.group:<11} {c.label}")
        return 0
    out = args.out or (REPO / "runs" / "benchmarks-smoke" if args.smoke else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    print(f"jaxlora benchmarks ({'smoke' if args.smoke else 'full'} profile) -> {out}")
    run = run_all(args)
    markdown = report.markdown(run)
    (out / "latest.json").write_text(json.dumps(run, indent=1, default=float) + "\n")
    (out / "latest.md").write_text(markdown)
    report.chart(run, out / "latest.png")
    quick = any(getattr(args, f) is not None for f in common.SCHEDULE_FIELDS)
    if not (args.smoke or args.no_readme or quick or args.only) and out.resolve() == RESULTS.resolve():
        report.update_readme(README, markdown)
        print(f"updated {README.relative_to(REPO)}")
    print()
    print(report.targets_table(run["targets"]))
    print(f"\nwrote {out / 'latest.json'}, {out / 'latest.md'}, {out / 'latest.png'} in {run['duration_s']:.0f}s")
    failed = sorted({n for r in run["rounds"] or [run["results"]] for n, x in r.items() if x["status"] == "failed"})
    if failed:
        print(f"FAILED configurations: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
