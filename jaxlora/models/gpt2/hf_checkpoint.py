"""Loading Hugging Face GPT-2 checkpoints (safetensors, local or from the hub)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora._src.safetensors_io import read_tensors
from jaxlora.models.gpt2.config import GPT2Config
from jaxlora.models.gpt2.layout import stack_layers
from jaxlora.models.gpt2.model import GPT2
from jaxlora.models.gpt2.names import torch_param_name

Params = dict[str, Any]


_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers in older checkpoints
_NO_WEIGHTS_HINT = (
    "Give the path of a GPT-2 model.safetensors file (or of a directory holding one), or a Hugging Face hub id "
    "such as 'openai-community/gpt2' on a machine that is online."
)


def _looks_like_local_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.endswith(".safetensors") or os.sep in name.replace("/", "", 1)


def _hub_file(repo_id: str, filename: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as err:  # pragma: no cover - huggingface_hub ships with transformers
        raise FileNotFoundError(
            f"{repo_id!r} is not a local path and huggingface_hub is not installed. {_NO_WEIGHTS_HINT}"
        ) from err
    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as err:  # offline, unknown repo, no network: all end the same way for the user
        raise FileNotFoundError(
            f"Could not get {filename!r} of {repo_id!r} from the Hugging Face Hub or its local cache "
            f"(offline or unreachable: {type(err).__name__}: {err}). {_NO_WEIGHTS_HINT}"
        ) from err


def _weight_files(path_or_repo: str | os.PathLike) -> tuple[list[Path], Path | None]:
    """The safetensors file(s) to read and the ``config.json`` beside them, if any."""
    path = Path(path_or_repo).expanduser()
    if path.is_file():
        config = path.parent / "config.json"
        return [path], config if config.is_file() else None
    if path.is_dir():
        config = path / "config.json"
        config = config if config.is_file() else None
        if (path / "model.safetensors").is_file():
            return [path / "model.safetensors"], config
        index = path / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [path / shard for shard in shards], config
        raise FileNotFoundError(f"No model.safetensors (or model.safetensors.index.json) in {path}. {_NO_WEIGHTS_HINT}")
    name = str(path_or_repo)
    if _looks_like_local_path(name):
        raise FileNotFoundError(f"GPT-2 weights not found at {name!r}. {_NO_WEIGHTS_HINT}")
    return [_hub_file(name, "model.safetensors")], _hub_file(name, "config.json")


def config_from_hf(path_or_repo: str | os.PathLike) -> GPT2Config:
    """GPT2Config from the ``config.json`` beside local weights or in a hub repo."""
    _, config_path = _weight_files(path_or_repo)
    if config_path is None:
        raise FileNotFoundError(f"No config.json beside the weights at {path_or_repo!r}; build a GPT2Config yourself.")
    return GPT2Config.from_hf_dict(json.loads(config_path.read_text()))


def _strip_prefix(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Accept GPT2LMHeadModel keys ("transformer.h.0...") and GPT2Model keys ("h.0...") alike."""
    out = {}
    for key, value in tensors.items():
        short = key.removeprefix("transformer.")
        if short in out:
            raise ValueError(f"Checkpoint holds both {short!r} and 'transformer.{short}'; keep one layout.")
        out[short] = value
    return out


def _infer_config(tensors: Mapping[str, Any]) -> GPT2Config:
    """Enough of a config to know every expected shape (n_head does not change shapes)."""
    if "wte.weight" not in tensors or "wpe.weight" not in tensors:
        raise ValueError(
            "Not a GPT-2 checkpoint: no 'wte.weight'/'wpe.weight' (also looked for 'transformer.wte.weight'). "
            f"First keys: {sorted(tensors)[:8]}"
        )
    vocab, width = tensors["wte.weight"].shape
    layers = {int(m.group(1)) for k in tensors if (m := re.match(r"h\.(\d+)\.", k))}
    fc = tensors.get("h.0.mlp.c_fc.weight")
    return GPT2Config(
        vocab_size=vocab,
        n_positions=tensors["wpe.weight"].shape[0],
        n_embd=width,
        n_layer=max(layers) + 1 if layers else 0,
        n_head=1,
        n_inner=None if fc is None else fc.shape[1],
    )


def _expected_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Our "/"-joined parameter paths and shapes, without allocating anything."""
    shapes = jax.eval_shape(lambda: GPT2(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def load_hf_weights(
    path_or_repo: str | os.PathLike, config: GPT2Config | None = None, dtype: Any = jnp.float32
) -> Params:
    """GPT-2 params for :class:`GPT2` / :class:`GPT2Classifier` from Hugging Face safetensors weights.

    ``path_or_repo``: a ``model.safetensors`` file, a directory holding one (or a sharded index), or a hub id such
    as ``"openai-community/gpt2"`` (downloaded with huggingface_hub when online). Shapes are checked against
    ``config`` when given, else against the ``config.json`` beside the weights, else against the weights
    themselves. Causal-mask buffers are ignored; a tied ``lm_head.weight`` is checked and dropped. With
    ``config.scan_layers`` the blocks come back stacked under "h" (see `stack_layers`).
    """
    files, config_path = _weight_files(path_or_repo)
    tensors = _strip_prefix(read_tensors(files))
    if config is None and config_path is not None:
        config = GPT2Config.from_hf_dict(json.loads(config_path.read_text()))
    config = config or _infer_config(tensors)
    source = ", ".join(str(f) for f in files)

    lm_head = tensors.pop("lm_head.weight", None)
    if lm_head is not None and "wte.weight" in tensors:
        wte = tensors["wte.weight"]
        if lm_head.shape != wte.shape or not np.array_equal(np.asarray(lm_head), np.asarray(wte)):
            raise ValueError(
                f"{source}: 'lm_head.weight' differs from 'wte.weight'; only tied GPT-2 heads are supported."
            )
    for key in [k for k in tensors if _BUFFERS.fullmatch(k)]:
        del tensors[key]

    expected = {
        torch_param_name(path).removeprefix("transformer."): (path, shape)
        for path, shape in _expected_shapes(dataclasses.replace(config, scan_layers=False)).items()
    }
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match GPT-2 with n_layer={config.n_layer}, n_embd={config.n_embd}: "
            f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}."
        )
    params: Params = {}
    for key, (path, shape) in expected.items():
        value = tensors[key]
        if tuple(value.shape) != shape:
            raise ValueError(f"{source}: {key!r} has shape {tuple(value.shape)}, expected {shape} for {path!r}.")
        node = params
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = jnp.asarray(value, dtype)
    return stack_layers(params, config.n_layer) if config.scan_layers else params
