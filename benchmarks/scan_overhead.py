"""Where the scanned GPT-2 step's extra memory comes from: XLA's scratch (``compiled.memory_analysis()``) of the
same step with the blocks unrolled and scanned, with jaxlora and without it.

GPT-2 small classifier (the benchmark shape: batch 8 x 120, float32, random weights); each row is one compiled
program's temporary bytes, deterministic (no timing, so the machine's load does not matter):

* ``lora``: loss and gradients of r16 LoRA on every block linear (``jaxlora.apply``), the step the benchmarks time;
* ``full``: loss and gradients of every block weight through the plain model (no jaxlora at all);
* ``lora_remat_dots``: ``lora`` on the model built with ``GPT2Config(remat="dots_with_no_batch_dims_saveable")``
  (each scanned block rematerialised, saving only the matmuls), with its median step time over 3 steps beside the
  plain scanned step's.

    python benchmarks/scan_overhead.py     # writes results/scan_overhead.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "scan_overhead.json"
MIB = 2**20


def _setup(scan: bool):
    import jax

    import jaxlora
    from benchmarks import common
    from benchmarks import jax_worker as worker

    shape = common.PROFILES["full"].gpt2
    model, params = worker._gpt2(shape, scan)
    config = worker.gpt2_lora_config("r16", scan)
    plan = jaxlora.plan(params, config)
    params, adapters = jaxlora.init(jax.random.key(1), params, plan)
    x, y = worker._gpt2_batches(shape, 1)[0]
    return model, params, adapters, plan, x, y


def _compiled(fn, *args):
    import jax

    return jax.jit(fn).lower(*args).compile()


def _median_step(compiled, *args) -> float:
    import jax

    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return sorted(times)[1]


def measure(scan: bool) -> dict:
    import jax
    import optax

    import jaxlora

    model, params, adapters, plan, x, y = _setup(scan)

    def lora_loss(adapters, params, x, y):
        logits = jaxlora.apply(model, {"params": params}, adapters, plan, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def full_loss(blocks, params, x, y):
        logits = model.apply({"params": {**params, **blocks}}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    lora = _compiled(jax.value_and_grad(lora_loss), adapters, params, x, y)
    blocks = {k: v for k, v in params.items() if k.startswith("h")}
    full = _compiled(jax.value_and_grad(full_loss), blocks, params, x, y)
    out = {
        "lora_temp_mib": lora.memory_analysis().temp_size_in_bytes / MIB,
        "full_temp_mib": full.memory_analysis().temp_size_in_bytes / MIB,
    }
    if scan:
        out["lora_step_s"] = _median_step(lora, adapters, params, x, y)
    return out


def measure_remat() -> dict:
    """The scanned LoRA step with `GPT2Config(remat="dots_with_no_batch_dims_saveable")`: only the projections'
    outputs kept, the element-wise work recomputed in the backward pass."""
    import dataclasses

    import jax
    import optax

    import jaxlora

    model, params, adapters, plan, x, y = _setup(True)
    model = model.clone(config=dataclasses.replace(model.config, remat="dots_with_no_batch_dims_saveable"))

    def lora_loss(adapters, params, x, y):
        logits = jaxlora.apply(model, {"params": params}, adapters, plan, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    lora = _compiled(jax.value_and_grad(lora_loss), adapters, params, x, y)
    return {
        "lora_temp_mib": lora.memory_analysis().temp_size_in_bytes / MIB,
        "lora_step_s": _median_step(lora, adapters, params, x, y),
    }


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    load_before = os.getloadavg()
    rows = {"unrolled": measure(False), "scanned": measure(True), "scanned_remat_dots": measure_remat()}
    out = {"command": "python benchmarks/scan_overhead.py", "load_before": load_before, **rows}
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
