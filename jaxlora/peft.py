"""Hugging Face PEFT adapter files both ways: ``adapter_model.safetensors`` + ``adapter_config.json``.

PEFT stores, per adapted torch module ``m``, ``base_model.model.m.lora_A.weight`` (r, in) and
``...lora_B.weight`` (out, r) for Linear / Conv1D layers, ``...lora_embedding_A`` (r, num) and
``...lora_embedding_B`` (dim, r) for Embedding layers, and the full weights of modules_to_save under their plain
names (``base_model.model.head.weight``). Its scale is lora_alpha/r (lora_alpha/sqrt(r) with rsLoRA), with
per-module rank_pattern / alpha_pattern. Our A is (*in, r) and B (r, *out), so lora_A = Aᵀ and lora_B = Bᵀ.
Module names come from a name map (see `jaxlora.name_maps`).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxlora._paths import PyTree, leaves_with_paths, map_with_paths, unflatten_adapters
from jaxlora.checkpoint import atomic_directory
from jaxlora.config import LoraConfig
from jaxlora.name_maps import NameMap, from_torch, module_table, to_torch, torch_module, torch_param
from jaxlora.plan import plan

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."

_FACTOR_KEYS = {
    "lora_A.weight": ("lora_a", "linear"),
    "lora_B.weight": ("lora_b", "linear"),
    "lora_embedding_A": ("lora_a", "embedding"),
    "lora_embedding_B": ("lora_b", "embedding"),
}
_LORA_KEY = re.compile(r"(?P<module>.+)\.(?P<factor>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)")
# Keys that only other PEFT features write; named in the error instead of being loaded partially.
_UNSUPPORTED_KEYS = {
    "lora_magnitude_vector": "DoRA (use_dora) magnitude vectors",
    "lora_B.bias": "LoRA bias adapters (lora_bias)",
    "lora_A.bias": "LoRA bias adapters (lora_bias)",
    "trainable_tokens": "trainable tokens (trainable_token_indices)",
}
# adapter_config.json settings that change what the file means; loading them as plain LoRA would be wrong.
_UNSUPPORTED_SETTINGS = (
    "use_dora",
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


# ----------------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------------


def _lora_tensors(pair: Mapping[str, Any], layout: str, path: str) -> dict[str, np.ndarray]:
    """PEFT's factor tensors for one adapted leaf: (r, in) / (out, r), flattening n-D fan-in / fan-out."""
    a, b = np.asarray(pair["lora_a"]), np.asarray(pair["lora_b"])
    rank = a.shape[-1]
    if layout == "tied_embedding":
        raise ValueError(
            f"cannot export the LoRA adapter of {path!r} to PEFT: this table is tied to the output head, and "
            "jaxlora adapts the lookup and the tied head together while PEFT's Embedding LoRA adapts only the "
            "lookup, so PyTorch would compute another model; exclude it from the targets, or merge and share "
            "the full weights"
        )
    if layout == "embedding":
        if a.ndim != 2 or b.ndim != 2:
            raise ValueError(f"cannot export {path!r} as a torch Embedding: its table is not 2-D")
        return {"lora_embedding_A": a.T, "lora_embedding_B": b.T}
    if layout == "conv1d" and (a.ndim != 2 or b.ndim != 2):
        raise ValueError(f"cannot export {path!r} as a Conv1D layer: its kernel is not 2-D")
    if layout in ("linear", "conv1d"):
        return {"lora_A.weight": a.reshape(-1, rank).T, "lora_B.weight": b.reshape(rank, -1).T}
    raise ValueError(
        f"cannot export the LoRA adapter of {path!r} to PEFT: its torch layout is {layout!r}, and PEFT files "
        "are written here for linear, conv1d and embedding layers; exclude it from the targets"
    )


def _pattern_key(name: str, modules: list[str]) -> str:
    """A rank_pattern / alpha_pattern key that PEFT (``re.match(r"(.*\\.)?(key)$")``) matches to `name` only."""
    if all(m == name or not re.match(rf"(.*\.)?({name})$", m) for m in modules):
        return name
    return "^" + re.escape(name)


def _target_modules(targets: list[str], modules: list[str]) -> list[str] | str:
    """PEFT's target_modules: the module names, or, where a name also suffixes another module, a regex of them."""
    others = set(modules) - set(targets)
    if any(m.endswith(f".{t}") for t in targets for m in others):
        return "|".join(re.escape(t) for t in sorted(targets))  # PEFT fully matches a string against each name
    return sorted(targets)


def _peft_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def save_peft(
    directory: str | os.PathLike,
    params: PyTree,
    adapters: Mapping,
    config: LoraConfig,
    *,
    name_map: NameMap = (),
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes a PEFT LoRA adapter directory that ``peft.PeftModel.from_pretrained`` loads onto the torch model.

    `params` are the base params (with any trained modules_to_save leaves); `name_map` gives the torch module
    names (e.g. ``jaxlora.models.gpt2.PEFT_NAME_MAP``); `task_type` is PEFT's ("CAUSAL_LM", "SEQ_CLS", ...).
    """
    if config.init == "pissa":
        raise ValueError(
            "PiSSA adapters are relative to the residual base that jaxlora.init returned, not to the original "
            "weights a PEFT user loads them onto; merge them (jaxlora.merge) and export the merged model instead"
        )
    resolved = plan(params, config)
    pairs = resolved.check_adapters(adapters)
    values = dict(leaves_with_paths(params))
    modules = module_table(resolved.shapes, name_map)
    names = list(modules)
    by_path = {module_path: (name, layout) for name, (module_path, layout, _) in modules.items()}

    def torch_name(path: str) -> tuple[str, str]:
        module_path, _, leaf = path.rpartition("/")
        return by_path.get(module_path) or torch_module(module_path, leaf, name_map)  # the latter raises

    tensors: dict[str, np.ndarray] = {}
    targets, layouts, rank_pattern, alpha_pattern = [], set(), {}, {}
    for path, leaf in resolved.leaves.items():
        name, layout = torch_name(path)
        for suffix, tensor in _lora_tensors(pairs[path], layout, path).items():
            tensors[f"{PREFIX}{name}.{suffix}"] = tensor
        targets.append(name)
        layouts.add(layout)
        if leaf.rank != config.rank:
            rank_pattern[_pattern_key(name, names)] = leaf.rank
        if leaf.alpha != config.alpha:
            alpha_pattern[_pattern_key(name, names)] = _peft_number(leaf.alpha)
        peft_scale = leaf.alpha / (math.sqrt(leaf.rank) if config.use_rslora else leaf.rank)
        if not math.isclose(peft_scale, leaf.scale, rel_tol=1e-6):
            raise RuntimeError(f"PEFT would scale {path!r} by {peft_scale}, jaxlora by {leaf.scale}: please report")

    saved_modules = []
    for path in {p.rpartition("/")[0]: p for p in resolved.saved}.values():
        module_path = path.rpartition("/")[0]
        name, layout = torch_name(path)
        saved_modules.append(name)
        for leaf_name, value in _leaves_of(module_path, values).items():
            tensors[f"{PREFIX}{name}.{torch_param(leaf_name, layout)}"] = to_torch(value, leaf_name, layout)
        clash = [m for m in names if m != name and m.endswith(name)]
        if clash:
            warnings.warn(f"PEFT picks modules_to_save by suffix, so {name!r} will also select {clash}", stacklevel=2)

    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": _peft_number(config.alpha),
        "use_rslora": config.use_rslora,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": _target_modules(targets, names),
        "modules_to_save": saved_modules or None,
        "fan_in_fan_out": "conv1d" in layouts,
        "lora_dropout": config.dropout,
        "bias": "none",
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    directory = Path(directory).expanduser().absolute()
    with atomic_directory(directory, overwrite) as tmp:
        tmp.mkdir()
        _write_safetensors(tmp / WEIGHTS_NAME, tensors)
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    return directory


def _leaves_of(module_path: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The leaves directly inside `module_path`, by leaf name."""
    prefix = f"{module_path}/" if module_path else ""
    return {p[len(prefix) :]: v for p, v in values.items() if p.startswith(prefix) and "/" not in p[len(prefix) :]}


def _write_safetensors(file: Path, tensors: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(file), metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------------------------
# Import
# ----------------------------------------------------------------------------------------------------------------


def _read_safetensors(file: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="flax") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as err:
        raise ValueError(
            f"cannot read {file} as a safetensors file ({type(err).__name__}: {err}); "
            "it is truncated or corrupted: export the adapter again"
        ) from err


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


def load_peft(
    directory: str | os.PathLike, params: PyTree, *, name_map: NameMap = ()
) -> tuple[PyTree, dict, LoraConfig]:
    """`(params, adapters, config)` from a PEFT LoRA directory, for our base `params` and torch `name_map`.

    The returned params are `params` with the file's modules_to_save weights put in. Unsupported PEFT features,
    unreadable files, missing or unexpected keys and wrong shapes raise ValueError naming them.
    """
    directory = Path(directory).expanduser().absolute()
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
    _check_supported(peft_config, config_file)
    raw = _read_safetensors(weights_file)
    original = {k.removeprefix(PREFIX): k for k in raw}
    tensors = {k.removeprefix(PREFIX): v for k, v in raw.items()}

    flat_params = dict(leaves_with_paths(params))
    shapes = {p: tuple(np.shape(v)) for p, v in flat_params.items()}
    modules = module_table(shapes, name_map)

    factors: dict[str, dict[str, Any]] = {}
    kinds: dict[str, str] = {}
    saved_tensors: dict[str, Any] = {}
    unexpected: list[str] = []
    saved_names = peft_config.get("modules_to_save") or []
    for key, value in tensors.items():
        match = _LORA_KEY.fullmatch(key)
        if match:
            name, (factor, kind) = match["module"], _FACTOR_KEYS[match["factor"]]
            factors.setdefault(name, {})[factor] = value
            if kinds.setdefault(name, kind) != kind:
                unexpected.append(key)
            continue
        module_name, _, _ = key.rpartition(".")
        if module_name in modules and any(module_name.endswith(m) for m in saved_names):
            saved_tensors[key] = value
        else:
            unexpected.append(key)
    if unexpected:
        features = sorted({what for key in unexpected for marker, what in _UNSUPPORTED_KEYS.items() if marker in key})
        raise ValueError(
            f"{weights_file} holds keys jaxlora cannot place: {sorted(original[k] for k in unexpected)[:8]}"
            + (f" (these come from {', '.join(features)}, which jaxlora does not support)" if features else "")
            + "; check the name map and that the file is a plain LoRA adapter"
        )

    unknown = sorted(set(factors) - set(modules))
    if unknown:
        raise ValueError(
            f"{weights_file} has LoRA weights for torch modules {unknown[:8]} that no parameter of `params` maps to "
            f"(our modules map to e.g. {list(modules)[:6]}); pass the name map of this model family"
        )
    expected = sorted(
        name
        for name, (_, layout, leaves) in modules.items()
        if _peft_targets(name, peft_config) and ("kernel" in leaves or "embedding" in leaves)
    )
    if not peft_config.get("layers_to_transform"):
        missing = [name for name in expected if name not in factors]
        if missing:
            raise ValueError(
                f"{weights_file} is missing the LoRA weights of {missing[:8]}, which {CONFIG_NAME} targets "
                f"(target_modules={peft_config.get('target_modules')!r}); the file is incomplete: export it again"
            )

    r_default, alpha_default = peft_config.get("r", 8), peft_config.get("lora_alpha", 8)
    use_rslora = bool(peft_config.get("use_rslora", False))
    pairs, ranks, alphas, fan_in_ndims, scales = {}, {}, {}, {}, {}
    for name, factor in sorted(factors.items()):
        module_path, layout, leaves = modules[name]
        kind = kinds[name]
        missing_factor = {"lora_a", "lora_b"} - set(factor)
        if missing_factor:
            key = {"linear": "lora_A.weight", "embedding": "lora_embedding_A"}[kind]
            key = key.replace("A", "B") if "lora_b" in missing_factor else key
            raise ValueError(f"{weights_file} has no {PREFIX}{name}.{key}; the file is incomplete: export it again")
        leaf = "embedding" if kind == "embedding" else "kernel"
        if layout == "tied_embedding":
            raise ValueError(
                f"{weights_file}: torch module {name!r} has an Embedding LoRA on a table tied to the output head; "
                "PEFT adapts only its lookup, while jaxlora adapts the lookup and the tied head together, so "
                "loading it would compute another model: train the adapter without this module"
            )
        if leaf not in leaves or (kind == "embedding") != (layout == "embedding"):
            raise ValueError(
                f"{weights_file}: torch module {name!r} holds {kind} LoRA weights, but our module {module_path!r} "
                f"is a {layout} layer with leaves {list(leaves)}; check the name map"
            )
        path = f"{module_path}/{leaf}"
        pairs[path], fan_in_ndims[path] = _convert_pair(factor, kind, name, path, shapes[path], str(weights_file))
        ranks[path] = pairs[path]["lora_a"].shape[-1]
        want_rank = _pattern_value(peft_config.get("rank_pattern") or {}, name, r_default)
        if ranks[path] != want_rank:
            raise ValueError(
                f"{weights_file}: {name!r} has LoRA rank {ranks[path]}, but {CONFIG_NAME} gives r={want_rank} "
                "for it; the weights and the config do not belong together"
            )
        alphas[path] = float(_pattern_value(peft_config.get("alpha_pattern") or {}, name, alpha_default))
        scales[path] = alphas[path] / (math.sqrt(ranks[path]) if use_rslora else ranks[path])
    if not pairs:
        raise ValueError(f"{weights_file} holds no LoRA weights")

    new_params, saved_paths = _load_saved(params, saved_tensors, modules, saved_names, str(weights_file))
    config = LoraConfig(
        rank=r_default,
        alpha=float(alpha_default),
        targets=tuple(re.escape(p) for p in pairs),
        rank_pattern={re.escape(p): r for p, r in ranks.items() if r != r_default},
        alpha_pattern={re.escape(p): a for p, a in alphas.items() if a != alpha_default},
        use_rslora=use_rslora,
        dropout=float(peft_config.get("lora_dropout", 0.0)),
        modules_to_save=tuple(re.escape(p) for p in saved_paths),
        fan_in_ndim={re.escape(p): k for p, k in fan_in_ndims.items() if k != len(shapes[p]) - 1},
    )
    resolved = plan(new_params, config)
    adapters = unflatten_adapters(pairs)
    resolved.check_adapters(adapters)
    for path, leaf in resolved.leaves.items():
        if not math.isclose(leaf.scale, scales[path], rel_tol=1e-6):
            raise RuntimeError(f"jaxlora scales {path!r} by {leaf.scale}, PEFT by {scales[path]}: please report")
    return new_params, adapters, config


def _convert_pair(
    factor: Mapping[str, Any], kind: str, name: str, path: str, shape: tuple[int, ...], source: str
) -> tuple[dict[str, Any], int]:
    """Our (A, B) and fan_in_ndim from PEFT's factors of torch module `name`, checking every shape."""
    lora_a, lora_b = factor["lora_a"], factor["lora_b"]
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
    return {"lora_a": a, "lora_b": b}, k


def _load_saved(
    params: PyTree,
    tensors: Mapping[str, Any],
    modules: Mapping[str, tuple[str, str, tuple[str, ...]]],
    saved_names: list[str],
    source: str,
) -> tuple[PyTree, list[str]]:
    """`params` with the modules_to_save weights in `tensors` put in, and the paths they replaced."""
    values: dict[str, Any] = {}
    dtypes = {p: getattr(v, "dtype", None) for p, v in leaves_with_paths(params)}
    shapes = {p: tuple(np.shape(v)) for p, v in leaves_with_paths(params)}
    for name, (module_path, layout, leaves) in modules.items():
        if not any(name.endswith(m) for m in saved_names):
            continue
        for leaf in leaves:
            key = f"{name}.{torch_param(leaf, layout)}"
            path = f"{module_path}/{leaf}"
            if key not in tensors:
                raise ValueError(
                    f"{source} is missing {PREFIX}{key}, the full weight of {name!r} that modules_to_save "
                    f"{saved_names} names; the file is incomplete: export it again"
                )
            try:
                value = from_torch(tensors[key], leaf, layout, shapes[path])
            except ValueError as err:
                raise ValueError(f"{source}: {PREFIX}{key} {err}; the adapter belongs to a different model") from None
            values[path] = jnp.asarray(value, dtypes[path])
    return map_with_paths(lambda path, leaf: values.get(path, leaf), params), list(values)
