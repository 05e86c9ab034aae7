"""Scanned <-> unrolled parameter layouts: ``layers/<leaf>`` of shape (L, ...) <-> ``layers/{i}/<leaf>``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.models.llama.model import Llama


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """The unrolled pure-dict params of scanned ones: ``params["layers"]`` becomes ``{0: {...}, 1: {...}, ...}``.

    Args:
        params: nested dicts as ``nnx.to_pure_dict(nnx.state(model))`` gives for a scanned :class:`Llama`.

    Returns:
        A new nested dict; the leaves outside ``layers`` are shared, not copied.

    Raises:
        ValueError: `params` has no ``layers`` node or its leaves disagree on the number of layers.

    Example:
        >>> stacked = {"layers": {"mlp": {"kernel": jnp.zeros((2, 3, 4))}}, "norm": {"scale": jnp.ones(3)}}
        >>> jax.tree.map(jnp.shape, unstack_layers(stacked)["layers"][1])
        {'mlp': {'kernel': (3, 4)}}
    """
    layers = _layers_node(params)
    depths = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree.leaves(layers)}
    if len(depths) != 1 or None in depths:
        raise ValueError(
            f"the leaves under 'layers' have leading axes {sorted(map(str, depths))}; a scanned layout has one "
            "shared leading layer axis on every leaf. Are these params unrolled already?"
        )
    depth = depths.pop()
    return {**params, "layers": {i: jax.tree.map(lambda leaf, i=i: leaf[i], layers) for i in range(depth)}}


def stack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
    """The scanned pure-dict params of unrolled ones (inverse of :func:`unstack_layers`).

    Raises:
        ValueError: the layer keys are not 0..L-1, or the layers differ in structure or shapes.

    Example:
        >>> unrolled = {"layers": {0: {"kernel": jnp.zeros((3, 4))}, 1: {"kernel": jnp.ones((3, 4))}}}
        >>> stack_layers(unrolled)["layers"]["kernel"].shape
        (2, 3, 4)
    """
    layers = _layers_node(params)
    keys = sorted(layers, key=lambda k: int(k) if str(k).isdigit() else -1)
    if [str(k) for k in keys] != [str(i) for i in range(len(keys))]:
        raise ValueError(f"unrolled 'layers' must have keys 0..L-1, got {list(layers)[:8]}; are these params scanned?")
    per_layer = [layers[k] for k in keys]
    structures = {str(jax.tree.structure(layer)) for layer in per_layer}
    if len(structures) != 1:
        raise ValueError("the unrolled layers differ in their parameters; all must have the same leaves.")
    try:
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_layer)
    except ValueError as err:
        raise ValueError(f"cannot stack the unrolled layers: {err}") from None
    return {**params, "layers": stacked}


def convert_layout(model: Llama, scan_layers: bool) -> Llama:
    """The same model (same weights) in the scanned (`scan_layers=True`) or unrolled layout.

    Example:
        >>> from jaxlora.models.llama import LlamaConfig
        >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        ...                   num_attention_heads=2)
        >>> unrolled = convert_layout(Llama(cfg, rngs=nnx.Rngs(0)), scan_layers=False)
        >>> unrolled.layers[1].mlp.up_proj.kernel.shape
        (16, 32)
    """
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if model.scan_layers != scan_layers:
        params = stack_layers(params) if scan_layers else unstack_layers(params)
    target = nnx.eval_shape(
        lambda: Llama(model.config, scan_layers=scan_layers, dtype=model.dtype, remat=model.remat, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(target)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _layers_node(params: Mapping[str, Any]) -> Mapping[Any, Any]:
    if not isinstance(params, Mapping) or "layers" not in params:
        raise ValueError(
            "expected the nested-dict params of a Llama model with a 'layers' node "
            "(nnx.to_pure_dict(nnx.state(model))), got "
            f"{type(params).__name__} with keys {list(params)[:8] if isinstance(params, Mapping) else '-'}."
        )
    return params["layers"]
