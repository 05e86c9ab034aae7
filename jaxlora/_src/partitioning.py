"""Splitting the model into what trains and what stays frozen, and the optimizer built from that split.

The trainable tree is `{"params": <modules_to_save leaves>, "lora": adapters}` and the frozen tree
`{"params": <every other leaf>}`, each with None where the other holds the leaf (as in equinox). Take
gradients with respect to the trainable tree only: no base-sized gradient or optimizer state exists.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxlora._src.config import LoraConfig
from jaxlora._src.paths import PyTree, map_with_paths
from jaxlora._src.planning import Plan, resolve

TRAINABLE = "trainable"
FROZEN = "frozen"


def _is_none(x: Any) -> bool:
    return x is None


def partition(params: PyTree, adapters: dict, plan: Plan | LoraConfig) -> tuple[dict, dict]:
    """`(trainable, frozen)`: adapters and modules_to_save leaves on one side, the base on the other.

    Args:
      params: the base params.
      adapters: their adapters.
      plan: from `jaxlora.plan(params, config)` (a `LoraConfig` is resolved here).

    Returns:
      `({"params": saved leaves, "lora": adapters}, {"params": every other leaf})`, None in place of the leaves
      the other half holds. Differentiate with respect to the first only; `combine` puts them back together.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"body": {"kernel": jnp.ones((4, 3))}, "head": {"kernel": jnp.ones((3, 2))}}
      >>> config = jaxlora.LoraConfig(rank=1, targets=("body/kernel",), modules_to_save=("head/.*",))
      >>> plan = jaxlora.plan(params, config)
      >>> params, adapters = jaxlora.init(jax.random.key(0), params, plan)
      >>> trainable, frozen = jaxlora.partition(params, adapters, plan)
      >>> trainable["params"]["body"]["kernel"] is None, frozen["params"]["head"]["kernel"] is None
      (True, True)
    """
    resolved = resolve(params, plan)
    resolved.check_adapters(adapters)
    saved = set(resolved.saved)
    trainable_params = map_with_paths(lambda p, x: x if p in saved else None, params)
    frozen_params = map_with_paths(lambda p, x: None if p in saved else x, params)
    return {"params": trainable_params, "lora": adapters}, {"params": frozen_params}


def combine(trainable: dict, frozen: dict) -> tuple[PyTree, dict]:
    """`(params, adapters)` again from the two halves made by `partition` (the inverse of `partition`).

    Args:
      trainable: the first half from `partition` (or its updated version).
      frozen: the second half.

    Returns:
      `(params, adapters)`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
      >>> params, adapters = jaxlora.init(jax.random.key(0), params, plan)
      >>> again, _ = jaxlora.combine(*jaxlora.partition(params, adapters, plan))
      >>> again["dense"]["kernel"] is params["dense"]["kernel"]
      True
    """
    params = jax.tree.map(lambda t, f: f if t is None else t, trainable["params"], frozen["params"], is_leaf=_is_none)
    return params, trainable["lora"]


def _trains(plan: Plan | LoraConfig):
    """Whether a param path trains in full: membership in the plan's saved leaves (or the config's regexes)."""
    if isinstance(plan, Plan):
        saved = frozenset(plan.saved)
        return saved.__contains__
    if isinstance(plan, LoraConfig):
        return lambda path: any(re.fullmatch(m, path) for m in plan.modules_to_save)
    raise TypeError(f"expected a jaxlora.Plan or a jaxlora.LoraConfig, got {type(plan).__name__}")


def labels(tree: dict, plan: Plan | LoraConfig) -> dict:
    """A label, "trainable" or "frozen", for every leaf of a `{"params": ..., "lora": ...}` tree.

    Adapters train; a param trains only if it is one of the plan's `saved` (modules_to_save) leaves. The
    same rule as `partition`, so the optimizer and the gradient always agree on what is frozen.

    Args:
      tree: the trainable half from `partition`, or a whole `{"params", "lora"}` tree.
      plan: the plan (a `LoraConfig` matches `modules_to_save` by regex instead).

    Returns:
      A tree of the same structure holding "trainable" or "frozen".

    Example:
      >>> import jax.numpy as jnp, jaxlora
      >>> params = {"body": {"kernel": jnp.ones((4, 3))}, "head": {"kernel": jnp.ones((3, 2))}}
      >>> config = jaxlora.LoraConfig(rank=1, targets=("body/kernel",), modules_to_save=("head/.*",))
      >>> plan = jaxlora.plan(params, config)
      >>> jaxlora.labels({"params": params}, plan)["params"]
      {'body': {'kernel': 'frozen'}, 'head': {'kernel': 'trainable'}}
    """
    unknown = set(tree) - {"params", "lora"}
    if unknown:
        raise ValueError(
            f"expected a tree with keys 'params' and/or 'lora' (as made by jaxlora.partition); got {sorted(unknown)}"
        )

    trains = _trains(plan)

    def label(path: str, _) -> str:
        group, _, rest = path.partition("/")
        return TRAINABLE if group == "lora" or trains(rest) else FROZEN

    return map_with_paths(label, tree)


def _keep_frozen() -> optax.GradientTransformation:
    """Updates of -0.0 for frozen leaves: `w + (-0.0)` is `w` bit for bit (also -0.0, which `+ 0.0` turns into +0.0)."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: jnp.full_like(u, -0.0), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def optimizer(tx: optax.GradientTransformation, plan: Plan | LoraConfig) -> optax.GradientTransformation:
    """`optax.multi_transform`: `tx` for trainable leaves, a zero update (-0.0) for frozen ones.

    Works on the trainable half from `partition` (frozen leaves absent) and on a full
    `{"params", "lora"}` tree alike; frozen leaves keep no optimizer state either way, and on a full tree
    their updates are -0.0, so `optax.apply_updates` leaves them bit-identical (negative zeros included).

    Args:
      tx: the optimizer for the adapters and modules_to_save leaves.
      plan: the plan (or config) that says which params train.

    Returns:
      An optax `GradientTransformation`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxlora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
      >>> params, adapters = jaxlora.init(jax.random.key(0), params, plan)
      >>> trainable, frozen = jaxlora.partition(params, adapters, plan)
      >>> opt_state = jaxlora.optimizer(optax.adam(1e-3), plan).init(trainable)
    """
    return optax.multi_transform({TRAINABLE: tx, FROZEN: _keep_frozen()}, lambda tree: labels(tree, plan))


def count_params(tree: PyTree) -> int:
    """The number of scalars in the array leaves of `tree` (None placeholders count zero).

    Args:
      tree: any pytree of arrays.

    Returns:
      The total size.

    Example:
      >>> import jax.numpy as jnp, jaxlora
      >>> jaxlora.count_params({"a": jnp.ones((4, 3)), "b": None})
      12
    """
    return sum(int(x.size) for x in jax.tree.leaves(tree))
