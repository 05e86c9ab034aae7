"""Reading a Hugging Face PEFT LoRA directory into jaxlora adapters (see `peft_keys` for the format).

Reading goes in small steps: read the directory, sort its tensors into LoRA factors and full weights, check
that they cover what the config targets, convert each module's factors to our layout, put the full weights in,
and build the jaxlora config and plan that reproduce PEFT's scales.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxlora._src.config import LoraConfig
from jaxlora._src.name_maps import NameMap, from_torch, leaf_path, module_table, torch_param
from jaxlora._src.paths import PyTree, leaves_with_paths, map_with_paths, unflatten_adapters
from jaxlora._src.peft_keys import CONFIG_NAME, MAGNITUDE_KEY, PREFIX, WEIGHTS_NAME
from jaxlora._src.planning import Plan
from jaxlora._src.planning import plan as make_plan
from jaxlora._src.safetensors_io import read_tensors

Modules = Mapping[str, tuple[str, str, tuple[str, ...]]]  # torch name -> (our module path, layout, leaf names)

_FACTOR_KEYS = {
    "lora_A.weight": ("lora_a", "linear"),
    "lora_B.weight": ("lora_b", "linear"),
    "lora_embedding_A": ("lora_a", "embedding"),
    "lora_embedding_B": ("lora_b", "embedding"),
    MAGNITUDE_KEY: ("magnitude", "linear"),
}
_LORA_KEY = re.compile(
    r"(?P<module>.+)\.(?P<factor>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
)
# Keys that only other PEFT features write; named in the error instead of being loaded partially.
_UNSUPPORTED_KEYS = {
    "lora_magnitude_vector": "DoRA magnitude vectors while adapter_config.json says use_dora=false",
    "lora_B.bias": "LoRA bias adapters (lora_bias)",
    "lora_A.bias": "LoRA bias adapters (lora_bias)",
    "trainable_tokens": "trainable tokens (trainable_token_indices)",
}
# adapter_config.json settings that change what the file means; loading them as plain LoRA would be wrong.
_UNSUPPORTED_SETTINGS = (
    "lora_bias",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
    "use_qalora",
    "alora_invocation_tokens",
    "use_bdlora",
    "arrow_config",
    "kasa_config",
    "monteclora_config",
    "megatron_config",
)
# init_lora_weights values whose adapters are relative to a modified (residual / quantised) base.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def _check_supported(peft_config: Mapping[str, Any], source: Path) -> None:
    if peft_config.get("peft_type") != "LORA":
        raise ValueError(f"{source}: peft_type is {peft_config.get('peft_type')!r}; jaxlora reads only LORA adapters")
    used = [k for k in _UNSUPPORTED_SETTINGS if peft_config.get(k) not in (None, False, [], {}, 0)]
    if peft_config.get("bias", "none") != "none":
        used.append(f"bias={peft_config['bias']!r}")
    init = peft_config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        used.append(f"init_lora_weights={init!r} (adapter relative to a modified base; convert it to plain LoRA)")
    if used:
        raise ValueError(
            f"{source} uses PEFT features jaxlora does not support: {', '.join(used)}; "
            "loading it as plain LoRA would give a different model"
        )


def _peft_targets(name: str, peft_config: Mapping[str, Any]) -> bool:
    """Whether PEFT's LoRA targets module `name` (its rules for target_modules / exclude_modules / modules_to_save)."""
    exclude = peft_config.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(exclude, name):
        return False
    if isinstance(exclude, list) and any(name == e or name.endswith(f".{e}") for e in exclude):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in peft_config.get("modules_to_save") or ()):
        return False
    targets = peft_config.get("target_modules")
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets or ())


def _pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup for module `name`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _fan_in_ndim(shape: tuple[int, ...], fan_in: int, fan_out: int) -> int | None:
    """How many leading axes of an n-D kernel make up torch's `fan_in` (None if no split fits)."""
    fits = [k for k in range(1, len(shape)) if math.prod(shape[:k]) == fan_in and math.prod(shape[k:]) == fan_out]
    if not fits:
        return None
    return len(shape) - 1 if len(shape) - 1 in fits else fits[0]


class _Factors(NamedTuple):
    """The file's tensors sorted: LoRA factors per torch module, their kind, and modules_to_save weights."""

    factors: dict[str, dict[str, Any]]
    kinds: dict[str, str]
    saved: dict[str, Any]


class _Converted(NamedTuple):
    """Our adapters and, per adapted path, what the config must say about it (`layers` only for stacked ones)."""

    pairs: dict[str, dict[str, Any]]
    ranks: dict[str, int]
    alphas: dict[str, float]
    fan_in_ndims: dict[str, int]
    scales: dict[str, float]
    layers: dict[str, tuple[int, ...] | None]


def _read_directory(directory: Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    """(adapter_config.json as a dict, the tensors by key without PEFT's prefix, the weights file)."""
    config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}; pass the directory PeftModel.save_pretrained wrote")
    if not weights_file.is_file():
        hint = " (adapter_model.bin is a pickle, which is not read: re-save with safe_serialization=True)"
        raise FileNotFoundError(
            f"no {WEIGHTS_NAME} in {directory}" + (hint if (directory / "adapter_model.bin").exists() else "")
        )
    try:
        peft_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON ({err})") from err
    if not isinstance(peft_config, dict):
        raise ValueError(f"{config_file} must hold a JSON object, got {type(peft_config).__name__}")
    _check_supported(peft_config, config_file)
    raw = read_tensors([weights_file], remedy="export the adapter again")
    return peft_config, {k.removeprefix(PREFIX): v for k, v in raw.items()}, weights_file


def _sort_tensors(
    tensors: Mapping[str, Any], modules: Modules, saved_names: list[str], source: Path, use_dora: bool = False
) -> _Factors:
    """Sorts the tensors into LoRA factors and modules_to_save weights; ValueError for keys it cannot place.

    DoRA magnitudes are factors only in a file whose config says use_dora.
    """
    factors: dict[str, dict[str, Any]] = {}
    kinds: dict[str, str] = {}
    saved: dict[str, Any] = {}
    unexpected: list[str] = []
    for key, value in tensors.items():
        match = _LORA_KEY.fullmatch(key)
        if match and match["factor"] == MAGNITUDE_KEY and not use_dora:
            unexpected.append(key)
            continue
        if match:
            name, (factor, kind) = match["module"], _FACTOR_KEYS[match["factor"]]
            factors.setdefault(name, {})[factor] = value
            if kinds.setdefault(name, kind) != kind:
                unexpected.append(key)
            continue
        module_name, _, _ = key.rpartition(".")
        if module_name in modules and any(module_name.endswith(m) for m in saved_names):
            saved[key] = value
        else:
            unexpected.append(key)
    if unexpected:
        features = sorted({what for key in unexpected for marker, what in _UNSUPPORTED_KEYS.items() if marker in key})
        raise ValueError(
            f"{source} holds keys jaxlora cannot place: {sorted(PREFIX + k for k in unexpected)[:8]}"
            + (f" (these come from {', '.join(features)}, which jaxlora does not support)" if features else "")
            + "; check the name map and that the file is a plain LoRA adapter"
        )
    return _Factors(factors, kinds, saved)


def _check_coverage(factors: Mapping[str, Any], modules: Modules, peft_config: Mapping[str, Any], source: Path) -> None:
    """Every factor belongs to one of our modules, and every module the config targets has its factors."""
    unknown = sorted(set(factors) - set(modules))
    if unknown:
        raise ValueError(
            f"{source} has LoRA weights for torch modules {unknown[:8]} that no parameter of `params` maps to "
            f"(our modules map to e.g. {list(modules)[:6]}); pass the name map of this model family"
        )
    if peft_config.get("layers_to_transform"):
        return
    expected = sorted(
        name
        for name, module in modules.items()
        if _peft_targets(name, peft_config)
        and (_kernel_leaf(module.leaves) in module.leaves or "embedding" in module.leaves)
    )
    missing = [name for name in expected if name not in factors]
    if missing:
        raise ValueError(
            f"{source} is missing the LoRA weights of {missing[:8]}, which {CONFIG_NAME} targets "
            f"(target_modules={peft_config.get('target_modules')!r}); the file is incomplete: export it again"
        )


def _module_path(
    name: str, kind: str, factor: Mapping[str, Any], modules: Modules, source: Path, use_dora: bool = False
) -> str:
    """Our param path for the LoRA factors of torch module `name`, after checking they fit that module."""
    module_path, layout, leaves = modules[name][:3]
    missing_factor = {"lora_a", "lora_b"} - set(factor)
    if not missing_factor and use_dora and "magnitude" not in factor:
        raise ValueError(
            f"{source} has no {PREFIX}{name}.{MAGNITUDE_KEY}, but {CONFIG_NAME} sets use_dora=true; "
            "the file is incomplete: export it again"
        )
    if missing_factor:
        key = {"linear": "lora_A.weight", "embedding": "lora_embedding_A"}[kind]
        key = key.replace("A", "B") if "lora_b" in missing_factor else key
        raise ValueError(f"{source} has no {PREFIX}{name}.{key}; the file is incomplete: export it again")
    if layout == "tied_embedding":
        raise ValueError(
            f"{source}: torch module {name!r} has an Embedding LoRA on a table tied to the output head; "
            "PEFT adapts only its lookup, while jaxlora adapts the lookup and the tied head together, so "
            "loading it would compute another model: train the adapter without this module"
        )
    leaf = "embedding" if kind == "embedding" else _kernel_leaf(leaves)
    if leaf not in leaves or (kind == "embedding") != (layout == "embedding"):
        raise ValueError(
            f"{source}: torch module {name!r} holds {kind} LoRA weights, but our module {module_path!r} "
            f"is a {layout} layer with leaves {list(leaves)}; check the name map"
        )
    return leaf_path(module_path, leaf)


def _kernel_leaf(leaves: tuple[str, ...]) -> str:
    """The leaf a linear module's LoRA adapts: `kernel`, else its one leaf that is not a bias or a scale (`w`)."""
    if "kernel" in leaves:
        return "kernel"
    others = [leaf for leaf in leaves if leaf not in ("bias", "scale")]
    return others[0] if len(others) == 1 else "kernel"


def _convert_factors(
    sorted_: _Factors,
    modules: Modules,
    shapes: Mapping[str, tuple[int, ...]],
    peft_config: Mapping,
    source: Path,
    layouts: Mapping[str, tuple[int, ...]],
) -> _Converted:
    """Our (A, B) for every adapted module, with the rank, alpha, fan_in_ndim and scale PEFT gives it."""
    r_default, alpha_default = peft_config.get("r", 8), peft_config.get("lora_alpha", 8)
    use_rslora = bool(peft_config.get("use_rslora", False))
    out = _Converted({}, {}, {}, {}, {}, {})
    per_layer: dict[str, dict[int, dict[str, Any]]] = {}
    parts: dict[str, dict[int | None, dict[int, _Part]]] = {}  # kernels that are several torch modules
    for name, factor in sorted(sorted_.factors.items()):
        kind, module = sorted_.kinds[name], modules[name]
        path = _module_path(name, kind, factor, modules, source, bool(peft_config.get("use_dora")))
        shape = shapes[path] if module.layer is None else shapes[path][1:]
        if module.part is None:
            pair, out.fan_in_ndims[path] = _convert_pair(
                factor, kind, name, path, shape, str(source), layouts.get(path)
            )
        else:
            pair, out.fan_in_ndims[path] = _convert_part(
                factor, kind, name, path, shape, str(source), layouts.get(path)
            )
        rank = pair["lora_a"].shape[-1]
        if out.ranks.setdefault(path, rank) != rank:
            raise ValueError(
                f"{source}: the torch modules of {path!r} (its layers, or the slices a name map group names) have "
                f"LoRA ranks {out.ranks[path]} and {rank}; jaxlora holds one rank per kernel: export the adapter "
                "with one rank for these modules"
            )
        want_rank = _pattern_value(peft_config.get("rank_pattern") or {}, name, r_default)
        if rank != want_rank:
            raise ValueError(
                f"{source}: {name!r} has LoRA rank {rank}, but {CONFIG_NAME} gives r={want_rank} "
                "for it; the weights and the config do not belong together"
            )
        alpha = out.alphas[path] = float(_pattern_value(peft_config.get("alpha_pattern") or {}, name, alpha_default))
        out.scales[path] = alpha / (math.sqrt(rank) if use_rslora else rank)
        if module.part is not None:
            parts.setdefault(path, {}).setdefault(module.layer, {})[module.part] = _Part(pair, alpha, out.scales[path])
        elif module.layer is None:
            out.pairs[path] = pair
        else:
            per_layer.setdefault(path, {})[module.layer] = pair
    for path, groups in parts.items():
        count = _part_count(modules, path)
        layer_shape = shapes[path] if None in groups else shapes[path][1:]
        if layer_shape[0] != count:
            raise ValueError(
                f"{source}: the name map splits our {path!r} (one layer {layer_shape}) into {count} torch modules "
                f"along its first axis, which has size {layer_shape[0]}; fix the name map's row"
            )
        joined = _join_parts(groups, count, use_rslora)
        out.ranks[path], out.alphas[path], out.scales[path] = joined.rank, joined.alpha, joined.scale
        for layer, pair in joined.pairs.items():
            if layer is None:
                out.pairs[path] = pair
            else:
                per_layer.setdefault(path, {})[layer] = pair
    for path, layers in per_layer.items():
        out.pairs[path], out.layers[path] = _stacked_pair(layers, shapes[path][0])
    if not out.pairs:
        raise ValueError(f"{source} holds no LoRA weights")
    return out


def _stacked_pair(layers: Mapping[int, Mapping[str, Any]], num_layers: int) -> tuple[dict, tuple[int, ...] | None]:
    """One stacked (A, B) from per-layer pairs (zeros for the layers the file has none for), and those layers."""
    some = next(iter(layers.values()))
    stacked = {
        name: jnp.stack([layers[i][name] if i in layers else jnp.zeros_like(some[name]) for i in range(num_layers)])
        for name in ("lora_a", "lora_b")
    }
    return stacked, None if len(layers) == num_layers else tuple(sorted(layers))


class _Part(NamedTuple):
    """One torch module's factors in our layout of its slice of a kernel, and its PEFT alpha and scale."""

    pair: dict[str, Any]
    alpha: float
    scale: float


class _Joined(NamedTuple):
    """A kernel's adapter joined from its slices' torch modules: one pair per layer (None: not stacked)."""

    pairs: dict[int | None, dict[str, Any]]
    rank: int
    alpha: float
    scale: float


def _part_count(modules: Modules, path: str) -> int:
    """How many torch modules the name map splits our kernel `path` into (the entries of its group)."""
    module_path, _, leaf = path.rpartition("/")
    found = [m.part for m in modules.values() if m.part is not None and m.path == module_path and leaf in m.leaves]
    return max(found) + 1


def _join_parts(groups: Mapping[int | None, Mapping[int, _Part]], count: int, use_rslora: bool) -> _Joined:
    """One kernel's adapter from the LoRA factors of the torch modules that are slices of its first axis.

    Where every module of every layer has the same A and scale (as `save_peft` writes them), A is that A and B
    stacks their B's: rank r, exact. Otherwise A = [A_0 | A_1 | ...] and B is block-diagonal (slice i of the
    first axis is A_i B_i), rank count·r with the scale of the first module (the others' scales folded into
    their B's): exact as well. A torch module the file has no factors for contributes nothing (zeros).
    """
    first = next(iter(groups.values()))
    ref = first[min(first)]
    rank = ref.pair["lora_a"].shape[-1]
    shared = all(
        part.scale == ref.scale and np.array_equal(part.pair["lora_a"], ref.pair["lora_a"])
        for group in groups.values()
        for part in group.values()
    )
    pairs = {layer: _joined_pair(group, count, rank, ref.scale, shared) for layer, group in groups.items()}
    if shared:
        return _Joined(pairs, rank, ref.alpha, ref.scale)
    total = count * rank
    return _Joined(pairs, total, ref.scale * (math.sqrt(total) if use_rslora else total), ref.scale)


def _joined_pair(group: Mapping[int, _Part], count: int, rank: int, scale: float, shared: bool) -> dict[str, Any]:
    """One layer's (A, B) of `_join_parts`: B's axis 1 is the kernel's first axis (its first output axis)."""
    some = next(iter(group.values())).pair
    ins, outs, dtype = some["lora_a"].shape[:-1], some["lora_b"].shape[1:], np.asarray(some["lora_a"]).dtype
    if shared:
        b = np.zeros((rank, count, *outs), dtype)
        for i, part in group.items():
            b[:, i] = part.pair["lora_b"]
        return {"lora_a": jnp.asarray(some["lora_a"]), "lora_b": jnp.asarray(b)}
    a = np.zeros((*ins, count * rank), dtype)
    b = np.zeros((count * rank, count, *outs), dtype)
    for i, part in group.items():
        a[..., i * rank : (i + 1) * rank] = part.pair["lora_a"]
        b[i * rank : (i + 1) * rank, i] = np.asarray(part.pair["lora_b"]) * (part.scale / scale)
    return {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}


def _jaxlora_config(
    peft_config: Mapping[str, Any], converted: _Converted, saved_paths: list[str], shapes: Mapping
) -> LoraConfig:
    """The LoraConfig that adapts exactly the file's modules with PEFT's ranks, alphas and scales."""
    r_default, alpha_default = peft_config.get("r", 8), peft_config.get("lora_alpha", 8)
    return LoraConfig(
        rank=r_default,
        alpha=float(alpha_default),
        targets=tuple(re.escape(p) for p in converted.pairs),
        rank_pattern={re.escape(p): r for p, r in converted.ranks.items() if r != r_default},
        alpha_pattern={re.escape(p): a for p, a in converted.alphas.items() if a != alpha_default},
        use_rslora=bool(peft_config.get("use_rslora", False)),
        dropout=float(peft_config.get("lora_dropout", 0.0)),
        modules_to_save=tuple(re.escape(p) for p in saved_paths),
        fan_in_ndim={
            re.escape(p): k
            for p, k in converted.fan_in_ndims.items()
            if isinstance(k, int) and k != len(shapes[p]) - (p in converted.layers) - 1
        },
        in_axes={re.escape(p): k for p, k in converted.fan_in_ndims.items() if isinstance(k, tuple)},
        stacked_axes={re.escape(p): 1 for p in converted.layers},
        layers_to_transform={re.escape(p): layers for p, layers in converted.layers.items() if layers is not None},
        use_dora=bool(peft_config.get("use_dora", False)),
    )


def load_peft(
    directory: str | os.PathLike, params: PyTree, *, name_map: NameMap = (), layouts: Plan | None = None
) -> tuple[PyTree, dict, Plan]:
    """`(params, adapters, plan)` from a PEFT LoRA directory, for our base `params` and torch `name_map`.

    Args:
      directory: what ``PeftModel.save_pretrained`` wrote (``adapter_config.json`` + ``adapter_model.safetensors``).
      params: our base params.
      name_map: torch module names and layouts (e.g. ``jaxlora.models.gpt2.PEFT_NAME_MAP``).
      layouts: a plan over these params whose kernels' input axes (`in_axes`, read by `jaxlora.plan(...,
        model=...)`) the file's factors follow, for kernels whose inputs are not their leading axes (einsum
        kernels such as (heads, features, head_dim)); without it, a kernel's inputs are its leading axes.

    Returns:
      `params` with the file's modules_to_save weights put in, the adapters, and the plan (its config is
      `plan.config`) reproducing PEFT's per-module ranks and scales.

    Raises:
      FileNotFoundError: if a file is missing.
      ValueError: for unsupported PEFT features, unreadable files, missing or unexpected keys and wrong shapes,
        naming them.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, jaxlora
      >>> params = {"linear1": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
      >>> params, adapters = jaxlora.init(jax.random.key(0), params, plan)
      >>> path = jaxlora.peft_format.save_peft(tempfile.mkdtemp() + "/peft", params, adapters, plan)
      >>> _, loaded, loaded_plan = jaxlora.peft_format.load_peft(path, params)
      >>> loaded_plan.leaves["linear1/kernel"].rank
      2
    """
    directory = Path(directory).expanduser().absolute()
    peft_config, tensors, source = _read_directory(directory)
    flat_params = dict(leaves_with_paths(params))
    shapes = {p: tuple(jnp.shape(v)) for p, v in flat_params.items()}
    modules = module_table(shapes, name_map)
    saved_names = peft_config.get("modules_to_save") or []
    sorted_ = _sort_tensors(tensors, modules, saved_names, source, bool(peft_config.get("use_dora")))
    _check_coverage(sorted_.factors, modules, peft_config, source)
    # every kernel of `layouts` by its axes (a leading fan-in is ambiguous from the factors when an axis has size 1)
    in_axes = {} if layouts is None else {p: leaf.layer_in_axes for p, leaf in layouts.leaves.items()}
    converted = _convert_factors(sorted_, modules, shapes, peft_config, source, in_axes)
    new_params, saved_paths = _load_saved(params, flat_params, sorted_.saved, modules, saved_names, str(source))
    # PEFT allows a rank above min(in, out) (the update's rank is still at most that): warn, do not refuse a file
    resolved = make_plan(
        new_params, _jaxlora_config(peft_config, converted, saved_paths, shapes), allow_excess_rank=True
    )
    adapters = unflatten_adapters(converted.pairs)
    resolved.check_adapters(adapters)
    for path, leaf in resolved.leaves.items():
        if not math.isclose(leaf.scale, converted.scales[path], rel_tol=1e-6):
            raise RuntimeError(
                f"jaxlora scales {path!r} by {leaf.scale}, PEFT by {converted.scales[path]}: please report"
            )
    return new_params, adapters, resolved


def _convert_pair(
    factor: Mapping[str, Any],
    kind: str,
    name: str,
    path: str,
    shape: tuple[int, ...],
    source: str,
    in_axes: tuple[int, ...] | None = None,
) -> tuple[dict[str, Any], int | tuple[int, ...]]:
    """Our (A, B) and fan_in_ndim (or, with a layout's `in_axes`, those axes) from PEFT's factors of torch module
    `name`, checking every shape."""
    lora_a, lora_b = factor["lora_a"], factor["lora_b"]
    if in_axes is not None and "magnitude" not in factor:
        return _convert_with_layout(lora_a, lora_b, name, path, shape, source, in_axes), in_axes
    if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != lora_b.shape[1]:
        raise ValueError(
            f"{source}: {name!r} has lora A {tuple(lora_a.shape)} and lora B {tuple(lora_b.shape)}; "
            "expected (r, in) and (out, r) with the same r"
        )
    rank, fan_in, fan_out = lora_a.shape[0], lora_a.shape[1], lora_b.shape[0]
    k = 1 if kind == "embedding" and len(shape) == 2 else _fan_in_ndim(shape, fan_in, fan_out)
    if k is None or (math.prod(shape[:k]), math.prod(shape[k:])) != (fan_in, fan_out):
        raise ValueError(
            f"{source}: {name!r} has lora A {tuple(lora_a.shape)} and lora B {tuple(lora_b.shape)}, which do not "
            f"fit our {path!r} of shape {shape} (expected ({rank}, {math.prod(shape[:-1])}) and "
            f"({shape[-1]}, {rank})); the adapter belongs to a different model"
        )
    a = jnp.asarray(lora_a).T.reshape(*shape[:k], rank)
    b = jnp.asarray(lora_b).T.reshape(rank, *shape[k:])
    if "magnitude" not in factor:
        return {"lora_a": a, "lora_b": b}, k
    magnitude = jnp.asarray(factor["magnitude"])
    if magnitude.shape != (fan_out,):
        raise ValueError(
            f"{source}: {name!r} has {MAGNITUDE_KEY} of shape {tuple(magnitude.shape)}, expected ({fan_out},) "
            "(one entry per output feature); the adapter belongs to a different model"
        )
    return {"lora_a": a, "lora_b": b, "magnitude": magnitude.reshape(shape[k:])}, k


def _convert_part(
    factor: Mapping[str, Any],
    kind: str,
    name: str,
    path: str,
    shape: tuple[int, ...],
    source: str,
    in_axes: tuple[int, ...] | None,
) -> tuple[dict[str, Any], tuple[int, ...]]:
    """Our (A, B) for torch module `name`, one slice of our kernel's first axis (B without that axis), and the
    kernel's input axes."""
    if kind != "linear" or "magnitude" in factor:
        what = "Embedding LoRA weights" if kind != "linear" else "a DoRA magnitude"
        raise ValueError(
            f"{source}: torch module {name!r} holds {what}, but the name map makes it one slice of our kernel "
            f"{path!r}, which jaxlora reads for plain linear LoRA only; check the name map"
        )
    if in_axes is None or 0 in in_axes:
        raise ValueError(
            f"{source}: torch module {name!r} is a slice of the first axis of our {path!r} (a name map group), "
            f"which needs that kernel's input axes (not its first): pass layouts=jaxlora.plan(params, config, "
            f"model=..., example=...), whose plan reads them from the model (now {in_axes})"
        )
    part_axes = tuple(d - 1 for d in in_axes)
    return _convert_with_layout(factor["lora_a"], factor["lora_b"], name, path, shape[1:], source, part_axes), in_axes


def _convert_with_layout(lora_a, lora_b, name, path, shape, source, in_axes) -> dict[str, Any]:
    """Our (A, B) for a kernel whose inputs are its axes `in_axes` (A over those, B over the others, in W's order)."""
    ins = [shape[d] for d in in_axes]
    outs = [shape[d] for d in range(len(shape)) if d not in in_axes]
    rank = lora_a.shape[0]
    fits = (lora_a.shape[1], lora_b.shape) == (math.prod(ins), (math.prod(outs), rank))
    if lora_a.ndim != 2 or lora_b.ndim != 2 or not fits:
        raise ValueError(
            f"{source}: {name!r} has lora A {tuple(lora_a.shape)} and lora B {tuple(lora_b.shape)}, which do not fit "
            f"our {path!r} of shape {shape} with inputs on axes {in_axes} (expected ({rank}, {math.prod(ins)}) and "
            f"({math.prod(outs)}, {rank})); the adapter belongs to a different model or layout"
        )
    return {
        "lora_a": jnp.asarray(lora_a).T.reshape(*ins, rank),
        "lora_b": jnp.asarray(lora_b).T.reshape(rank, *outs),
    }


def _load_saved(
    params: PyTree,
    flat_params: Mapping[str, Any],
    tensors: Mapping[str, Any],
    modules: Modules,
    saved_names: list[str],
    source: str,
) -> tuple[PyTree, list[str]]:
    """`params` with the modules_to_save weights in `tensors` put in, and the paths they replaced."""
    values: dict[str, Any] = {}
    for name, (module_path, layout, leaves, layer, part) in modules.items():
        if not any(name.endswith(m) for m in saved_names):
            continue
        if part is not None:
            raise ValueError(
                f"{source}: modules_to_save names {name!r}, one slice of our {module_path!r} (a name map group); "
                "jaxlora cannot put one slice's full weights into the kernel: train it as an adapter instead"
            )
        if layer is not None:
            raise ValueError(
                f"{source}: modules_to_save names {name!r}, one layer of our stacked {module_path!r}; jaxlora "
                "cannot put one layer's full weights into a stack: load it into the unstacked model"
            )
        for leaf in leaves:
            key = f"{name}.{torch_param(leaf, layout)}"
            path = leaf_path(module_path, leaf)
            if key not in tensors:
                raise ValueError(
                    f"{source} is missing {PREFIX}{key}, the full weight of {name!r} that modules_to_save "
                    f"{saved_names} names; the file is incomplete: export it again"
                )
            current = flat_params[path]
            try:
                value = from_torch(tensors[key], leaf, layout, tuple(jnp.shape(current)))
            except ValueError as err:
                raise ValueError(f"{source}: {PREFIX}{key} {err}; the adapter belongs to a different model") from None
            values[path] = jnp.asarray(value, current.dtype)
    return map_with_paths(lambda path, leaf: values.get(path, leaf), params), list(values)
