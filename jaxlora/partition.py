"""Splitting the model into what trains and what stays frozen, and the optimizer built from that split.

The trainable tree is `{"params": <modules_to_save leaves>, "lora": adapters}` and the frozen tree
`{"params": <every other leaf>}`, each with None where the other holds the leaf (as in equinox). Take
gradients with respect to the trainable tree only: no base-sized gradient or optimizer state exists.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from jaxlora._paths import PyTree, map_with_paths
from jaxlora.config import LoraConfig
from jaxlora.plan import plan

TRAINABLE = "trainable"
FROZEN = "frozen"


def _is_none(x: Any) -> bool:
    return x is None


def partition(params: PyTree, adapters: dict, config: LoraConfig) -> tuple[dict, dict]:
    """`(trainable, frozen)`: adapters and modules_to_save leaves on one side, the base on the other."""
    resolved = plan(params, config)
    resolved.check_adapters(adapters)
    saved = set(resolved.saved)
    trainable_params = map_with_paths(lambda p, x: x if p in saved else None, params)
    frozen_params = map_with_paths(lambda p, x: None if p in saved else x, params)
    return {"params": trainable_params, "lora": adapters}, {"params": frozen_params}


def combine(trainable: dict, frozen: dict) -> tuple[PyTree, dict]:
    """`(params, adapters)` again from the two halves made by `partition`."""
    params = jax.tree.map(lambda t, f: f if t is None else t, trainable["params"], frozen["params"], is_leaf=_is_none)
    return params, trainable["lora"]


def labels(tree: dict, config: LoraConfig) -> dict:
    """A label, "trainable" or "frozen", for every leaf of a `{"params": ..., "lora": ...}` tree.

    Adapters train; a param trains only if `config.modules_to_save` names it. The same rule as
    `partition`, so the optimizer and the gradient always agree on what is frozen.
    """
    unknown = set(tree) - {"params", "lora"}
    if unknown:
        raise ValueError(
            f"expected a tree with keys 'params' and/or 'lora' (as made by jaxlora.partition); got {sorted(unknown)}"
        )

    def label(path: str, _) -> str:
        group, _, rest = path.partition("/")
        if group == "lora" or any(re.fullmatch(m, rest) for m in config.modules_to_save):
            return TRAINABLE
        return FROZEN

    return map_with_paths(label, tree)


def optimizer(tx: optax.GradientTransformation, config: LoraConfig) -> optax.GradientTransformation:
    """`optax.multi_transform`: `tx` for trainable leaves, `optax.set_to_zero()` for frozen ones.

    Works on the trainable half from `partition` (frozen leaves absent) and on a full
    `{"params", "lora"}` tree alike; frozen leaves keep no optimizer state either way.
    """
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, lambda tree: labels(tree, config))


def count_params(tree: PyTree) -> int:
    """The number of scalars in the array leaves of `tree` (None placeholders count zero)."""
    return sum(int(x.size) for x in jax.tree.leaves(tree))
