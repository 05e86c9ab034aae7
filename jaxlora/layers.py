"""Layer kinds: how each module type computes its LoRA term factored, and how to register a type of your own.

`register_layer(MyModule)` makes `jaxlora.apply` serve adapters of `MyModule`'s kernel as `base + s·(x A) B`
instead of merging them for the call; pass `serve=` for a layer whose LoRA term is computed differently. The
built-in flax.linen kinds (Dense, DenseGeneral, Einsum, Conv, Embed) are registered the same way."""

from jaxlora._src.layer_kinds import (
    Adapter,
    LayerCall,
    LayerKind,
    additive,
    kind_of,
    linear_term,
    register_layer,
    registered_layers,
    unregister_layer,
)

__all__ = [
    "Adapter",
    "LayerCall",
    "LayerKind",
    "additive",
    "kind_of",
    "linear_term",
    "register_layer",
    "registered_layers",
    "unregister_layer",
]
