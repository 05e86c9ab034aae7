"""Declarative tables from our parameter paths to PyTorch module names and weight layouts (for PEFT files).

A name map is a sequence of rows ``(pattern, module, layout)``: ``pattern`` is a regex fully matched against one
of our module paths ("h_0/attn/c_attn"), ``module`` the ``re.sub`` template of the torch module name
("transformer.h.\\1.attn.c_attn"), ``layout`` how torch stores that module's weights. The first matching row
wins; a module no row matches uses the generic rule: "a/b/kernel" is torch module "a.b", an ``nn.Linear`` for a
``kernel``, an ``nn.Embedding`` for an ``embedding`` and a LayerNorm for a ``scale``.
``jaxlora.models.gpt2.PEFT_NAME_MAP`` is such a table.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

# linear: nn.Linear, weight = kernel viewed (fan_in, fan_out) and transposed to (out, in);
# conv1d: Hugging Face Conv1D (GPT-2), weight = kernel as is (in, out);
# conv: nn.Conv1d/2d/3d, weight (out, in, *window) from our (*window, in, out);
# embedding: nn.Embedding, weight = embedding (num, dim); layernorm: weight = scale;
# tied_embedding: an embedding whose table is also the output head (GPT-2's wte), stored like embedding.
LAYOUTS = ("linear", "conv1d", "conv", "embedding", "tied_embedding", "layernorm")


def _stored_as(layout: str) -> str:
    """The layout whose storage rules `layout` follows (a tied embedding is stored as an embedding)."""
    return "embedding" if layout == "tied_embedding" else layout


_GENERIC_LAYOUT = {"kernel": "linear", "embedding": "embedding", "scale": "layernorm"}
_TORCH_PARAM = {
    ("linear", "kernel"): "weight",
    ("conv1d", "kernel"): "weight",
    ("conv", "kernel"): "weight",
    ("embedding", "embedding"): "weight",
    ("layernorm", "scale"): "weight",
}


class ModuleName(NamedTuple):
    """One row of a name map: our module path regex -> torch module name (``re.sub`` template) and layout."""

    pattern: str
    module: str
    layout: str


NameMap = Sequence[tuple[str, str, str]]


def sequential(modules: Sequence[str], step: int = 2, layout: str = "linear") -> tuple[ModuleName, ...]:
    """Rows for a torch ``nn.Sequential`` whose layers sit at indices 0, step, 2·step, ... (activations between).

    E.g. flax ``Dense_0, Dense_1, Dense_2`` <-> ``nn.Sequential(Linear, ReLU, Linear, ReLU, Linear)``:
    ``sequential(["Dense_0", "Dense_1", "Dense_2"])`` maps them to torch modules "0", "2", "4".
    """
    return tuple(ModuleName(re.escape(name), str(i * step), layout) for i, name in enumerate(modules))


def torch_module(module_path: str, leaf: str, name_map: NameMap = ()) -> tuple[str, str]:
    """``(torch module name, layout)`` of our module at `module_path` holding `leaf` ("kernel", ...)."""
    for row in name_map:
        pattern, template, layout = row
        if re.fullmatch(pattern, module_path):
            if layout not in LAYOUTS:
                raise ValueError(f"name map row {tuple(row)!r}: layout {layout!r} is not one of {LAYOUTS}")
            name = re.sub(pattern, template, module_path)
            if "/" in name:
                raise ValueError(f"name map row {tuple(row)!r} turns {module_path!r} into {name!r}, which has a '/'")
            return name, layout
    if "." in module_path:
        raise ValueError(
            f"our module path {module_path!r} contains a '.', so the generic rule cannot name it in torch; "
            "add a (pattern, module, layout) row for it to the name map"
        )
    return module_path.replace("/", "."), _GENERIC_LAYOUT.get(leaf, "linear")


def torch_param(leaf: str, layout: str) -> str:
    """The torch parameter name ("weight" / "bias") that holds our `leaf` in a module of `layout`."""
    layout = _stored_as(layout)
    if leaf == "bias":
        return "bias"
    name = _TORCH_PARAM.get((layout, leaf))
    if name is None:
        raise ValueError(
            f"a torch {layout} module has no parameter for our leaf {leaf!r}; "
            "fix the layout of this module in the name map"
        )
    return name


def to_torch(value: Any, leaf: str, layout: str, fan_in_ndim: int | None = None) -> np.ndarray:
    """Our leaf value in the torch layout of `layout` (see LAYOUTS); `fan_in_ndim` only for n-D linear kernels."""
    layout = _stored_as(layout)
    value = np.asarray(value)
    if leaf == "bias":
        return value.reshape(-1)
    if layout in ("conv1d", "embedding") and value.ndim != 2:
        raise ValueError(f"a torch {layout} weight is 2-D, but our {leaf} has shape {value.shape}")
    if layout in ("conv1d", "embedding", "layernorm"):
        return value
    if layout == "conv":
        return np.transpose(value, (value.ndim - 1, value.ndim - 2, *range(value.ndim - 2)))
    k = value.ndim - 1 if fan_in_ndim is None else fan_in_ndim
    return value.reshape(math.prod(value.shape[:k]), -1).T


def from_torch(value: Any, leaf: str, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `to_torch`: the torch tensor `value` back in our layout of `shape`; ValueError if it does not fit."""
    layout = _stored_as(layout)
    value = np.asarray(value)
    want = _torch_shape(shape, leaf, layout)
    if tuple(value.shape) not in want:
        raise ValueError(f"has shape {tuple(value.shape)}, expected {want[0]} for our {leaf} of shape {shape}")
    if leaf == "bias" or layout in ("conv1d", "embedding", "layernorm"):
        return value.reshape(shape)
    if layout == "conv":
        n = len(shape)
        return np.transpose(value, (*range(2, n), 1, 0))
    return value.T.reshape(shape)


def _torch_shape(shape: tuple[int, ...], leaf: str, layout: str) -> list[tuple[int, ...]]:
    """The torch shapes our `shape` may have in `layout` (an n-D linear kernel may split fan-in / fan-out anywhere)."""
    layout = _stored_as(layout)
    if leaf == "bias":
        return [(math.prod(shape),)]
    if layout in ("conv1d", "embedding", "layernorm"):
        return [shape]
    if layout == "conv":
        return [(shape[-1], shape[-2], *shape[:-2])]
    return [(math.prod(shape[k:]), math.prod(shape[:k])) for k in range(len(shape) - 1, 0, -1)]


class TorchModule(NamedTuple):
    """One torch module of a model: our module path, its torch layout, our leaf names, and, for a module whose
    layers are stacked (a name map template with ``{layer}``), which layer of the stack it is."""

    path: str
    layout: str
    leaves: tuple[str, ...]
    layer: int | None = None


def module_table(
    paths: Iterable[str] | Mapping[str, tuple[int, ...]], name_map: NameMap = ()
) -> dict[str, TorchModule]:
    """``{torch module name: TorchModule}`` for every module in `paths` with a name.

    A name map template containing ``{layer}`` names a stacked module (leaves of shape (L, ...)): it is expanded
    into one torch module per layer, which needs `paths` to be a mapping from path to shape. Modules the generic
    rule cannot name (a '.' in the path) are left out. Raises ValueError when two of our modules get the same
    torch name (a name map that is not one-to-one).
    """
    leaves_of: dict[str, list[str]] = {}
    for path in paths:
        module_path, _, leaf = path.rpartition("/")
        leaves_of.setdefault(module_path, []).append(leaf)
    table: dict[str, TorchModule] = {}
    for module_path, leaves in leaves_of.items():
        main = next((leaf for leaf in leaves if leaf in _GENERIC_LAYOUT), leaves[0])
        try:
            name, layout = torch_module(module_path, main, name_map)
        except ValueError:
            if any(re.fullmatch(row[0], module_path) for row in name_map):
                raise  # a bad row, not a module outside the map
            continue
        entries = {name: TorchModule(module_path, layout, tuple(leaves))}
        if "{layer}" in name:
            if not isinstance(paths, Mapping):
                raise ValueError(f"module_table needs the leaf shapes to expand the stacked module {module_path!r}")
            num_layers = paths[f"{module_path}/{main}"][0]
            entries = {
                name.replace("{layer}", str(i)): TorchModule(module_path, layout, tuple(leaves), i)
                for i in range(num_layers)
            }
        for torch_name, entry in entries.items():
            if torch_name in table:
                raise ValueError(
                    f"the name map gives torch module {torch_name!r} to both {table[torch_name].path!r} and "
                    f"{module_path!r}; make its rows one-to-one"
                )
            table[torch_name] = entry
    return table
