"""Serving several LoRA adapters of one Llama / Qwen2 with continuous batching: requests arrive over time, each
with its own prompt, token budget and adapter, and share the rows of one KV cache.

The adapters go into one ``jaxlora.adapter_bank``; ``jaxlora.models.continuous_batching.Server`` prefills each
request as it arrives into a free row and decodes one token per step for every busy row, each through its own
adapter slot (``jaxlora.apply_bank_nnx``); a row whose request is done takes the next one at once. The example
then checks requests against running each one alone with its adapter merged into the weights (``jaxlora.merge``,
then ``jaxlora.models.llama.generate``): the tokens must be equal.

    python examples/serve.py                           # a random small Llama and 4 made-up adapters: ~1 min
    python examples/serve.py --quick                   # tiny model, few requests (for tests)
    python examples/serve.py --base DIR --adapter sms=DIR2 --adapter other=DIR3
                                                       # a Hugging Face Llama/Qwen2 checkpoint and PEFT adapters
                                                       # (e.g. what examples/llama_sft.py writes to runs/)

Requests are made up (token ids; arrivals a Poisson process of ``--rate`` requests per decoding step, prompt
lengths and budgets uniform in ``--prompt-lengths`` and ``--budgets``), so the example runs offline on any
checkpoint. Outputs in ``--out``: ``metrics.json`` (tokens/s, compilations, per-request steps, the check).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxlora
from jaxlora.models import llama
from jaxlora.models.continuous_batching import Request, Server
from jaxlora.peft_format import load_peft

RANDOM_MODEL = dict(
    vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2,
)  # fmt: skip
QUICK_MODEL = dict(
    vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2,
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="Hugging Face Llama/Qwen2 checkpoint (directory or hub id); default: random")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="a PEFT adapter directory")
    parser.add_argument("--adapters", type=int, default=4, help="made-up adapters when no --adapter is given")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--rate", type=float, default=0.5, help="requests arriving per decoding step (Poisson)")
    parser.add_argument("--prompt-lengths", type=int, nargs=2, default=(8, 96))
    parser.add_argument("--budgets", type=int, nargs=2, default=(4, 48))
    parser.add_argument("--rows", type=int, default=8, help="requests decoding at once")
    parser.add_argument("--check", type=int, default=6, help="requests checked against running alone, merged")
    parser.add_argument("--quick", action="store_true", help="tiny model, few requests (for tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/serve"))
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.prompt_lengths, args.budgets, args.rows, args.check = 10, (2, 12), (1, 8), 3, 4
    for name, (low, high) in (("--prompt-lengths", args.prompt_lengths), ("--budgets", args.budgets)):
        if not 1 <= low <= high:
            parser.error(f"{name} {low} {high}: give a low and a high bound with 1 <= low <= high")
    return args


def base_model(args) -> llama.Llama:
    if args.base:
        return llama.load_hf_weights(args.base, scan_layers=True, dtype=jnp.float32)
    config = llama.LlamaConfig(**(QUICK_MODEL if args.quick else RANDOM_MODEL))
    return llama.Llama(config, scan_layers=True, rngs=nnx.Rngs(args.seed))


def adapter_sets(args, model: llama.Llama) -> dict[str, tuple[dict, jaxlora.Plan]]:
    """The PEFT directories given, or made-up adapters of ranks 4, 8, 16, ... on every linear layer."""
    params = nnx.state(model, nnx.Param)
    if args.adapter:
        name_map = llama.peft_name_map(model.config, scan_layers=True)
        sets = {}
        for spec in args.adapter:
            name, sep, directory = spec.partition("=")
            if not sep or not name or not directory:
                sys.exit(f"--adapter {spec!r}: write NAME=DIR, e.g. --adapter sms=runs/llama_sft/adapter")
            _, adapters, plan = load_peft(directory, params, name_map=name_map)
            sets[name] = (adapters, plan)
        return sets
    sets = {}
    for i in range(args.adapters):
        rank = 4 * 2 ** (i % 3)
        config = jaxlora.LoraConfig(
            rank=rank, alpha=2.0 * rank, targets=(llama.PEFT_TARGETS_SCANNED,), stacked_axes=llama.STACKED_AXES
        )
        plan = jaxlora.plan(params, config)
        _, adapters = jaxlora.init(jax.random.key(args.seed + i), params, plan)
        leaves, tree = jax.tree.flatten(adapters)
        keys = jax.random.split(jax.random.key(args.seed + 100 + i), len(leaves))
        noise = [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
        sets[f"task{i}"] = (jax.tree.unflatten(tree, noise), plan)
    return sets


def make_requests(args, vocab: int, names: list[str]) -> list[Request]:
    rng = np.random.default_rng(args.seed)
    arrivals = np.floor(np.cumsum(rng.exponential(1.0 / args.rate, args.requests))).astype(int)
    out = []
    for i, arrival in enumerate(arrivals):
        length = int(rng.integers(args.prompt_lengths[0], args.prompt_lengths[1] + 1))
        adapter = None if i % (len(names) + 1) == len(names) else names[i % (len(names) + 1)]  # some on the base
        budget = int(rng.integers(args.budgets[0], args.budgets[1] + 1))
        out.append(Request(rng.integers(0, vocab, length).tolist(), budget, adapter, int(arrival)))
    return out


def alone(model: llama.Llama, sets, request: Request) -> tuple[int, ...]:
    """The request run on its own through the model with its adapter merged into the weights."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if request.adapter is not None:
        params = jaxlora.merge(params, *sets[request.adapter])
    merged = nnx.merge(graphdef, params, rest)
    out = llama.generate(merged, np.asarray(request.prompt), request.max_new_tokens)
    return tuple(int(t) for t in np.asarray(out)[len(request.prompt) :])


def _request_metrics(c) -> dict:
    request = c.request
    return {
        "adapter": request.adapter, "prompt": len(request.prompt), "budget": request.max_new_tokens,
        "arrival": request.arrival, "admitted": c.admitted, "finished": c.finished,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model = base_model(args)
    sets = adapter_sets(args, model)
    bank = jaxlora.adapter_bank(sets)
    requests = make_requests(args, model.config.vocab_size, list(bank.names))
    graphdef, state = nnx.split(model)

    def forward(server_state, ids, cache, adapter_ids):
        model_state, bank = server_state
        return jaxlora.apply_bank_nnx(nnx.merge(graphdef, model_state), bank, adapter_ids, ids, kv_cache=cache)

    max_length = args.prompt_lengths[1] + args.budgets[1]
    server = Server(
        forward, (state, bank), lambda batch, length: llama.init_cache(model.config, batch, length), rows=args.rows,
        max_length=max_length, adapters=bank.names,
    )  # fmt: skip
    print(f"Serving {len(requests)} requests on {len(bank.names)} adapters {list(bank.names)} + the base model, "
          f"{args.rows} rows of {max_length} slots.")  # fmt: skip
    start = time.perf_counter()
    done = server.run(requests)
    seconds = time.perf_counter() - start
    tokens = sum(len(c.tokens) for c in done)
    print(f"{tokens} tokens in {seconds:.1f} s (compilation included): {tokens / seconds:.1f} tokens/s; "
          f"compiled {server.compilations}; {done[-1].finished + 1} decoding steps.")  # fmt: skip
    checked = list(range(0, len(requests), max(1, len(requests) // max(1, args.check))))[: args.check]
    equal = [done[i].tokens == alone(model, sets, requests[i]) for i in checked]
    print(f"Requests {checked} against running alone with their adapter merged: {sum(equal)}/{len(equal)} equal.")
    metrics = {
        "requests": len(requests),
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "compilations": server.compilations,
        "steps": done[-1].finished + 1,
        "per_request": [_request_metrics(c) for c in done],
        "checked": checked,
        "equal_alone": all(equal),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if not all(equal):
        sys.exit("a request's tokens differ from running it alone with its adapter merged")
    return metrics


if __name__ == "__main__":
    main()
