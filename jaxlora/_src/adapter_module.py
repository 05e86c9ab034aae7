"""Adapters held in an NNX module, for users who train with `nnx.Optimizer` and `nnx.grad` instead of optax on a
pytree. It holds the same nested dicts, each array an `nnx.Param`; `apply_nnx` accepts it in place of the dicts."""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import nnx


class AdapterModule(nnx.Module):
    """The adapters of one plan as `nnx.Param` leaves (`nnx.Optimizer(module, tx, wrt=nnx.Param)` trains them).

    Args:
      adapters: the nested adapter dicts from `jaxlora.init` (or trained).

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxlora
      >>> from flax import nnx
      >>> layer = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> plan = jaxlora.plan(nnx.state(layer, nnx.Param), jaxlora.LoraConfig(rank=2))
      >>> _, adapters = jaxlora.init(jax.random.key(1), nnx.state(layer, nnx.Param), plan)
      >>> module = jaxlora.AdapterModule(adapters)
      >>> optimizer = nnx.Optimizer(module, optax.adam(1e-2), wrt=nnx.Param)
      >>> loss = lambda m: jnp.sum(jaxlora.apply_nnx(layer, m, plan, jnp.ones((2, 4))) ** 2)
      >>> _ = optimizer.update(module, nnx.grad(loss)(module))
      >>> bool((module.tree()["kernel"]["lora_b"] != 0).any())
      True
    """

    def __init__(self, adapters: Mapping):
        self.adapters = nnx.data(jax.tree.map(nnx.Param, dict(adapters)))

    def tree(self) -> dict:
        """The adapters as plain nested dicts of arrays (what `merge`, the checkpoints and PEFT export take)."""
        return jax.tree.map(lambda v: v[...], self.adapters, is_leaf=lambda x: isinstance(x, nnx.Variable))
