"""Serving several adapters at once, jax side: mixed-batch prefill and KV-cache decoding through an adapter bank.

GPT-2 language model (random weights, the benchmark's GPT-2 shape), 4 LoRA r16 adapters on every block linear,
`batch` rows spread over them (row b uses adapter b % 4). Runners (registered in jax_worker.RUNNERS):

* `jax_gpt2_multi_adapter_prefill`: one jitted `jaxlora.apply_bank` forward of the (batch, seq) prompts into a
  fresh KV cache (logits + cache, as transformers' forward returns logits + past_key_values); its peer is
  `torch_gpt2_multi_adapter_prefill_peft` (PEFT's `adapter_names=`).
* `jax_gpt2_multi_adapter_decode`: `jaxlora.models.gpt2.generate` of `NEW_TOKENS` greedy tokens for all rows in one
  batch through the bank, timed side by side with serving the 4 groups one after another (the same cached
  `generate`, each group through `jaxlora.apply` with its adapter); its peer is
  `torch_gpt2_multi_adapter_decode_peft` (PEFT's `generate(..., adapter_names=)`). Also the bank's bytes against
  N x one adapter.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxlora
from benchmarks import common
from benchmarks.common import GPT2_LORA, GPT2Shape, Profile
from benchmarks.multi_adapter_shapes import SLOTS, decode_sizes, prompt_lengths
from jaxlora.models.gpt2 import GPT2, GPT2Config, generate, init_cache, left_pad


def lm(shape: GPT2Shape) -> tuple[GPT2, dict]:
    """GPT-2 language model with the benchmark shape, normal(0.02) weights filled leaf by leaf with numpy."""
    config = GPT2Config(
        vocab_size=shape.vocab, n_positions=1024 if shape.n_embd >= 768 else 128, n_embd=shape.n_embd,
        n_layer=shape.n_layer, n_head=shape.n_head, dropout=0.0,
    )  # fmt: skip
    model = GPT2(config)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    rng = np.random.default_rng(0)

    def leaf(path: tuple, s: jax.ShapeDtypeStruct) -> jax.Array:
        name = getattr(path[-1], "key", "")
        if name in ("scale", "bias"):
            return (jnp.ones if name == "scale" else jnp.zeros)(s.shape, s.dtype)
        return jnp.asarray(rng.standard_normal(s.shape, dtype=np.float32) * np.float32(0.02), s.dtype)

    return model, jax.tree_util.tree_map_with_path(leaf, shapes)


def adapter_sets(params: dict, slots: int, rank: int = 16) -> list[tuple[dict, jaxlora.Plan]]:
    """`slots` r16 adapter sets on every block linear, B perturbed away from zero so each changes the output."""
    spec = GPT2_LORA["r16"]
    cfg = jaxlora.LoraConfig(rank=rank, alpha=spec["alpha"], targets=(rf"h_\d+/({'|'.join(spec['modules'])})/kernel",))
    plan = jaxlora.plan(params, cfg)
    sets = []
    for i in range(slots):
        _, adapters = jaxlora.init(jax.random.key(10 + i), params, plan)
        leaves, tree = jax.tree.flatten(adapters)
        keys = jax.random.split(jax.random.key(20 + i), len(leaves))
        leaves = [x + 0.01 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
        sets.append((jax.tree.unflatten(tree, leaves), plan))
    return sets


def bank_forward(model, state, ids, cache):
    params, bank, adapter_ids = state
    return jaxlora.apply_bank(model, {"params": params}, bank, adapter_ids, ids, kv_cache=cache)


def lora_forward(model, state, ids, cache):
    params, adapters, plan = state[0], state[1], PLAN["plan"]
    return jaxlora.apply(model, {"params": params}, adapters, plan, ids, kv_cache=cache)


PLAN: dict[str, jaxlora.Plan] = {}  # lora_forward is a static argument of generate: the plan reaches it here


def _bytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _timed(fn, profile: Profile) -> dict[str, Any]:
    return common.time_steps(fn, jax.block_until_ready, warmup=max(profile.warmup, 1), steps=1,
                             repeats=max(profile.repeats, 3))  # fmt: skip


def prefill(profile: Profile) -> dict[str, Any]:
    """One jitted apply_bank forward of the mixed batch into a fresh KV cache."""
    shape = profile.gpt2
    slots = min(SLOTS, shape.batch)
    model, params = lm(shape)
    sets = adapter_sets(params, slots)
    bank = jaxlora.adapter_bank(sets)
    ids = jnp.arange(shape.batch, dtype=jnp.int32) % slots
    x = jnp.asarray(np.random.default_rng(0).integers(0, shape.vocab - 1, (shape.batch, shape.seq)), jnp.int32)

    @jax.jit
    def forward(params, bank, adapter_ids, x):
        cache = init_cache(model.config, x.shape[0], x.shape[1])
        return jaxlora.apply_bank(model, {"params": params}, bank, adapter_ids, x, kv_cache=cache)

    start = time.perf_counter()
    logits, _ = jax.block_until_ready(forward(params, bank, ids, x))
    compile_s = time.perf_counter() - start
    # Row 1 against its adapter merged and run alone (a check that the bank serves what it claims).
    merged = jaxlora.merge(params, *sets[int(ids[1])])
    alone = model.apply({"params": merged}, x[1:2])[0]
    timing = _timed(lambda: forward(params, bank, ids, x), profile)
    return {
        "step_s": timing,
        "tokens_per_s": shape.batch * shape.seq / timing["median"],
        "compile_s": compile_s,
        "slots": slots,
        "max_abs_diff_row_vs_merged": float(jnp.max(jnp.abs(logits[1] - alone))),
    }


def decode(profile: Profile) -> dict[str, Any]:
    """Greedy KV-cache decoding of the mixed batch through the bank vs the 4 groups one after another."""
    shape = profile.gpt2
    slots = min(SLOTS, shape.batch)
    prompt, new = decode_sizes(profile)
    model, params = lm(shape)
    sets = adapter_sets(params, slots)
    bank = jaxlora.adapter_bank(sets)
    PLAN["plan"] = sets[0][1]
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, shape.vocab - 1, n) for n in prompt_lengths(shape.batch, prompt)]
    slot_of_row = [row % slots for row in range(shape.batch)]
    ids, mask = left_pad(prompts)
    adapter_ids = bank.ids(slot_of_row)
    groups = []
    for slot in range(slots):
        rows = [r for r in range(shape.batch) if slot_of_row[r] == slot]
        group_ids, group_mask = left_pad([prompts[r] for r in rows])
        groups.append((rows, slot, group_ids, group_mask))

    def mixed():
        return generate(model, (params, bank, adapter_ids), ids, new, attention_mask=mask, forward=bank_forward)

    def one_after_another():
        return [
            generate(model, (params, sets[slot][0]), gids, new, attention_mask=gmask, forward=lora_forward)
            for _, slot, gids, gmask in groups
        ]

    start = time.perf_counter()
    tokens = np.asarray(jax.block_until_ready(mixed()))
    compile_mixed_s = time.perf_counter() - start
    start = time.perf_counter()
    grouped = [np.asarray(t) for t in jax.block_until_ready(one_after_another())]
    compile_groups_s = time.perf_counter() - start
    same = all(
        np.array_equal(tokens[row, -new:], out[i, -new:])
        for (rows, _, _, _), out in zip(groups, grouped, strict=True)
        for i, row in enumerate(rows)
    )
    fns = {"mixed": mixed, "one_after_another": one_after_another}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(profile.repeats, 3)):  # alternating, so a load change hits both alike
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            samples[name].append(time.perf_counter() - t)
    timings = {name: common.summarize(values) for name, values in samples.items()}
    tokens_total = shape.batch * new
    one = _bytes(sets[0][0])
    mixed_ranks = jaxlora.adapter_bank(adapter_sets(params, 1, 8) + adapter_sets(params, 1, 16)) if slots > 1 else None
    return {
        "step_s": timings["mixed"],
        "timings": timings,
        "tokens_per_s": tokens_total / timings["mixed"]["median"],
        "tokens_per_s_one_after_another": tokens_total / timings["one_after_another"]["median"],
        "speedup_vs_one_after_another": timings["one_after_another"]["median"] / timings["mixed"]["median"],
        "same_tokens_as_one_after_another": same,
        "compile_s": compile_mixed_s,
        "compile_groups_s": compile_groups_s,
        "rows": shape.batch,
        "slots": slots,
        "prompt_lengths": prompt_lengths(shape.batch, prompt),
        "new_tokens": new,
        "bank_bytes": bank.num_bytes,
        "one_adapter_bytes": one,
        "bank_padding_bytes": bank.num_bytes - slots * one,
        "mixed_rank_bank": None
        if mixed_ranks is None
        else {"ranks": [8, 16], "bank_bytes": mixed_ranks.num_bytes, "r8_plus_r16_bytes": one // 2 + one},
    }
