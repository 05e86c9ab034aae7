"""Declarative tables from our parameter paths to PyTorch module names and weight layouts (for PEFT files).

A name map is a sequence of rows ``(pattern, module, layout)``: ``pattern`` is a regex fully matched against one
of our module paths ("h_0/attn/c_attn"), ``module`` the ``re.sub`` template of the torch module name
("transformer.h.\\1.attn.c_attn"), ``layout`` how torch stores that module's weights. The first matching row
wins; a module no row matches uses the generic rule: "a/b/kernel" is torch module "a.b", an ``nn.Linear`` for a
``kernel``, an ``nn.Embedding`` for an ``embedding`` and a LayerNorm for a ``scale``.
``jaxlora.models.gpt2.PEFT_NAME_MAP`` is such a table.

Two extensions serve kernels that are not one torch module each:
- a pattern that fully matches a parameter's whole path ("layer_0/mlp/gating_einsum") rather than its module path
  names that leaf alone, for kernels sharing one scope (gemma's MLP keeps two in "layer_0/mlp");
- a template with one group of alternatives, "model.layers.\\1.self_attn.{k,v}_proj", names a kernel whose first
  axis (of one layer) stacks several torch modules: entry i of the group is the torch module of slice i along that
  axis (gemma's (2, kv_heads, features, head_dim) key-value kernel is torch's k_proj and v_proj).
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


def _matching_row(module_path: str, leaf: str, name_map: NameMap) -> tuple[Sequence[str], str] | None:
    """The first row matching our module at `module_path` (or, tried second per row, its leaf's whole path), and
    the string it matched; None if no row does."""
    for row in name_map:
        for subject in (module_path, leaf_path(module_path, leaf)):
            if re.fullmatch(row[0], subject):
                return row, subject
    return None


def leaf_path(module_path: str, leaf: str) -> str:
    """The path of the leaf `leaf` of our module at `module_path` ("" for the root)."""
    return f"{module_path}/{leaf}" if module_path else leaf


def owns_leaf(module_path: str, leaf: str, name_map: NameMap = ()) -> bool:
    """Whether a row of `name_map` names the leaf `leaf` of `module_path` alone (its pattern matched the leaf's
    whole path), so that it is a torch module of its own rather than a parameter of the module's."""
    match = _matching_row(module_path, leaf, name_map)
    return match is not None and match[1] != module_path


def torch_module(module_path: str, leaf: str, name_map: NameMap = ()) -> tuple[str, str]:
    """``(torch module name, layout)`` of our module at `module_path` holding `leaf` ("kernel", ...).

    The name may hold a ``{layer}`` placeholder (stacked layers) or a ``{a,b}`` group (see `split_names`)."""
    match = _matching_row(module_path, leaf, name_map)
    if match is not None:
        row, subject = match
        pattern, template, layout = row
        if layout not in LAYOUTS:
            raise ValueError(f"name map row {tuple(row)!r}: layout {layout!r} is not one of {LAYOUTS}")
        name = re.sub(pattern, template, subject)
        if "/" in name:
            raise ValueError(f"name map row {tuple(row)!r} turns {subject!r} into {name!r}, which has a '/'")
        split_names(name)  # a malformed group raises here, naming the row's result
        return name, layout
    if "." in module_path:
        raise ValueError(
            f"our module path {module_path!r} contains a '.', so the generic rule cannot name it in torch; "
            "add a (pattern, module, layout) row for it to the name map"
        )
    return module_path.replace("/", "."), _GENERIC_LAYOUT.get(leaf, "linear")


_GROUP = re.compile(r"\{([^{}]*)\}")


def split_names(name: str) -> tuple[str, ...] | None:
    """The torch modules a name with one group of alternatives stands for, in order, or None for a plain name.

    Example:
        >>> split_names("model.layers.0.self_attn.{k,v}_proj")
        ('model.layers.0.self_attn.k_proj', 'model.layers.0.self_attn.v_proj')
    """
    groups = [m for m in _GROUP.finditer(name) if m[1] != "layer"]
    if not groups:
        return None
    entries = groups[0][1].split(",")
    if len(groups) > 1 or len(entries) < 2 or not all(entries):
        raise ValueError(
            f"torch module name {name!r}: a name map template may hold one group of two or more alternatives, "
            "e.g. 'model.layers.\\1.self_attn.{k,v}_proj' (besides a {layer} placeholder)"
        )
    start, end = groups[0].span()
    return tuple(name[:start] + entry + name[end:] for entry in entries)


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
    """One torch module of a model: our module path, its torch layout, our leaf names, for a module whose layers
    are stacked (a name map template with ``{layer}``) which layer of the stack it is, and for a kernel whose first
    axis stacks several torch modules (a template with a ``{a,b}`` group) which slice along that axis it is."""

    path: str
    layout: str
    leaves: tuple[str, ...]
    layer: int | None = None
    part: int | None = None


def module_table(
    paths: Iterable[str] | Mapping[str, tuple[int, ...]], name_map: NameMap = ()
) -> dict[str, TorchModule]:
    """``{torch module name: TorchModule}`` for every module in `paths` with a name.

    A name map template containing ``{layer}`` names a stacked module (leaves of shape (L, ...)): it is expanded
    into one torch module per layer, which needs `paths` to be a mapping from path to shape. A template with a
    ``{a,b}`` group is expanded into one torch module per entry (`split_names`). A leaf a row names alone
    (`owns_leaf`) is a module of its own. Modules the generic rule cannot name (a '.' in the path) are left out.
    Raises ValueError when two of our modules get the same torch name (a name map that is not one-to-one).
    """
    leaves_of: dict[tuple[str, str | None], list[str]] = {}  # (module path, the leaf if it is a module alone)
    for path in paths:
        module_path, _, leaf = path.rpartition("/")
        own = leaf if owns_leaf(module_path, leaf, name_map) else None
        leaves_of.setdefault((module_path, own), []).append(leaf)
    table: dict[str, TorchModule] = {}
    for (module_path, _), leaves in leaves_of.items():
        main = next((leaf for leaf in leaves if leaf in _GENERIC_LAYOUT), leaves[0])
        try:
            name, layout = torch_module(module_path, main, name_map)
        except ValueError:
            if _matching_row(module_path, main, name_map) is not None:
                raise  # a bad row, not a module outside the map
            continue
        entries = {name: TorchModule(module_path, layout, tuple(leaves))}
        if "{layer}" in name:
            if not isinstance(paths, Mapping):
                raise ValueError(f"module_table needs the leaf shapes to expand the stacked module {module_path!r}")
            num_layers = paths[leaf_path(module_path, main)][0]
            entries = {
                name.replace("{layer}", str(i)): TorchModule(module_path, layout, tuple(leaves), i)
                for i in range(num_layers)
            }
        if split_names(name):  # one torch module per slice of the kernel's first axis
            entries = {
                part_name: module._replace(part=i)
                for entry_name, module in entries.items()
                for i, part_name in enumerate(split_names(entry_name))
            }
        for torch_name, entry in entries.items():
            if torch_name in table:
                raise ValueError(
                    f"the name map gives torch module {torch_name!r} to both {table[torch_name].path!r} and "
                    f"{module_path!r}; make its rows one-to-one"
                )
            table[torch_name] = entry
    return table
