"""Where a GPT-2 training step spends its time: forward, forward + backward, optimizer, and the compiled HLO.

    python -m benchmarks.profile_step                 # jaxlora r16 and full fine-tuning, GPT-2 small shape
    python -m benchmarks.profile_step --smoke         # tiny shapes (seconds)

Each part is jitted and timed alone in one process (median of --repeats), so the difference between rows is the
cost of what the larger one adds. The HLO histogram counts the optimized module's instructions by opcode, and the
bytes moved by copies and transposes (work outside the matmuls that XLA:CPU executes as separate loops).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import collections
import re
from typing import Any

import jax
import optax

import jaxlora
from benchmarks import common, jax_worker

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
    args = parser.parse_args(argv)
    shape = common.SMOKE.gpt2 if args.smoke else common.FULL.gpt2
    print(f"jax {jax.__version__} on {common.cpu_model()}, GPT-2 shape {shape}")
    for name in args.configs:
        rows, hlo = profile(shape, None if name == "full" else name, args.repeats)
        print(f"\n{name}:")
        for part, seconds, flops in rows:
            rate = f"{flops / seconds / 1e9:7.1f} GFLOP/s" if flops else ""
            print(f"  {part:<40} {seconds * 1e3:9.1f} ms  {rate}")
        print(f"  HLO opcodes: {hlo['ops']}")
        print(f"  bytes written by copy/transpose: { {k: f'{v / 1e6:.1f} MB' for k, v in hlo['bytes_moved'].items()} }")


if __name__ == "__main__":
    main()
