"""Whether adapters are still finite, as a value a jitted training step can return."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlora._src.paths import PyTree, leaves_with_paths


def all_finite(tree: PyTree) -> jax.Array:
    """A scalar bool array: True if every floating-point leaf of `tree` is free of NaN and Inf.

    Works inside `jit` (where `merge`'s own finite check cannot raise): return the flag from the step and
    look at it outside, e.g. every few steps, to learn that training diverged while the last good
    checkpoint is still at hand. Non-float leaves and None placeholders are ignored.

    Args:
      tree: adapters, the trainable half from `partition`, gradients, ...

    Returns:
      A scalar `bool` array (a tracer inside jit).

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> adapters = {"dense": {"kernel": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 3))}}}
      >>> bool(jax.jit(jaxlora.all_finite)(adapters))
      True
      >>> bool(jax.jit(jaxlora.all_finite)({"x": jnp.array([1.0, jnp.nan])}))
      False
    """
    flags = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.stack(flags).all() if flags else jnp.array(True)


def nonfinite_paths(tree: PyTree) -> list[str]:
    """The "/"-joined paths of the leaves of `tree` holding NaN or Inf (outside jit: it reads the values).

    Args:
      tree: adapters, params or any pytree of arrays.

    Returns:
      The paths, in tree order (empty when every value is finite).

    Example:
      >>> import jax.numpy as jnp, jaxlora
      >>> jaxlora.nonfinite_paths({"a": jnp.ones(2), "b": {"c": jnp.array([jnp.inf])}})
      ['b/c']
    """
    return [
        path
        for path, x in leaves_with_paths(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact) and not bool(jnp.isfinite(x).all())
    ]
