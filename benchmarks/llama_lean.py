"""A Llama LoRA step's XLA scratch memory and time, this checkout against another one, side by side.

The step: r16 LoRA on every linear layer of an unrolled Llama (about 125M parameters: hidden 768, 12 layers, 12
query / 4 key-value heads, MLP 2048, vocabulary 32000), next-token cross-entropy on batch 8 x 128, AdamW on the
adapters, served by ``jaxlora.apply_nnx``. Each measurement runs in a fresh process that imports jaxlora from the
checkout it measures; rounds alternate the order of the two checkouts.

    python benchmarks/llama_lean.py --other PATH_TO_OTHER_CHECKOUT --rounds 3   # writes results/llama_lean.json
    python benchmarks/llama_lean.py --one                                        # one measurement, printed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "llama_lean.json"
SHAPE = dict(
    vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
    num_key_value_heads=4,
)  # fmt: skip
BATCH, LENGTH, STEPS = 8, 128, 3


def measure() -> dict:
    """One compile and STEPS timed steps (after one untimed) of the LoRA step, in this process."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    import jaxlora
    from jaxlora.models import llama

    model = llama.Llama(llama.LlamaConfig(**SHAPE), scan_layers=False, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.state(model, nnx.Param)
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=16, alpha=16.0, targets=(llama.PEFT_TARGETS,)))
    _, adapters = jaxlora.init(jax.random.key(1), params, plan)
    adapters = jax.tree.map(lambda a: a + 0.01, adapters)  # B != 0: every term of the step is live
    tx = optax.adamw(1e-4)
    opt_state = tx.init(adapters)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, SHAPE["vocab_size"], (BATCH, LENGTH + 1)), jnp.int32)

    def step(adapters, opt_state, state, ids):
        def loss_fn(adapters):
            logits = jaxlora.apply_nnx(nnx.merge(graphdef, state), adapters, plan, ids[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(adapters, opt_state, state, ids).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    adapters, opt_state, loss = compiled(adapters, opt_state, state, ids)
    jax.block_until_ready(loss)
    times, losses = [], [float(loss)]
    for _ in range(STEPS):
        start = time.perf_counter()
        adapters, opt_state, loss = compiled(adapters, opt_state, state, ids)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    return {
        "jaxlora": str(Path(jaxlora.__file__).parent.parent),
        "step_temp_bytes": int(memory.temp_size_in_bytes),
        "step_s": sorted(times)[len(times) // 2],
        "step_times_s": times,
        "compile_s": compile_s,
        "losses": losses,
    }


def _run(checkout: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    script = Path(__file__).resolve()
    out = subprocess.run([sys.executable, str(script), "--one"], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(other: Path, rounds: int) -> dict:
    here = Path(__file__).resolve().parent.parent
    result = {
        "command": f"python benchmarks/llama_lean.py --other OTHER --rounds {rounds}",
        "shape": {**SHAPE, "batch": BATCH, "length": LENGTH, "rank": 16, "steps": STEPS},
        "load_average_before": os.getloadavg(),
        "rounds": [],
    }
    for r in range(rounds):
        order = [("other", other), ("this", here)] if r % 2 == 0 else [("this", here), ("other", other)]
        result["rounds"].append({name: _run(path) for name, path in order})
        print(
            json.dumps({k: {m: v[m] for m in ("step_temp_bytes", "step_s")} for k, v in result["rounds"][-1].items()})
        )
    ratios = lambda key: [r["this"][key] / r["other"][key] for r in result["rounds"]]
    result["this_over_other"] = {key: ratios(key) for key in ("step_temp_bytes", "step_s", "compile_s")}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", action="store_true", help="measure this process's jaxlora once and print JSON")
    parser.add_argument("--other", type=Path, help="the checkout to compare with (e.g. a git worktree)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure()))
        return
    if args.other is None:
        parser.error("give --other PATH (or --one)")
    result = compare(args.other.resolve(), args.rounds)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
