"""Compile time and step time of a Llama training step, scanned (``nnx.scan``) vs unrolled layers.

One step: next-token cross-entropy, gradients of every weight and an AdamW update, jitted. Compile time is
``lower(...).compile()``; the step time is the median of ``--steps`` runs after one warm-up run.

    python benchmarks/llama_layouts.py                       # the tiny test config and a ~125M config
    python benchmarks/llama_layouts.py --sizes tiny --steps 5
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlora.models import llama

SIZES = {
    # (config, batch, length)
    "tiny": (dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2), 8, 64),
    "125m": (dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12), 2, 128),
}


def measure(size: str, scan: bool, steps: int) -> dict:
    shape, batch, length = SIZES[size]
    config = llama.LlamaConfig(num_attention_heads=12 if size == "125m" else 4, num_key_value_heads=4, **shape)
    model = llama.Llama(config, scan_layers=scan, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tx = optax.adamw(1e-4)
    opt_state = tx.init(params)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (batch, length + 1)), jnp.int32)

    def step(params, opt_state, ids):
        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(ids[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t = time.perf_counter()
    compiled = jax.jit(step).lower(params, opt_state, ids).compile()
    compile_s = time.perf_counter() - t
    params, opt_state, loss = compiled(params, opt_state, ids)
    jax.block_until_ready(loss)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, ids)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t)
    count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return {
        "size": size, "layout": "scanned" if scan else "unrolled", "params": int(count), "batch": batch,
        "length": length, "compile_s": round(compile_s, 2), "step_ms": round(1000 * float(np.median(times)), 1),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    rows = []
    for size in args.sizes:
        for scan in (True, False):
            rows.append(measure(size, scan, args.steps))
            print(json.dumps(rows[-1]), flush=True)
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
    return rows


if __name__ == "__main__":
    main()
