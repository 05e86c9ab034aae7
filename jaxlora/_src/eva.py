"""EVA (Paischer et al. 2024, "explained variance adaptation"): A from the principal directions of each adapted layer's
inputs over a few batches of data, B = 0, and the ranks redistributed across layers by explained variance.

`init_eva` runs the user's own forward function (`jaxlora.apply` / `apply_nnx` with the adapters it is given, jitted
or not, stacked layers included) on probe adapters: B = 0, so the model computes the base model, and each stacked
layer's A slice carries its layer index. While it runs, jaxlora's serving observes every product of an adapted
kernel with x (`interpreter.observing`), and the layer's input statistics (Σ x xᵀ, Σ x, count; computed on device)
go to a host accumulator through an `io_callback`, which works inside `jit`, `nn.scan` and `nnx.scan`. The principal
directions then come from one jitted eigendecomposition per leaf, batched over its stacked layers: exactly the PCA
of all the tokens seen (PEFT's incremental PCA approximates the same, stopping early once the leading directions
settle).

Rank redistribution, PEFT's rule (`peft.tuners.lora.eva`): each adapted layer offers its first round(rho x r)
explained-variance ratios; the r-budget (the sum of the layers' ranks) goes to the largest ratios over all layers; a
layer's new rank is how many of its ratios were taken; with PEFT's default `adjust_scaling_factors`, its alpha
becomes alpha x new_rank / r (so s = alpha / r is kept). Layers that get rank 0 lose their adapter. The result is a
new config with this `rank_pattern` / `alpha_pattern` (exact paths), as PEFT records them.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxlora._src.config import LoraConfig
from jaxlora._src.interpreter import observing
from jaxlora._src.operands import Operand
from jaxlora._src.paths import PyTree, unflatten_adapters
from jaxlora._src.planning import LeafPlan, Plan, resolve
from jaxlora._src.planning import plan as make_plan


class _Moments:
    """Host-side running sums of one leaf's layer inputs, per stacked layer: Σ x xᵀ, Σ x and the token count."""

    def __init__(self, leaf: LeafPlan):
        self.xtx = np.zeros((leaf.num_layers, leaf.fan_in, leaf.fan_in))
        self.sum = np.zeros((leaf.num_layers, leaf.fan_in))
        self.count = np.zeros(leaf.num_layers)

    def add(self, layer, xtx, total, count) -> None:
        layer = int(np.rint(layer))
        self.xtx[layer] += xtx
        self.sum[layer] += total
        self.count[layer] += count


def _recorder(moments: Mapping[str, _Moments]) -> Callable[[Operand, jax.Array], None]:
    """An observer sending an adapted layer's input moments to `moments` (see `interpreter.observing`)."""

    def record(tag: Operand, rows: jax.Array) -> None:
        if tag.path not in moments:
            return
        if not jnp.issubdtype(rows.dtype, jnp.floating):
            raise ValueError(
                f"init_eva: the layer of {tag.path!r} was called with {rows.dtype} inputs: EVA needs the float inputs "
                "of linear layers (PEFT's EVA skips embeddings and convolutions too); leave it out of the targets"
            )
        rows = rows.astype(jnp.float32)
        layer = tag.a.reshape(-1)[0]  # the probe A carries its layer's index
        stats = (layer, rows.T @ rows, rows.sum(axis=0), jnp.float32(rows.shape[0]))
        if any(isinstance(x, jax.core.Tracer) for x in stats):
            io_callback(moments[tag.path].add, None, *stats)  # under jit or in a scan body: when the program runs
        else:
            # An eager forward: added here and now. An io_callback bound eagerly is a program of its own that
            # waits for the GIL, while the Python thread can wait for a free execution slot holding the GIL: a
            # deadlock, seen once in CI on a loaded machine (EVA on an eager NNX scanned Llama).
            moments[tag.path].add(*(np.asarray(x) for x in stats))

    return record


def _probes(plan: Plan) -> dict:
    """Adapters with B = 0 (the model computes the base model) whose A is filled with each stacked layer's index."""
    probes = {}
    for path, leaf in plan.leaves.items():
        index = jnp.arange(leaf.num_layers, dtype=jnp.float32)
        index = index.reshape(*leaf.stack_shape, *[1] * (len(leaf.a_shape) - leaf.stacked_axes))
        probes[path] = {"lora_a": jnp.broadcast_to(index, leaf.a_shape), "lora_b": jnp.zeros(leaf.b_shape, jnp.float32)}
    return unflatten_adapters(probes)


@jax.jit
def principal_directions(xtx: jax.Array, total: jax.Array, count: jax.Array) -> tuple[jax.Array, jax.Array]:
    """PCA of the inputs from their moments, batched over a leading layer axis.

    Args:
      xtx: Σ x xᵀ per layer (L, d, d).
      total: Σ x per layer (L, d).
      count: tokens per layer (L,).

    Returns:
      `(components, ratios)`: the principal directions as rows (L, d, d), by decreasing variance, each signed so that
      its largest-magnitude entry is positive (scikit-learn's `svd_flip` convention), and the explained-variance ratios
      (L, d) (eigenvalues of the covariance over its trace).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxlora._src.eva import principal_directions
      >>> x = jnp.array([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
      >>> components, ratios = principal_directions((x.T @ x)[None], x.sum(0)[None], jnp.array([4.0]))
      >>> components[0, 0].tolist(), [round(float(r), 2) for r in ratios[0]]
      ([1.0, 0.0], [0.8, 0.2])
    """
    mean = total / count[:, None]
    cov = (xtx - count[:, None, None] * mean[:, :, None] * mean[:, None, :]) / jnp.maximum(count - 1, 1)[:, None, None]
    values, vectors = jnp.linalg.eigh(cov)  # ascending
    values, vectors = jnp.maximum(values[:, ::-1], 0.0), jnp.swapaxes(vectors[:, :, ::-1], 1, 2)
    biggest = jnp.take_along_axis(vectors, jnp.abs(vectors).argmax(axis=2)[:, :, None], axis=2)
    vectors = vectors * jnp.where(biggest < 0, -1.0, 1.0)
    trace = jnp.trace(cov, axis1=1, axis2=2)
    return vectors, values / trace[:, None]


def redistribute(ratios: Mapping[tuple[str, int], np.ndarray], ranks: Mapping[tuple[str, int], int], rho: float):
    """PEFT's EVA rank redistribution over adapted layers `(path, layer)`.

    Args:
      ratios: each layer's explained-variance ratios, decreasing.
      ranks: each layer's configured rank r (the budget is their sum).
      rho: a layer offers at most round(rho x r) directions.

    Returns:
      `{(path, layer): new rank}` (0 for a layer whose ratios were all outbid).

    Example:
      >>> import numpy as np
      >>> from jaxlora._src.eva import redistribute
      >>> ratios = {("a", 0): np.array([0.5, 0.3, 0.1]), ("b", 0): np.array([0.4, 0.05, 0.01])}
      >>> redistribute(ratios, {("a", 0): 2, ("b", 0): 2}, rho=1.5)
      {('a', 0): 3, ('b', 0): 1}
    """
    offered = [(float(value), unit) for unit, values in ratios.items() for value in values[: round(ranks[unit] * rho)]]
    offered.sort(key=lambda item: -item[0])
    counts = dict.fromkeys(ratios, 0)
    for _, unit in offered[: sum(ranks.values())]:
        counts[unit] += 1
    return counts


def _redistributed_config(plan: Plan, counts: Mapping[tuple[str, int], int]) -> LoraConfig:
    """The plan's config with PEFT's EVA rank_pattern / alpha_pattern (exact paths, replacing the old ones, as PEFT
    does) and the leaves (or stacked layers) that got rank 0 left out."""
    config = plan.config
    rank_pattern, alpha_pattern, exclude, layers = {}, {}, list(config.exclude), {}
    for path, leaf in plan.leaves.items():
        chosen = {layer: counts[(path, layer)] for layer in _adapted_layers(leaf)}
        rank = max(chosen.values())
        exact = re.escape(path)
        if rank == 0:
            exclude.append(exact)
            continue
        if config.use_rslora and len({c for c in chosen.values() if c}) > 1:
            raise ValueError(
                f"init_eva: the stacked layers of {path!r} got different ranks {sorted(set(chosen.values()))}; a "
                "stack holds one rank (the smaller ones padded with zero directions, which stay zero in training), "
                "which keeps each layer's scale only without rsLoRA: use use_rslora=False, or eva_rho=1"
            )
        if leaf.stacked_axes and any(c == 0 for c in chosen.values()):
            layers[exact] = tuple(layer for layer, c in chosen.items() if c)
        if rank != config.rank:
            rank_pattern[exact] = rank
        alpha = leaf.alpha * (rank / leaf.rank) if rank != leaf.rank else leaf.alpha  # PEFT's order of operations
        if alpha != config.alpha:
            alpha_pattern[exact] = alpha
    return dataclasses.replace(
        config,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        exclude=tuple(exclude),
        layers_to_transform={**layers, **{k: v for k, v in config.layers_to_transform.items() if k not in layers}},
    )


def _adapted_layers(leaf: LeafPlan) -> tuple[int, ...]:
    return tuple(range(leaf.num_layers)) if leaf.layers is None else leaf.layers


def init_eva(
    params: PyTree,
    plan: Plan | LoraConfig,
    forward: Callable[[Mapping, Any], Any],
    batches: Iterable,
    *,
    num_batches: int | None = None,
) -> tuple[dict, Plan]:
    """EVA adapters: A from the top principal directions of each adapted layer's inputs, B = 0, ranks redistributed.

    Args:
      params: the base params the plan was built for (left unchanged: EVA changes no base weight).
      plan: a plan or config with init="eva" (its `rank`, `rank_pattern` and `eva_rho` set the budget and the cap).
      forward: `forward(adapters, batch)`, the model's forward pass with the given adapters, e.g.
        `lambda adapters, batch: jaxlora.apply(model, {"params": params}, adapters, plan, batch["x"])`, or with
        `jaxlora.apply_nnx(module, adapters, plan, x)`; it may be jitted (then once for all batches). Only the layer
        calls it makes matter, not what it returns.
      batches: an iterable of batches, each given to `forward`.
      num_batches: how many batches to use (default: all of `batches`).

    Returns:
      `(adapters, plan)`: the adapters and the plan of the redistributed config (same init, exact-path
      `rank_pattern` / `alpha_pattern` as PEFT records them, rank-0 leaves excluded, rank-0 stacked layers left out
      by `layers_to_transform`). Use this plan from now on (training, saving, PEFT export).

    Raises:
      ValueError: for a config without init="eva", DoRA, or a layer whose inputs were never seen (naming it).

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxlora
      >>> model = nn.Dense(4)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2, init="eva"))
      >>> forward = lambda adapters, x: jaxlora.apply(model, {"params": params}, adapters, plan, x)
      >>> data = [jax.random.normal(jax.random.key(i), (16, 8)) for i in range(3)]
      >>> adapters, plan = jaxlora.init_eva(params, plan, forward, data)
      >>> adapters["kernel"]["lora_a"].shape, float(abs(adapters["kernel"]["lora_b"]).max())
      ((8, 2), 0.0)
    """
    resolved = resolve(params, plan)
    config = resolved.config
    if config.init != "eva":
        raise ValueError(f"init_eva needs a config with init='eva', got init={config.init!r}")
    if config.use_dora:
        raise ValueError("init_eva: EVA with DoRA is not supported (PEFT's EVA neither); use use_dora=False")
    moments = {path: _Moments(leaf) for path, leaf in resolved.leaves.items()}
    probes = _probes(resolved)
    chosen = batches if num_batches is None else itertools.islice(batches, num_batches)
    with observing(_recorder(moments)):
        for batch in chosen:
            jax.block_until_ready(forward(probes, batch))
        jax.effects_barrier()
    ratios, directions = {}, {}
    for path, leaf in resolved.leaves.items():
        seen = moments[path].count
        missing = [layer for layer in _adapted_layers(leaf) if seen[layer] < 2]
        if missing:
            raise ValueError(
                f"init_eva: the forward pass never (or once) computed the layer of {path!r}"
                f"{f' (stacked layer {missing[0]})' if leaf.stacked_axes else ''}: is it called with adapters, i.e. "
                "through jaxlora.apply / apply_nnx with the adapters init_eva passes to forward? Leave it out of "
                "the targets otherwise"
            )
        m = moments[path]
        components, ratio = principal_directions(
            jnp.asarray(m.xtx, jnp.float32), jnp.asarray(m.sum, jnp.float32), jnp.asarray(m.count, jnp.float32)
        )
        for layer in _adapted_layers(leaf):
            ratios[(path, layer)] = np.asarray(ratio[layer])
        directions[path] = np.asarray(components)
    counts = redistribute(ratios, {unit: resolved.leaves[unit[0]].rank for unit in ratios}, config.eva_rho)
    new_plan = make_plan(params, _redistributed_config(resolved, counts))
    return _eva_adapters(new_plan, directions, counts), new_plan


def _eva_adapters(plan: Plan, directions: Mapping[str, np.ndarray], counts: Mapping[tuple[str, int], int]) -> dict:
    """A (in, r) = a layer's first new-rank principal directions (zero-padded to the stack's rank), B = 0."""
    pairs = {}
    for path, leaf in plan.leaves.items():
        dtype = jnp.promote_types(leaf.dtype, jnp.float32)
        a = np.zeros((leaf.num_layers, leaf.fan_in, leaf.rank), np.float32)
        for layer in _adapted_layers(leaf):
            rank = counts[(path, layer)]
            a[layer, :, :rank] = directions[path][layer, :rank].T
        pairs[path] = {
            "lora_a": jnp.asarray(a.reshape(leaf.a_shape), dtype),
            "lora_b": jnp.zeros(leaf.b_shape, dtype),
        }
    return unflatten_adapters(pairs)
