"""tunix's NNX Qwen3, one LoRA r16 training step: jaxlora factored vs jaxlora merged inside jit vs qwix, side by side.

The model is google-tunix's own `Qwen3` (tunix 0.1.7) with Qwen3-0.6B's layer shape (d 1024, 16 query heads of
128, 8 KV heads, MLP 3072) at 4 layers and a 8192-token vocabulary, random weights, float32, batch 4 x 128 tokens.
Rank 16, alpha 16 on q/k/v/o (tunix's `Einsum` kernels, e.g. q (D, N, H)) and gate/up/down (`nnx.Linear`), the same
targets for every configuration; next-token cross-entropy; AdamW over the adapters only, state donated:

- `jaxlora`: `jaxlora.plan(params, config, model=, example=)` with path patterns only, `jaxlora.apply_nnx_fn` (served
  by the operation, jaxlora's own backward pass);
- `jaxlora_merged`: the same adapters, `W + s·A B` formed by `jaxlora.merge` inside the jitted step, the plain model
  run on the merged weights (what a user without factored serving writes);
- `qwix`: `qwix.apply_lora_to_model(model, qwix.LoraProvider(module_path=..., rank=16, alpha=16), ...)`, gradients
  over its `nnx.LoRAParam`s (what tunix's own trainers do).

Each configuration runs in a fresh process (`--config NAME`), 3 interleaved rounds (forward, reversed, forward);
ratios are taken per round and reported as the median with the min-max over rounds. Run it in `.venv-zoo` (tunix
and qwix live there; `bash scripts/setup.sh zoo`):

    .venv-zoo/bin/python -m benchmarks.tunix_qwen3            # -> benchmarks/results/tunix_qwen3.{json,md}
    .venv-zoo/bin/python -m benchmarks.tunix_qwen3 --smoke    # tiny shapes, one round: checks that it runs
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CONFIGS = ("jaxlora", "jaxlora_merged", "qwix")
SHAPES = {
    "full": dict(num_layers=4, vocab_size=8192, embed_dim=1024, hidden_dim=3072, num_heads=16, head_dim=128,
                 num_kv_heads=8, batch=4, seq=128, warmup=1, repeats=5),
    "smoke": dict(num_layers=1, vocab_size=64, embed_dim=32, hidden_dim=48, num_heads=2, head_dim=16,
                  num_kv_heads=1, batch=2, seq=8, warmup=0, repeats=1),
}  # fmt: skip
RANK, ALPHA = 16, 16.0
TARGETS = (r".*/attn/(q|k|v|o)_proj/w", r".*/mlp/(gate|up|down)_proj/kernel")  # what a jaxlora user writes
QWIX_MODULES = r".*/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"  # the same kernels, as qwix module paths


def _model(shape: dict[str, int]):
    from flax import nnx
    from tunix.models.qwen3 import model as qwen3

    sizes = {k: shape[k] for k in ("num_layers", "vocab_size", "embed_dim", "hidden_dim", "num_heads", "head_dim")}
    config = qwen3.ModelConfig(**sizes, num_kv_heads=shape["num_kv_heads"], rope_theta=1_000_000, norm_eps=1e-6)
    return qwen3.Qwen3(config, rngs=nnx.Rngs(0))


def _inputs(shape: dict[str, int]):
    import jax.numpy as jnp
    import numpy as np

    b, n = shape["batch"], shape["seq"]
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, shape["vocab_size"], (b, n + 1)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(n), (b, n))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((n, n), bool)), (b, n, n))
    return tokens[:, :-1], tokens[:, 1:], positions, mask


def _loss(logits, labels):
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits.astype("float32"), labels).mean()


def _jaxlora_step(model, tokens, labels, positions, mask, merged: bool):
    """(step(adapters, opt_state, params, ...), [adapters, opt_state], (params,)): the base is a constant input."""
    import jax
    from flax import nnx

    import jaxlora

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    config = jaxlora.LoraConfig(rank=RANK, alpha=ALPHA, targets=TARGETS)
    plan = jaxlora.plan(params, config, model=model, example=(tokens, positions, None, mask))
    _, adapters = jaxlora.init(jax.random.key(1), params, plan)
    served = jaxlora.apply_nnx_fn(plan, strict=True)
    tx = _optimizer()

    def logits_of(adapters, params):
        if merged:
            return nnx.merge(graphdef, jaxlora.merge(params, adapters, plan), rest)(tokens, positions, None, mask)[0]
        return served(nnx.merge(graphdef, params, rest), adapters, tokens, positions, None, mask)[0]

    def step(adapters, opt_state, params):
        loss, grads = jax.value_and_grad(lambda a: _loss(logits_of(a, params), labels))(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return _apply(adapters, updates), opt_state, loss

    return step, [adapters, tx.init(adapters)], (params,), len(plan.leaves)


def _qwix_step(model, tokens, labels, positions, mask):
    import jax
    import qwix
    from flax import nnx

    provider = qwix.LoraProvider(module_path=QWIX_MODULES, rank=RANK, alpha=ALPHA)
    lora_model = qwix.apply_lora_to_model(model, provider, tokens, positions, None, mask, rngs=nnx.Rngs(1))
    graphdef, adapters, rest = nnx.split(lora_model, nnx.LoRAParam, ...)
    tx = _optimizer()

    def step(adapters, opt_state, rest):
        def loss_fn(adapters):
            return _loss(nnx.merge(graphdef, adapters, rest)(tokens, positions, None, mask)[0], labels)

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return _apply(adapters, updates), opt_state, loss

    count = len(jax.tree.leaves(adapters)) // 2
    return step, [adapters, tx.init(adapters)], (rest,), count


def _optimizer():
    import optax

    return optax.adamw(1e-4, weight_decay=0.0)


def _apply(params, updates):
    import optax

    return optax.apply_updates(params, updates)


def measure(name: str, profile: str) -> dict[str, Any]:
    """One configuration in this process: compile time, XLA step memory, median step time, peak RSS."""
    import jax

    from benchmarks.jax_worker import _compile, _step_memory

    shape = SHAPES[profile]
    model = _model(shape)
    tokens, labels, positions, mask = _inputs(shape)
    if name == "qwix":
        step, state, constants, adapted = _qwix_step(model, tokens, labels, positions, mask)
    else:
        step, state, constants, adapted = _jaxlora_step(model, tokens, labels, positions, mask, name.endswith("merged"))
    del model
    if adapted != 7 * shape["num_layers"]:  # q, k, v, o, gate, up, down in every layer, for each library
        raise RuntimeError(f"{name} adapted {adapted} kernels, expected {7 * shape['num_layers']}: check the targets")
    common.mark_setup_done()
    compiled, compile_s, _ = _compile(jax.jit(step, donate_argnums=(0, 1)), *state, *constants)
    losses: list[Any] = []

    def one():
        *new_state, loss = compiled(*state, *constants)
        state[:] = new_state
        losses.append(loss)
        return loss

    timing = common.time_steps(one, jax.block_until_ready, warmup=shape["warmup"], steps=1, repeats=shape["repeats"])
    values = common.finite_losses(losses)
    if len(values) > 1 and not values[-1] < values[0]:
        raise RuntimeError(f"{name}: the loss did not fall over {len(values)} steps: {values}")
    return {"step_s": timing, "compile_s": compile_s, **_step_memory(compiled), "adapted_kernels": adapted,
            "losses": values, **common.memory_fields(None)}  # fmt: skip


def _run_config(name: str, profile: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="jaxlora_tunix_") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.tunix_qwen3", "--config", name, "--profile", profile, "--result", out]
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"), "TF_CPP_MIN_LOG_LEVEL": "2"}
        proc = subprocess.run(list(map(str, cmd)), cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0 or not out.exists():
            return {"status": "failed", "error": proc.stderr[-3000:]}
        return {"status": "ok", **json.loads(out.read_text())}


def _ratios(rounds: list[dict[str, Any]], key, mine: str, other: str) -> dict[str, Any] | None:
    values = [key(r[mine]) / key(r[other]) for r in rounds if r[mine]["status"] == r[other]["status"] == "ok"]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}


def _step(result: dict[str, Any]) -> float:
    return result["step_s"]["median"]


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-configuration medians over rounds, and jaxlora's ratios to the others, each judged per round."""
    out: dict[str, Any] = {"configs": {}, "ratios": {}}
    for name in CONFIGS:
        ok = [r[name] for r in rounds if r[name]["status"] == "ok"]
        keys = ("compile_s", "step_peak_bytes", "step_temp_bytes", "peak_rss_mb")
        out["configs"][name] = {k: statistics.median(r[k] for r in ok) for k in keys if ok and k in ok[0]}
        out["configs"][name]["step_s"] = statistics.median(_step(r) for r in ok) if ok else None
    for other in ("jaxlora_merged", "qwix"):
        out["ratios"][f"step jaxlora / {other}"] = _ratios(rounds, _step, "jaxlora", other)
        out["ratios"][f"compile jaxlora / {other}"] = _ratios(rounds, lambda r: r["compile_s"], "jaxlora", other)
        out["ratios"][f"XLA step memory jaxlora / {other}"] = _ratios(
            rounds, lambda r: r["step_peak_bytes"], "jaxlora", other
        )
        out["ratios"][f"peak RSS jaxlora / {other}"] = _ratios(rounds, lambda r: r["peak_rss_mb"], "jaxlora", other)
    return out


def markdown(run: dict[str, Any]) -> str:
    s = run["summary"]
    lines = [
        f"tunix Qwen3 ({run['shape']}), LoRA r{RANK} on q/k/v/o/gate/up/down, `{run['command']}`, {run['date']}, "
        f"{run['rounds']} interleaved rounds, load average {run['load_average_before']} before.",
        "",
        "| configuration | step (s) | compile (s) | XLA step memory (MB) | peak RSS (MB) |",
        "|---|---|---|---|---|",
    ]
    for name, c in s["configs"].items():
        mem = c.get("step_peak_bytes")
        lines.append(
            f"| {name} | {c['step_s']:.3f} | {c.get('compile_s', float('nan')):.1f} | "
            f"{mem / 2**20 if mem else float('nan'):.1f} | {c.get('peak_rss_mb', float('nan')):.0f} |"
        )
    lines += ["", "| ratio (per round) | median | min-max |", "|---|---|---|"]
    for what, r in s["ratios"].items():
        if r is not None:
            lines.append(f"| {what} | {r['median']:.2f} | {r['min']:.2f}-{r['max']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one round")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; smoke 1)")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default benchmarks/results)")
    parser.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)  # worker mode: one configuration
    parser.add_argument("--profile", choices=sorted(SHAPES), default="full", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.config:
        args.result.write_text(json.dumps(measure(args.config, args.profile), default=float))
        return 0
    profile = "smoke" if args.smoke else "full"
    rounds = args.rounds or (1 if args.smoke else 3)
    out = args.out or (REPO / "runs" / "benchmarks-smoke" if args.smoke else RESULTS)
    load_before, started = os.getloadavg(), time.time()
    per_round = []
    for index in range(rounds):
        order = CONFIGS if index % 2 == 0 else CONFIGS[::-1]
        results = {}
        for name in order:
            results[name] = _run_config(name, profile)
            r = results[name]
            detail = f"step {_step(r):.3f} s, compile {r['compile_s']:.1f} s" if r["status"] == "ok" else r["error"]
            print(f"[{index + 1}/{rounds}] {name:<15} {detail}", flush=True)
        per_round.append(results)
    run = {
        "command": " ".join([".venv-zoo/bin/python -m benchmarks.tunix_qwen3", *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": time.time() - started,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "environment": common.environment() | {"tunix": common._version("google-tunix")},
        "shape": SHAPES[profile],
        "rounds": rounds,
        "per_round": per_round,
    }
    run["summary"] = summary(per_round)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tunix_qwen3.json").write_text(json.dumps(run, indent=1, default=float) + "\n")
    (out / "tunix_qwen3.md").write_text(markdown(run))
    print(markdown(run))
    failed = [n for r in per_round for n, x in r.items() if x["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
