"""The flax layer types jaxlora knows by name: linen Dense, DenseGeneral, Einsum, Conv, Embed and their nnx twins.

`jaxlora.apply` / `apply_nnx` serve these by the operations they compute with (see `serving`), like any other
module; their registry entries say which param holds W, which methods compute with it and how many input axes
they contract, which `registered_layers()` reports. A user's own registration of a type (`register_layer`) is what
routes a module through a layer kind's `serve` instead.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from flax import nnx

from jaxlora._src.layer_kinds import LayerCall, mark_builtin, register_layer


def _served_by_operation(call: LayerCall) -> Any:
    raise RuntimeError(  # never reached: apply serves built-in types by their operations (user_kind_of skips them)
        f"{type(call.module).__qualname__} is served by its operations, not through a registered layer kind"
    )


def _axes(axis: Any) -> int:
    return len(axis) if isinstance(axis, tuple | list) else 1


def register_builtin_layers() -> None:
    """Registers the ten built-in types (once; called when jaxlora is imported)."""
    kinds = {
        nn.Dense: {"contraction": lambda m: 1},
        nn.DenseGeneral: {"contraction": lambda m: None if m.batch_dims else _axes(m.axis)},
        nn.Einsum: {},
        nn.Conv: {},
        nn.Embed: {"param": "embedding", "methods": ("__call__", "attend"), "contraction": lambda m: 1},
        nnx.Linear: {"contraction": lambda m: 1},
        nnx.LinearGeneral: {"contraction": lambda m: None if m.batch_axis else _axes(m.axis)},
        nnx.Einsum: {},
        nnx.Conv: {},
        nnx.Embed: {"param": "embedding", "methods": ("__call__", "attend"), "contraction": lambda m: 1},
    }
    for module_type, options in kinds.items():
        register_layer(module_type, _served_by_operation, **options)
    mark_builtin(*kinds)
