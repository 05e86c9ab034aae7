"""LoRA+: the B factors (and DoRA magnitudes) learn `ratio` times faster than the A factors.

Hayou, Ghosh and Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models" (2024), show that one learning rate
for A and B is inefficient at width and set η_B = λ·η_A; their recommended λ is 2^4 = 16. Built on the same
trainable/frozen labels as `jaxlora.optimizer`, refined by adapter entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

from jaxlora._src.config import LoraConfig
from jaxlora._src.partitioning import FROZEN, TRAINABLE, labels
from jaxlora._src.paths import map_with_paths
from jaxlora._src.planning import Plan

# The ratio η_B / η_A the LoRA+ paper recommends (λ = 2^4).
DEFAULT_RATIO = 16.0
# The label of the leaves that train at the raised rate.
FAST = "trainable_fast"
# Adapter entries on the fast side: B, and DoRA's magnitude (a 1-D vector, which PEFT's LoRA+ also puts there).
_FAST_ENTRIES = ("lora_b", "magnitude")

Schedule = float | Callable[[Any], Any]


def loraplus_labels(tree: dict, plan: Plan | LoraConfig) -> dict:
    """`labels(tree, plan)` with the adapters' B factors and DoRA magnitudes relabelled "trainable_fast"."""
    base = labels(tree, plan)

    def refine(path: str, label: str) -> str:
        group, _, rest = path.partition("/")
        if group == "lora" and label == TRAINABLE and rest.rpartition("/")[2] in _FAST_ENTRIES:
            return FAST
        return label

    return map_with_paths(refine, base)


def _scaled(learning_rate: Schedule, ratio: float) -> Schedule:
    if callable(learning_rate):
        return lambda step: ratio * learning_rate(step)
    return ratio * learning_rate


def loraplus_optimizer(
    make_tx: Callable[[Schedule], optax.GradientTransformation],
    learning_rate: Schedule,
    plan: Plan | LoraConfig,
    *,
    ratio: float = DEFAULT_RATIO,
) -> optax.GradientTransformation:
    """The LoRA+ optimizer: `make_tx(learning_rate)` for A (and modules_to_save), `make_tx(ratio·lr)` for B.

    DoRA magnitudes train with B's rate, as in PEFT's `create_loraplus_optimizer`. Frozen leaves get
    `optax.set_to_zero()` and keep no optimizer state, exactly as with `jaxlora.optimizer`.

    Args:
      make_tx: builds the optimizer from a learning rate (or schedule), e.g. `optax.adamw` or
        `lambda lr: optax.adamw(lr, weight_decay=0.01)`.
      learning_rate: A's learning rate, a float or an optax schedule.
      plan: from `jaxlora.plan(params, config)` (or a `LoraConfig`).
      ratio: η_B / η_A (the LoRA+ paper's λ, default 16).

    Returns:
      An optax `GradientTransformation` over the `{"params", "lora"}` tree from `jaxlora.partition`.

    Raises:
      ValueError: if `ratio` is not a positive number.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxlora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
      >>> params, adapters = jaxlora.init(jax.random.key(0), params, plan)
      >>> trainable, frozen = jaxlora.partition(params, adapters, plan)
      >>> tx = jaxlora.loraplus_optimizer(optax.adam, 1e-4, plan)  # B learns at 16 x 1e-4
      >>> opt_state = tx.init(trainable)
    """
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not ratio > 0:
        raise ValueError(f"loraplus_optimizer: ratio must be a number > 0 (the paper's default is 16), got {ratio!r}")
    transforms = {
        TRAINABLE: make_tx(learning_rate),
        FAST: make_tx(_scaled(learning_rate, float(ratio))),
        FROZEN: optax.set_to_zero(),
    }
    return optax.multi_transform(transforms, lambda tree: loraplus_labels(tree, plan))
