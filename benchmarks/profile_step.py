"""Where a GPT-2 training step spends its time: forward, forward + backward, optimizer, and the compiled HLO.

    python -m benchmarks.profile_step                 # jaxlora r16 and full fine-tuning, GPT-2 small shape
    python -m benchmarks.profile_step --smoke         # tiny shapes (seconds)
    python -m benchmarks.profile_step --configs r16 --breakdown-only --write-readme   # the README's breakdown

Each part is jitted and timed alone in one process (median of --repeats), so the difference between rows is the
cost of what the larger one adds. The HLO histogram counts the optimized module's instructions by opcode, and the
bytes moved by copies and transposes (work outside the matmuls that XLA:CPU executes as separate loops).

The breakdown runs the compiled step under `jax.profiler.trace` and sums the duration of every executed HLO
instruction (XLA:CPU records one event per thunk, named like the instruction), classified from the optimized HLO:
big GEMMs, thin GEMMs (one side the LoRA rank), attention (batched dots), random bits, optimizer (instructions
outside the differentiated function), copies/transposes (fusions of pure data movement) and the rest
(element-wise work, normalisation, softmax, reductions).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import collections
import datetime
import glob
import re
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlora
from benchmarks import common, jax_worker, report

_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "pred": 1, "u32": 4, "s8": 1, "u8": 1}


def hlo_histogram(compiled: Any) -> dict[str, Any]:
    """Opcode counts of the optimized HLO, and the bytes written by copy / transpose instructions."""
    text = compiled.as_text()
    ops: collections.Counter[str] = collections.Counter()
    moved: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (\w+)\[([\d,]*)\]\{?[^ ]* (\w[\w\-]*)\(", line)
        if not m:
            continue
        dtype, dims, opcode = m.groups()
        ops[opcode] += 1
        if opcode in ("copy", "transpose"):
            size = 1
            for d in filter(None, dims.split(",")):
                size *= int(d)
            moved[opcode] += size * _DTYPE_BYTES.get(dtype, 4)
    return {"ops": dict(ops.most_common(12)), "bytes_moved": dict(moved)}


# --------------------------------------------------------------------------------------------------------------
# Per-instruction breakdown of a compiled step, from a profiler trace
# --------------------------------------------------------------------------------------------------------------

CATEGORIES = (
    "big GEMMs",
    "thin LoRA GEMMs",
    "attention (batched dots)",
    "element-wise / normalisation / softmax / reductions",
    "random bits (dropout)",
    "optimizer",
    "copies / transposes",
)
_MOVEMENT = {"parameter", "copy", "transpose", "bitcast", "reshape", "slice", "concatenate", "broadcast", "constant"}
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (.+?) (\w[\w\-]*)\((.*)$")


def _computations(text: str) -> dict[str, list[str]]:
    """The optimized HLO module's computations: name -> instruction lines."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if head:
            current = comps.setdefault(head.group(1), [])
        elif current is not None and line.startswith("  "):
            current.append(line)
    return comps


def _dims(shape: str) -> list[int]:
    m = re.search(r"\[([\d,]*)\]", shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def classify_instructions(text: str, rank: int) -> dict[str, str]:
    """Instruction name -> category, for every instruction of the optimized HLO that a thunk can execute."""
    comps = _computations(text)
    out: dict[str, str] = {}
    for lines in comps.values():
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            name, shape, _opcode, rest = m.groups()
            called = re.findall(r"calls=%([\w.\-]+)", rest)
            body = [b for c in called for b in comps.get(c, [])] or [line]
            ops = {om.group(3) for b in body if (om := _INSTRUCTION.match(b))}
            op_name = (re.search(r'op_name="([^"]*)"', rest) or re.search(r"$", "")).group(0)
            out[name] = _category(ops, body, shape, op_name, rank)
    return out


def _category(ops: set[str], body: list[str], shape: str, op_name: str, rank: int) -> str:
    if "dot" in ops or "convolution" in ops:
        dot = next(b for b in body if " dot(" in b or " convolution(" in b)
        if "lhs_batch_dims" in dot:
            return "attention (batched dots)"
        operands = [_dims(s) for s in re.findall(r"(\w+\[[\d,]*\])\{?[\d,]*\}? %", dot)]
        dims = _dims(_INSTRUCTION.match(dot).group(2)) + [d for o in operands for d in o]
        return "thin LoRA GEMMs" if rank in dims else "big GEMMs"
    if ops & {"rng", "rng-bit-generator", "rng-get-and-update-state"} or "threefry" in " ".join(body):
        return "random bits (dropout)"
    if op_name and "jvp(" not in op_name and "transpose(" not in op_name:
        return "optimizer"
    if ops <= _MOVEMENT:
        return "copies / transposes"
    return "element-wise / normalisation / softmax / reductions"


def trace_breakdown(compiled: Any, args: tuple, steps: int, rank: int) -> dict[str, Any]:
    """Milliseconds per step in each category: the compiled step run `steps` times under jax.profiler.trace."""
    from jax.profiler import ProfileData

    categories = classify_instructions(compiled.as_text(), rank)
    jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory(prefix="jaxlora_trace_") as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(steps):
                jax.block_until_ready(compiled(*args))
        data = ProfileData.from_file(glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0])
    spent = collections.Counter()
    per_op: collections.Counter[str] = collections.Counter()
    wall = 0.0
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in categories:
                    spent[categories[event.name]] += event.duration_ns
                    per_op[event.name] += event.duration_ns
                elif event.name == "ThunkExecutor::Execute (wait for completion)":
                    wall += event.duration_ns
    ms = {c: spent.get(c, 0) / steps / 1e6 for c in CATEGORIES}
    top = [(n, categories[n], ns / steps / 1e6) for n, ns in per_op.most_common(8)]
    return {"ms": ms, "traced_ms": sum(ms.values()), "executor_wall_ms": wall / steps / 1e6, "top": top}


def gemm_rate(shape: common.GPT2Shape, repeats: int) -> float:
    """Best float32 jnp.matmul GFLOP/s over the GPT-2 step's big products (the matmul ceiling here)."""
    tokens, d = shape.batch * shape.seq, shape.n_embd
    best = 0.0
    rng = np.random.default_rng(0)
    product = jax.jit(jnp.matmul)
    for m, k, n in ((tokens, d, 3 * d), (tokens, d, 4 * d), (tokens, 4 * d, d)):
        a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((m, k), (k, n)))
        calls = common.matmul_calls(m, k, n)
        timing = common.time_steps(
            lambda a=a, b=b: product(a, b), jax.block_until_ready, warmup=1, steps=calls, repeats=repeats
        )
        best = max(best, 2 * m * k * n / timing["median"] / 1e9)
    return best


def breakdown_markdown(shape: common.GPT2Shape, variant: str, repeats: int, steps: int) -> str:
    """The README's breakdown of the jaxlora GPT-2 LoRA step: category, ms per step, share, beside the floor."""
    model, params = jax_worker._gpt2(shape)
    x, y = jax_worker._gpt2_batches(shape, 1)[0]
    cfg = jax_worker.gpt2_lora_config(variant)
    params, adapters = jaxlora.init(jax.random.key(1), params, cfg)
    trainable, frozen = jaxlora.partition(params, adapters, cfg)
    del params, adapters
    tx = jaxlora.optimizer(jax_worker._gpt2_tx(), cfg)

    def step(t, s, f, x, y):
        def loss(t):
            p, a = jaxlora.combine(t, f)
            return jax_worker._cross_entropy(jaxlora.apply(model, {"params": p}, a, cfg, x), y)

        value, grads = jax.value_and_grad(loss)(t)
        updates, s = tx.update(grads, s, t)
        return optax.apply_updates(t, updates), s, value

    args = (trainable, tx.init(trainable), frozen, x, y)
    compiled = jax.jit(step).lower(*args).compile()
    timing = common.time_steps(lambda: compiled(*args), jax.block_until_ready, warmup=1, steps=1, repeats=repeats)
    found = trace_breakdown(compiled, args, steps, common.GPT2_LORA[variant]["rank"])
    flops = common.gpt2_flops(shape, "lora", variant)
    rate = gemm_rate(shape, repeats)
    hlo = hlo_histogram(compiled)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    step_ms = timing["median"] * 1e3
    lines = [
        f"Measured {datetime.date.today()} with `python -m benchmarks.profile_step --configs {variant} "
        f"--breakdown-only --write-readme` (jax {jax.__version__}, {common.cpu_model()}, "
        f"{common.environment()['affinity']} usable cores, load average {load} at the end): the whole "
        f"{variant} step takes {step_ms:.0f} ms (median of {repeats}); the traced instructions sum to "
        f"{found['traced_ms']:.0f} ms per step over {steps} traced steps (XLA's executor wall time "
        f"{found['executor_wall_ms']:.0f} ms). The matmul floor, {flops / 1e9:.0f} GFLOP of model products at "
        f"the best {rate:.0f} GFLOP/s jnp.matmul reaches on the step's big shapes, is {flops / rate / 1e6:.0f} ms.",
        "",
        "| part | ms per step | share of traced time |",
        "|---|---|---|",
    ]
    for category, ms in found["ms"].items():
        lines.append(f"| {category} | {ms:.4g} | {100 * ms / max(found['traced_ms'], 1e-9):.1f}% |")
    moved = ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in hlo["bytes_moved"].items())
    lines += [
        "",
        f"Bytes written by unfused copy / transpose instructions: {moved or 'none'}. The slowest instructions: "
        + "; ".join(f"`{n}` ({c}) {ms:.1f} ms" for n, c, ms in found["top"])
        + ".",
    ]
    return "\n".join(lines) + "\n"


BREAKDOWN_START, BREAKDOWN_END = "<!-- breakdown:start -->", "<!-- breakdown:end -->"


def _time(fn: Any, *args: Any, repeats: int) -> float:
    compiled = jax.jit(fn).lower(*args).compile()
    timing = common.time_steps(lambda: compiled(*args), jax.block_until_ready, warmup=1, steps=1, repeats=repeats)
    return timing["median"]


def profile(shape: common.GPT2Shape, variant: str | None, repeats: int) -> list[tuple[str, float, float]]:
    """(part, seconds, model GFLOP) for the forward, forward+backward and whole step of one configuration."""
    model, params = jax_worker._gpt2(shape)
    x, y = jax_worker._gpt2_batches(shape, 1)[0]
    ce = jax_worker._cross_entropy
    rows = []
    if variant is None:
        tx = jax_worker._gpt2_tx()

        def loss(p):
            return ce(model.apply({"params": p}, x), y)

        rows.append(("forward (flax)", _time(loss, params, repeats=repeats), common.gpt2_flops(shape, "infer")))
        rows.append(
            ("forward + backward", _time(jax.value_and_grad(loss), params, repeats=repeats), None),
        )

        def step(p, s):
            value, grads = jax.value_and_grad(loss)(p)
            updates, s = tx.update(grads, s, p)
            return optax.apply_updates(p, updates), s, value

        opt_state = tx.init(params)
        rows.append(("whole step", _time(step, params, opt_state, repeats=repeats), common.gpt2_flops(shape, "full")))
        compiled = jax.jit(step).lower(params, opt_state).compile()
        return rows, hlo_histogram(compiled)

    cfg = jax_worker.gpt2_lora_config(variant)
    params, adapters = jaxlora.init(jax.random.key(1), params, cfg)
    trainable, frozen = jaxlora.partition(params, adapters, cfg)
    tx = jaxlora.optimizer(jax_worker._gpt2_tx(), cfg)

    def lora_loss(t, f):
        p, a = jaxlora.combine(t, f)
        return ce(jaxlora.apply(model, {"params": p}, a, cfg, x), y)

    def flax_loss(p):
        return ce(model.apply({"params": p}, x), y)

    infer = common.gpt2_flops(shape, "infer")
    rows.append(("forward, plain flax (no adapters)", _time(flax_loss, params, repeats=repeats), infer))
    rows.append(
        ("forward, jaxlora.apply", _time(lora_loss, trainable, frozen, repeats=repeats), None),
    )
    grad = jax.value_and_grad(lora_loss)
    rows.append(("forward + backward (trainable only)", _time(grad, trainable, frozen, repeats=repeats), None))

    def step(t, s, f):
        value, grads = grad(t, f)
        updates, s = tx.update(grads, s, t)
        return optax.apply_updates(t, updates), s, value

    opt_state = tx.init(trainable)
    flops = common.gpt2_flops(shape, "lora", variant)
    rows.append(("whole step", _time(step, trainable, opt_state, frozen, repeats=repeats), flops))
    compiled = jax.jit(step).lower(trainable, opt_state, frozen).compile()
    return rows, hlo_histogram(compiled)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny GPT-2 shape")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--configs", nargs="+", default=["r16", "full"], choices=["r16", "r8", "full"])
    parser.add_argument("--trace-steps", type=int, default=3, help="steps run under the profiler (breakdown)")
    parser.add_argument("--breakdown-only", action="store_true", help="only the traced breakdown of the LoRA step")
    parser.add_argument(
        "--write-readme", action="store_true", help="write the breakdown into benchmarks/README.md (not with --smoke)"
    )
    args = parser.parse_args(argv)
    shape = common.SMOKE.gpt2 if args.smoke else common.FULL.gpt2
    print(f"jax {jax.__version__} on {common.cpu_model()}, GPT-2 shape {shape}")
    for name in [c for c in args.configs if c != "full"][:1]:
        block = breakdown_markdown(shape, name, args.repeats, args.trace_steps)
        print(block)
        if args.write_readme and not args.smoke:
            report.replace_marked(Path(__file__).with_name("README.md"), BREAKDOWN_START, BREAKDOWN_END, block)
            print("wrote the breakdown into benchmarks/README.md")
    for name in [] if args.breakdown_only else args.configs:
        rows, hlo = profile(shape, None if name == "full" else name, args.repeats)
        print(f"\n{name}:")
        for part, seconds, flops in rows:
            rate = f"{flops / seconds / 1e9:7.1f} GFLOP/s" if flops else ""
            print(f"  {part:<40} {seconds * 1e3:9.1f} ms  {rate}")
        print(f"  HLO opcodes: {hlo['ops']}")
        print(f"  bytes written by copy/transpose: { {k: f'{v / 1e6:.1f} MB' for k, v in hlo['bytes_moved'].items()} }")


if __name__ == "__main__":
    main()
