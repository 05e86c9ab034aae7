"""Shardings for adapters derived from their base weight's: A follows W's input axes, B its output axes."""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jaxlora._src.paths import PyTree, leaves_with_paths, unflatten_adapters
from jaxlora._src.planning import Plan, resolve


def _plan_and_specs(args: tuple) -> tuple[Plan, PyTree]:
    """`(plan, param_specs)` from the new call `(plan, param_specs)` or the 0.1 call `(params, param_specs, config)`."""
    if len(args) == 2 and isinstance(args[0], Plan):
        return args
    if len(args) == 3:
        params, param_specs, config = args
        return resolve(params, config), param_specs
    raise TypeError("call it as (plan, param_specs), with plan = jaxlora.plan(params, config)")


def adapter_specs(*args: Any) -> dict:
    """PartitionSpecs for the adapters, given the params' PartitionSpecs (same tree structure).

    For W sharded as P(*in_axes, *out_axes): A gets P(*in_axes, None) and B gets P(None, *out_axes);
    the rank axis is never sharded (it is small). Stack axes (`stacked_axes`) keep W's sharding in both.

    Args:
      plan: from `jaxlora.plan(params, config)` (0.1's `(params, param_specs, config)` still works).
      param_specs: the params' PartitionSpecs, one per leaf (None for replicated).

    Returns:
      Nested dicts of PartitionSpecs with the adapters' structure.

    Example:
      >>> import jax.numpy as jnp, jaxlora
      >>> from jax.sharding import PartitionSpec as P
      >>> params = {"dense": {"kernel": jnp.ones((4, 6))}}
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
      >>> specs = jaxlora.adapter_specs(plan, {"dense": {"kernel": P("data", "model")}})
      >>> specs["dense"]["kernel"]["lora_a"] == P("data", None), specs["dense"]["kernel"]["lora_b"] == P(None, "model")
      (True, True)
    """
    resolved, param_specs = _plan_and_specs(args)
    specs = dict(leaves_with_paths(param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None))
    out = {}
    for path, leaf in resolved.leaves.items():
        spec = specs.get(path)
        spec = tuple(spec) if spec is not None else ()
        spec = spec + (None,) * (len(leaf.shape) - len(spec))
        stack = leaf.stacked_axes
        ins = [spec[stack + d] for d in leaf.layer_in_axes]
        outs = [spec[stack + d] for d in leaf.layer_out_axes]
        out[path] = {
            "lora_a": PartitionSpec(*spec[:stack], *ins, None),
            "lora_b": PartitionSpec(*spec[:stack], None, *outs),
        }
    return unflatten_adapters(out)


def adapter_shardings(*args: Any) -> dict:
    """NamedShardings for the adapters from the params' NamedShardings (all on one mesh).

    Args:
      plan: from `jaxlora.plan(params, config)` (0.1's `(params, param_shardings, config)` still works).
      param_shardings: a NamedSharding per param leaf.

    Returns:
      Nested dicts of NamedShardings with the adapters' structure (see `adapter_specs`).

    Raises:
      ValueError: if `param_shardings` is not a tree of NamedShardings.

    Example:
      >>> import jax, jax.numpy as jnp, jaxlora
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> mesh = jax.make_mesh((1,), ("model",))
      >>> params = {"dense": {"kernel": jnp.ones((4, 6))}}
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
      >>> shardings = {"dense": {"kernel": NamedSharding(mesh, P(None, "model"))}}
      >>> jaxlora.adapter_shardings(plan, shardings)["dense"]["kernel"]["lora_b"].spec == P(None, "model")
      True
    """
    resolved, param_shardings = _plan_and_specs(args)
    leaves = [s for _, s in leaves_with_paths(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))]
    if not leaves or not all(isinstance(s, NamedSharding) for s in leaves):
        raise ValueError("param_shardings must be a tree of jax.sharding.NamedSharding, one per param leaf")
    mesh = leaves[0].mesh
    specs = jax.tree.map(lambda s: s.spec, param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        adapter_specs(resolved, specs),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
