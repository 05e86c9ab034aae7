"""Writing a jaxlora adapter as a Hugging Face PEFT LoRA directory (see `peft_keys` for the format)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora._src.atomic_files import shared_atomic_directory
from jaxlora._src.config import LoraConfig
from jaxlora._src.derived_plans import shape_tree
from jaxlora._src.multihost import host_array, is_primary
from jaxlora._src.name_maps import NameMap, leaf_path, module_table, split_names, to_torch, torch_module, torch_param
from jaxlora._src.paths import PyTree, leaves_with_paths
from jaxlora._src.peft_keys import CONFIG_NAME, MAGNITUDE_KEY, PREFIX, WEIGHTS_NAME
from jaxlora._src.planning import LeafPlan, Plan, resolve
from jaxlora._src.planning import plan as make_plan
from jaxlora._src.safetensors_io import write_tensors

TorchName = Callable[[str], tuple[str, str]]
# Inits whose adapters sit on a residual base; written as plain LoRA over the original weights (`as_plain_lora`).
_RESIDUAL_INITS = ("pissa", "olora")


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


def _magnitude_tensor(pair: Mapping[str, Any], layout: str, path: str) -> np.ndarray:
    """PEFT's DoRA ``lora_magnitude_vector``: one entry per output feature (our magnitude, flattened)."""
    if layout not in ("linear", "conv1d"):
        raise ValueError(
            f"cannot export the DoRA adapter of {path!r} to PEFT: jaxlora writes DoRA magnitudes for linear and "
            f"conv1d layers, and this one is {layout!r}; exclude it from the targets"
        )
    return np.asarray(pair["magnitude"]).reshape(-1)


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


def _adapter_tensors(plan: Plan, pairs: Mapping, torch_name: TorchName, names: list[str]) -> tuple[dict, dict]:
    """PEFT's LoRA tensors for every adapted leaf, and the config entries they need (targets, patterns, layouts)."""
    config = plan.config
    tensors: dict[str, np.ndarray] = {}
    targets, layouts, rank_pattern, alpha_pattern = [], set(), {}, {}
    owners: dict[str, str] = {}
    for path, leaf in plan.leaves.items():
        template, layout = torch_name(path)
        if owners.setdefault(template, path) != path:
            raise ValueError(
                f"cannot export the LoRA adapters of {owners[template]!r} and {path!r} to PEFT: both map to the torch "
                f"module {template!r}, which holds one weight; give them torch names of their own in the name map, "
                "or adapt one of them"
            )
        for layer_name, layer_pair in _per_layer(path, leaf, pairs[path], template):
            rank, alpha = leaf.rank, leaf.alpha
            if config.init == "eva" and leaf.stacked_axes and not config.use_rslora:
                layer_pair, rank = _eva_layer_rank(layer_pair)
                alpha = leaf.scale * rank  # PEFT's EVA alpha x new_rank / r: the scale alpha / r is kept
            for name, pair in _per_part(path, leaf, layer_pair, layer_name):
                for suffix, tensor in _lora_tensors(pair, layout, path).items():
                    tensors[f"{PREFIX}{name}.{suffix}"] = tensor
                if "magnitude" in pair:
                    tensors[f"{PREFIX}{name}.{MAGNITUDE_KEY}"] = _magnitude_tensor(pair, layout, path)
                targets.append(name)
                layouts.add(layout)
                if rank != config.rank:
                    rank_pattern[_pattern_key(name, names)] = rank
                if alpha != config.alpha:
                    alpha_pattern[_pattern_key(name, names)] = _peft_number(alpha)
        peft_scale = leaf.alpha / (math.sqrt(leaf.rank) if config.use_rslora else leaf.rank)
        if not math.isclose(peft_scale, leaf.scale, rel_tol=1e-6):
            raise RuntimeError(f"PEFT would scale {path!r} by {peft_scale}, jaxlora by {leaf.scale}: please report")
    entries = {
        "target_modules": _target_modules(targets, names),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": "conv1d" in layouts,
    }
    return tensors, entries


def _eva_layer_rank(pair: Mapping) -> tuple[dict, int]:
    """One layer of an EVA stack without its trailing zero directions (A column and B row both zero: padding up to
    the stack's rank, which training keeps at zero), and its own rank, as PEFT keeps one rank per module."""
    a, b = np.asarray(pair["lora_a"]), np.asarray(pair["lora_b"])
    rank = a.shape[-1]
    a2, b2 = a.reshape(-1, rank), b.reshape(rank, -1)
    used = np.flatnonzero(np.any(a2 != 0, axis=0) | np.any(b2 != 0, axis=1))
    keep = int(used[-1]) + 1 if used.size else 1
    return {"lora_a": a[..., :keep], "lora_b": b[:keep]}, keep


def _per_layer(path: str, leaf: LeafPlan, pair: Mapping, template: str) -> list[tuple[str, dict]]:
    """(torch module name, pair) for every adapted layer: one for a plain leaf, one per layer for a stacked one."""
    if not leaf.stacked_axes:
        if "{layer}" in template:
            raise ValueError(f"the name map names {path!r} per layer ({template!r}), but the plan does not stack it")
        return [(template, pair)]
    if "{layer}" not in template:
        raise ValueError(
            f"cannot export the stacked adapter of {path!r} to PEFT: PEFT keeps one module per layer, and the name "
            f"map gives {template!r}; use a row whose torch name holds a {{layer}} placeholder "
            '(e.g. "transformer.h.{layer}.attn.c_attn")'
        )
    a = np.asarray(pair["lora_a"]).reshape(leaf.num_layers, *leaf.a_shape[leaf.stacked_axes :])
    b = np.asarray(pair["lora_b"]).reshape(leaf.num_layers, *leaf.b_shape[leaf.stacked_axes :])
    layers = range(leaf.num_layers) if leaf.layers is None else leaf.layers
    return [(template.replace("{layer}", str(i)), {"lora_a": a[i], "lora_b": b[i]}) for i in layers]


def _per_part(path: str, leaf: LeafPlan, pair: Mapping, name: str) -> list[tuple[str, dict]]:
    """(torch module name, pair) for every torch module one layer's kernel is: itself, or, for a name with a
    ``{a,b}`` group, one per slice of the kernel's first axis, each with the same A and its slice of B (exact)."""
    parts = split_names(name)
    if parts is None:
        return [(name, pair)]
    shape = leaf.layer_shape
    if 0 in leaf.layer_in_axes or shape[0] != len(parts):
        raise ValueError(
            f"cannot export the LoRA adapter of {path!r} (one layer {shape}, inputs on axes {leaf.layer_in_axes}) "
            f"as the {len(parts)} torch modules {list(parts)}: their weights are slices of its first axis, so that "
            f"axis must have size {len(parts)} and not meet x; build the plan with model= and example= so that "
            "the kernel's input axes are read from its operation, or fix the name map's row"
        )
    if "magnitude" in pair:
        raise ValueError(
            f"cannot export the DoRA adapter of {path!r} as the torch modules {list(parts)}: jaxlora writes DoRA "
            "for kernels that are one torch module; exclude it from the targets, or use plain LoRA"
        )
    b = np.asarray(pair["lora_b"])  # (r, *out): its axis 1 is the kernel's first axis, the first output axis
    return [(part, {"lora_a": pair["lora_a"], "lora_b": b[:, i]}) for i, part in enumerate(parts)]


def _saved_tensors(plan: Plan, params: PyTree, torch_name: TorchName, names: list[str]) -> tuple[dict, list[str]]:
    """The full weights of the modules_to_save modules under their torch names, and those module names."""
    values = dict(leaves_with_paths(params))
    tensors: dict[str, np.ndarray] = {}
    saved_modules = []
    for path in {p.rpartition("/")[0]: p for p in plan.saved}.values():
        module_path = path.rpartition("/")[0]
        name, layout = torch_name(path)
        if split_names(name):
            raise ValueError(
                f"cannot export {path!r} as a PEFT modules_to_save entry: the name map splits it into the torch "
                f"modules {list(split_names(name))}, whose full weights jaxlora does not write; train it as an adapter"
            )
        if "{layer}" in name:
            raise ValueError(
                f"cannot export {path!r} as a PEFT modules_to_save entry: it is stacked, and PEFT saves whole "
                "torch modules; train it as an adapter, or unstack the model before exporting"
            )
        saved_modules.append(name)
        for leaf_name, value in _leaves_of(module_path, values).items():
            value = host_array(value)  # gathered when sharded across processes
            tensors[f"{PREFIX}{name}.{torch_param(leaf_name, layout)}"] = to_torch(value, leaf_name, layout)
        clash = [m for m in names if m != name and m.endswith(name)]
        if clash:
            warnings.warn(f"PEFT picks modules_to_save by suffix, so {name!r} will also select {clash}", stacklevel=3)
    return tensors, saved_modules


def as_plain_lora(plan: Plan, pairs: Mapping, initial: Mapping) -> tuple[Plan, dict]:
    """A PiSSA / OLoRA adapter as plain rank-2r LoRA over the original weights (PEFT's `subtract_mutated_init`).

    With W = W_res + s·A0 B0 (the init) and the trained model W_res + s·A B, the update over W is
    s·(A B - A0 B0) = s·[A | A0] [B ; -B0]: rank 2r, alpha doubled (times sqrt 2 with rsLoRA), so s is unchanged.
    """
    config = plan.config
    factor = math.sqrt(2) if config.use_rslora else 2
    doubled = dataclasses.replace(
        config,
        init="kaiming",
        rank=2 * config.rank,
        alpha=factor * config.alpha,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: factor * v for k, v in config.alpha_pattern.items()},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 2r may exceed min(fan_in, fan_out), which PEFT allows (as does loading)
        new_plan = make_plan(shape_tree(plan), doubled, allow_excess_rank=True)
    initial = plan.check_adapters(initial)
    converted = {}
    for path, leaf in plan.leaves.items():
        pair, first = pairs[path], initial[path]
        a0, b0 = np.asarray(host_array(first["lora_a"])), np.asarray(host_array(first["lora_b"]))
        a = np.concatenate([np.asarray(pair["lora_a"]), a0], axis=-1)
        b = np.concatenate([np.asarray(pair["lora_b"]), -b0], axis=leaf.stacked_axes)
        converted[path] = {"lora_a": a, "lora_b": b}
    return new_plan, converted


def _eva_entries(config: LoraConfig) -> dict[str, Any]:
    """What PEFT records for an EVA adapter besides its rank_pattern / alpha_pattern: the init and its EvaConfig
    (jaxlora's EVA: PEFT's defaults but rho, no label mask, no whitening, scaling factors adjusted)."""
    if config.init != "eva":
        return {}
    eva_config = {
        "rho": _peft_number(config.eva_rho),
        "tau": 0.99,
        "use_label_mask": False,
        "label_mask_value": -100,
        "whiten": False,
        "adjust_scaling_factors": True,
    }
    return {"init_lora_weights": "eva", "eva_config": eva_config}


def _peft_config(config: LoraConfig, entries: Mapping[str, Any], saved_modules: list[str], **extra: Any) -> dict:
    """adapter_config.json for a plain LoRA adapter."""
    return {
        "peft_type": "LORA",
        "r": config.rank,
        "lora_alpha": _peft_number(config.alpha),
        "use_rslora": config.use_rslora,
        **entries,
        "modules_to_save": saved_modules or None,
        "lora_dropout": config.dropout,
        "bias": "none",
        "use_dora": config.use_dora,
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
        **extra,
    }


def save_peft(
    directory: str | os.PathLike,
    params: PyTree,
    adapters: Mapping,
    plan: Plan | LoraConfig,
    *,
    name_map: NameMap = (),
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    overwrite: bool = False,
    initial_adapters: Mapping | None = None,
) -> Path:
    """Writes a PEFT LoRA adapter directory that ``peft.PeftModel.from_pretrained`` loads onto the torch model.

    Args:
      directory: where to write ``adapter_model.safetensors`` and ``adapter_config.json`` (atomically).
      params: the base params (with any trained modules_to_save leaves).
      adapters: the adapters.
      plan: from `jaxlora.plan(params, config)` (a `LoraConfig` is resolved here).
      name_map: torch module names and layouts (e.g. ``jaxlora.models.gpt2.PEFT_NAME_MAP``).
      base_model_name_or_path: recorded for PEFT (e.g. "openai-community/gpt2").
      task_type: PEFT's task type ("CAUSAL_LM", "SEQ_CLS", ...).
      overwrite: replace an existing directory.
      initial_adapters: for init="pissa" / "olora", the adapters `jaxlora.init` returned (before training): the
        file then holds the plain rank-2r LoRA [A | A0], [B ; -B0] over the original weights, as PEFT's
        ``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes it (r and alpha doubled). A
        LoftQ adapter is written as it is (plain LoRA, as PEFT's LoftQ recipe saves it): it applies to the
        LoftQ base (the NF4 base `jaxlora.init` returned), which the user ships beside it.

    In a multi-process run (``jax.distributed``) every process calls it with the same arguments: the
    adapters (and saved leaves) are gathered from their shards, and process 0 writes the files once, on a
    file system the processes share.

    Returns:
      The absolute path written.

    Raises:
      ValueError: for adapters PEFT cannot express (PiSSA / OLoRA adapters without `initial_adapters`, a table
        tied to the head, layouts without a PEFT form), naming the leaf; nothing is written then.
      FileExistsError: if `directory` exists and `overwrite` is False.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, jaxlora
      >>> params = {"linear1": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)}}
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
      >>> params, adapters = jaxlora.init(jax.random.key(0), params, plan)
      >>> path = jaxlora.peft_format.save_peft(tempfile.mkdtemp() + "/peft", params, adapters, plan)
      >>> sorted(p.name for p in path.iterdir())
      ['adapter_config.json', 'adapter_model.safetensors']
    """
    resolved = resolve(params, plan)
    pairs = resolved.check_adapters(adapters)
    pairs = {path: {name: host_array(x) for name, x in pair.items()} for path, pair in pairs.items()}
    if resolved.config.init in _RESIDUAL_INITS:
        if initial_adapters is None or resolved.config.use_dora:
            raise ValueError(
                f"init={resolved.config.init!r} adapters are relative to the residual base that jaxlora.init returned, "
                "not to the original weights a PEFT user loads them onto: pass initial_adapters= (the adapters "
                "jaxlora.init returned, before training) to write them as plain rank-2r LoRA over the original "
                "weights, as PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) does"
                + (" (not with DoRA: merge and export the merged model instead)" if resolved.config.use_dora else "")
            )
        resolved, pairs = as_plain_lora(resolved, pairs, initial_adapters)
    elif initial_adapters is not None:
        raise ValueError(
            f"initial_adapters is for init='pissa' / 'olora' adapters (relative to a residual base); this plan's "
            f"init is {resolved.config.init!r}: leave initial_adapters out"
        )
    modules = module_table(resolved.shapes, name_map)
    names = list(modules)
    by_path = {  # plain modules; stacked and split ones by their template, which the export expands
        leaf_path(m.path, leaf): (name, m.layout)
        for name, m in modules.items()
        if m.layer is None and m.part is None
        for leaf in m.leaves
    }

    def torch_name(path: str) -> tuple[str, str]:
        module_path, _, leaf = path.rpartition("/")
        return by_path.get(path) or torch_module(module_path, leaf, name_map)  # the latter raises if unnamed

    tensors, entries = _adapter_tensors(resolved, pairs, torch_name, names)
    saved, saved_modules = _saved_tensors(resolved, params, torch_name, names)
    peft_config = _peft_config(
        resolved.config,
        entries,
        saved_modules,
        task_type=task_type,
        base_model_name_or_path=base_model_name_or_path,
        **_eva_entries(resolved.config),
    )
    directory = Path(directory).expanduser().absolute()
    with shared_atomic_directory(directory, overwrite) as tmp:
        if is_primary():
            tmp.mkdir()
            write_tensors(tmp / WEIGHTS_NAME, {**tensors, **saved})
            (tmp / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    return directory


def _leaves_of(module_path: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The leaves directly inside `module_path`, by leaf name."""
    prefix = f"{module_path}/" if module_path else ""
    return {p[len(prefix) :]: v for p, v in values.items() if p.startswith(prefix) and "/" not in p[len(prefix) :]}
