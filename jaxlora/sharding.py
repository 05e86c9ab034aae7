"""Shardings for adapters derived from their base weight's: A follows W's input axes, B its output axes."""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jaxlora._paths import PyTree, leaves_with_paths, unflatten_adapters
from jaxlora.config import LoraConfig
from jaxlora.plan import plan


def adapter_specs(params: PyTree, param_specs: PyTree, config: LoraConfig) -> dict:
    """PartitionSpecs for the adapters, given the params' PartitionSpecs (same tree structure).

    For W sharded as P(*in_axes, *out_axes): A gets P(*in_axes, None) and B gets P(None, *out_axes);
    the rank axis is never sharded (it is small).
    """
    resolved = plan(params, config)
    specs = dict(leaves_with_paths(param_specs, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None))
    out = {}
    for path, leaf in resolved.leaves.items():
        spec = specs.get(path)
        spec = tuple(spec) if spec is not None else ()
        spec = spec + (None,) * (len(leaf.shape) - len(spec))
        k = leaf.fan_in_ndim
        out[path] = {"lora_a": PartitionSpec(*spec[:k], None), "lora_b": PartitionSpec(None, *spec[k:])}
    return unflatten_adapters(out)


def adapter_shardings(params: PyTree, param_shardings: PyTree, config: LoraConfig) -> dict:
    """NamedShardings for the adapters from the params' NamedShardings (all on one mesh)."""
    leaves = [s for _, s in leaves_with_paths(param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))]
    if not leaves or not all(isinstance(s, NamedSharding) for s in leaves):
        raise ValueError("param_shardings must be a tree of jax.sharding.NamedSharding, one per param leaf")
    mesh = leaves[0].mesh
    specs = jax.tree.map(lambda s: s.spec, param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        adapter_specs(params, specs, config),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
