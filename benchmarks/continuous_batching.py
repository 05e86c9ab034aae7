"""Continuous batching against static batches and PEFT, tokens per second on the same requests, side by side.

A Llama of about 125M parameters (hidden 768, 12 layers, 12 query / 4 key-value heads, MLP 2048, vocabulary 32000,
untied head, random weights, float32, scanned layers) with 4 LoRA r16 adapters on every linear layer, and 64
requests waiting at once: prompt lengths 16-128 and budgets 8-64 tokens drawn with a fixed seed, request i on
adapter i % 4, greedy decoding. Three ways to serve them, each in a fresh process, rounds alternating the order:

* ``continuous``: ``jaxlora.models.continuous_batching.Server``, 8 rows over an adapter bank
  (``jaxlora.apply_bank_nnx``), prompts padded to the Server's default buckets (16, 32, 64, 128, ...);
* ``static``: the requests in batches of 8 in order, each batch left-padded to its longest prompt and decoding
  until its largest budget (``jaxlora.models.llama.generate`` over the same bank);
* ``peft``: the same batches through PEFT's ``generate(adapter_names=...)`` on transformers' ``LlamaForCausalLM``
  of the same shape.

Tokens per second counts the tokens the requests asked for (sum of budgets) over the wall time of serving them
all; compilation is excluded (the jax ways serve the requests once untimed first, which compiles every shape).

    python benchmarks/continuous_batching.py --rounds 3     # writes results/continuous_batching.json
    python benchmarks/continuous_batching.py --one static   # one measurement, printed
    python benchmarks/continuous_batching.py --quick --rounds 1 --out /tmp/cb.json   # a tiny shape (its test)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "continuous_batching.json"
SHAPE = dict(
    vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
    num_key_value_heads=4,
)  # fmt: skip
REQUESTS, ROWS, ADAPTERS, RANK = 64, 8, 4, 16
PROMPTS, BUDGETS = (16, 128), (8, 64)
if os.environ.get("JAXLORA_BENCH_QUICK"):  # --quick: a tiny Llama and a few short requests
    SHAPE = dict(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    REQUESTS, PROMPTS, BUDGETS = 12, (16, 40), (2, 8)
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
WAYS = ("continuous", "static", "peft")


def requests() -> list[tuple[list[int], int, int]]:
    """(prompt, budget, adapter) of every request, the same in every process."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    for i in range(REQUESTS):
        length = int(rng.integers(PROMPTS[0], PROMPTS[1] + 1))
        prompt = rng.integers(3, SHAPE["vocab_size"], length).tolist()
        out.append((prompt, int(rng.integers(BUDGETS[0], BUDGETS[1] + 1)), i % ADAPTERS))
    return out


def _jax_model():
    import jax
    from flax import nnx

    import jaxlora
    from jaxlora.models import llama

    model = llama.Llama(llama.LlamaConfig(**SHAPE), scan_layers=True, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    config = jaxlora.LoraConfig(
        rank=RANK, alpha=2.0 * RANK, targets=(llama.PEFT_TARGETS_SCANNED,), stacked_axes=llama.STACKED_AXES
    )
    plan = jaxlora.plan(params, config)
    sets = []
    for i in range(ADAPTERS):
        _, adapters = jaxlora.init(jax.random.key(i), params, plan)
        leaves, tree = jax.tree.flatten(adapters)
        keys = jax.random.split(jax.random.key(100 + i), len(leaves))
        noise = [0.01 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
        sets.append((jax.tree.unflatten(tree, noise), plan))
    return model, jaxlora.adapter_bank(sets)


def _continuous(model, bank):
    """`serve(work)` through one Server (compiled on its first run, reused after)."""
    import jax.numpy as jnp
    from flax import nnx

    import jaxlora
    from jaxlora.models import llama
    from jaxlora.models.continuous_batching import Request, Server

    graphdef, state = nnx.split(model)

    def forward(server_state, ids, cache, slots):
        model_state, bank = server_state
        module = nnx.merge(graphdef, model_state)
        return jaxlora.apply_bank_nnx(module, bank, slots, ids, kv_cache=cache)

    server = Server(
        forward, (state, bank), lambda b, n: llama.init_cache(model.config, b, n, jnp.float32), rows=ROWS,
        max_length=PROMPTS[1] + BUDGETS[1], adapters=bank.names,
    )  # fmt: skip

    def serve(work):
        done = server.run([Request(prompt, budget, slot) for prompt, budget, slot in work])
        return [list(c.tokens) for c in done], dict(server.compilations)

    return serve


def _bank_forward(model, state, ids, cache):
    import jaxlora

    bank, slots = state
    return jaxlora.apply_bank_nnx(model, bank, slots, ids, kv_cache=cache)


def _static(model, bank):
    return lambda work: _static_batches(model, bank, work)


def _static_batches(model, bank, work) -> tuple[list[list[int]], dict]:
    import numpy as np

    from jaxlora.models import llama

    out = []
    for start in range(0, len(work), ROWS):
        group = work[start : start + ROWS]
        width = max(len(p) for p, _, _ in group)
        budget = max(b for _, b, _ in group)
        ids = np.zeros((len(group), width), np.int32)
        mask = np.zeros((len(group), width), np.int32)
        for r, (prompt, _, _) in enumerate(group):
            ids[r, width - len(prompt) :], mask[r, width - len(prompt) :] = prompt, 1
        slots = bank.ids([slot for _, _, slot in group])
        tokens = llama.generate(
            model, ids, budget, attention_mask=mask, forward=_bank_forward, state=(bank, slots)
        )  # fmt: skip
        tokens = np.asarray(tokens)[:, width:]
        out += [tokens[r, :b].tolist() for r, (_, b, _) in enumerate(group)]
    return out, {}


def _peft(work) -> tuple[list[list[int]], dict]:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SHAPE, tie_word_embeddings=False, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).eval()
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(MODULES), init_lora_weights=False)
    model = get_peft_model(model, lora, adapter_name="a0")
    for i in range(1, ADAPTERS):
        model.add_adapter(f"a{i}", lora)
    model = model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    out = []
    with torch.no_grad():
        for start in range(0, len(work), ROWS):
            group = work[start : start + ROWS]
            width = max(len(p) for p, _, _ in group)
            budget = max(b for _, b, _ in group)
            ids = torch.zeros((len(group), width), dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for r, (prompt, _, _) in enumerate(group):
                ids[r, width - len(prompt) :], mask[r, width - len(prompt) :] = torch.tensor(prompt), 1
            tokens = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=budget, min_new_tokens=budget, do_sample=False,
                adapter_names=[f"a{slot}" for _, _, slot in group],
            )  # fmt: skip
            out += [tokens[r, width : width + b].tolist() for r, (_, b, _) in enumerate(group)]
    return out, {}


def measure(way: str) -> dict:
    """Serves the requests one way (twice for jax: the first run compiles), timing the last run."""
    work = requests()
    if way == "peft":
        run = lambda: _peft(work)
        warm = False
    else:
        model, bank = _jax_model()
        serve = (_continuous if way == "continuous" else _static)(model, bank)
        run = lambda: serve(work)
        warm = True
    compile_s = None
    if warm:
        start = time.perf_counter()
        run()
        compile_s = time.perf_counter() - start
    start = time.perf_counter()
    tokens, compilations = run()
    seconds = time.perf_counter() - start
    asked = sum(b for _, b, _ in work)
    assert [len(t) for t in tokens] == [b for _, b, _ in work]
    return {
        "way": way,
        "seconds": seconds,
        "tokens": asked,
        "tokens_per_s": asked / seconds,
        "first_run_s": compile_s,
        "compilations": compilations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", choices=WAYS, help="one measurement in this process, printed as JSON")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--quick", action="store_true", help="a tiny model and a few requests (for tests)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick and not os.environ.get("JAXLORA_BENCH_QUICK"):
        os.environ["JAXLORA_BENCH_QUICK"] = "1"
        os.execv(sys.executable, [sys.executable, __file__, *sys.argv[1:]])
    if args.one:
        print(json.dumps(measure(args.one)))
        return
    ways = args.ways.split(",")
    load_before = os.getloadavg()
    rounds = []
    for i in range(args.rounds):
        order = ways if i % 2 == 0 else ways[::-1]
        results = {}
        for way in order:
            proc = subprocess.run(
                [sys.executable, __file__, "--one", way], capture_output=True, text=True,
                env={**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")},
            )  # fmt: skip
            if proc.returncode:
                sys.exit(f"{way} failed:\n{proc.stderr[-4000:]}")
            results[way] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"round {i + 1} {way}: {results[way]['tokens_per_s']:.1f} tokens/s", flush=True)
        rounds.append(results)
    ratios = {}
    for other in ("static", "peft"):
        if "continuous" in ways and other in ways:
            per_round = [r["continuous"]["tokens_per_s"] / r[other]["tokens_per_s"] for r in rounds]
            ratios[f"continuous_vs_{other}"] = {"median": sorted(per_round)[len(per_round) // 2], "rounds": per_round}
    out = {
        "command": "python benchmarks/continuous_batching.py " + " ".join(sys.argv[1:]),
        "shape": SHAPE,
        "requests": REQUESTS,
        "rows": ROWS,
        "adapters": ADAPTERS,
        "rank": RANK,
        "prompt_lengths": PROMPTS,
        "budgets": BUDGETS,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "rounds": rounds,
        "ratios": ratios,
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
