"""Hugging Face safetensors checkpoints (single file or sharded) read straight into our layouts, and written back.

Tensors are read as numpy in the checkpoint's dtype (bfloat16 through ``ml_dtypes``), transposed and written
into one preallocated buffer per parameter in the model's dtype, stacked for the scanned layout: a bfloat16
checkpoint loaded as bfloat16 never passes through float32, and the host holds one buffer plus one tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora._src.paths import leaves_with_paths
from jaxlora.models.llama.config import LlamaConfig
from jaxlora.models.llama.layout import unstack_layers
from jaxlora.models.llama.model import Llama
from jaxlora.models.llama.names import hf_param_name

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints carry
_HINT = (
    "Pass a local directory holding config.json and model.safetensors (or model.safetensors.index.json with its "
    "shards), or a Hugging Face repo id on a machine that is online (or has it in the hub cache)."
)


def _looks_local(name: str) -> bool:
    """Whether `name` is meant as a local path rather than a hub id such as "Qwen/Qwen2.5-0.5B"."""
    return not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) or name.endswith((".safetensors", ".json"))


def resolve(path_or_repo: str | os.PathLike) -> Path:
    """The local directory of a checkpoint: `path_or_repo` itself, or a hub snapshot downloaded with huggingface_hub.

    Raises:
        FileNotFoundError: a local path that does not exist, or a repo id that cannot be fetched (offline).
    """
    path = Path(path_or_repo).expanduser()
    if path.is_file():
        return path.parent
    if path.is_dir():
        return path
    name = str(path_or_repo)
    if _looks_local(name):
        raise FileNotFoundError(f"no checkpoint at {name!r}. {_HINT}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as err:  # offline, unknown repo, gated repo: the user's next step is the same
        raise FileNotFoundError(
            f"could not get {name!r} from the Hugging Face Hub or its local cache ({type(err).__name__}: {err}). "
            f"If this machine is offline, download the repo elsewhere and pass its local directory. {_HINT}"
        ) from err


def config_from_hf(path_or_repo: str | os.PathLike) -> LlamaConfig:
    """The :class:`LlamaConfig` of the ``config.json`` in a checkpoint directory or hub repo.

    Raises:
        FileNotFoundError: there is no config.json. ValueError: the model type or a feature is not supported.

    Example:
        >>> config_from_hf("Qwen/Qwen2.5-0.5B").num_key_value_heads  # doctest: +SKIP
        2
    """
    directory = resolve(path_or_repo)
    file = directory / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in {directory}. {_HINT}")
    return LlamaConfig.from_hf_dict(json.loads(file.read_text()))


def _weight_files(directory: Path) -> list[Path]:
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise ValueError(f"{index} is not a safetensors index (no 'weight_map'): {err}") from None
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not in {directory}: {missing[:4]}")
        return [directory / shard for shard in shards]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}. {_HINT}")


@contextlib.contextmanager
def _open_tensors(files: list[Path]) -> Iterator[dict[str, Any]]:
    """``{key: safe_open handle}`` over every shard, open for the duration of the block (tensors read lazily)."""
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        handles: dict[str, Any] = {}
        for file in files:
            try:
                handle = stack.enter_context(safe_open(str(file), framework="numpy"))
            except Exception as err:
                raise ValueError(f"could not read {file} as a safetensors file: {err}") from err
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if not key.endswith(_IGNORED_SUFFIXES):
                    handles[key] = handle
        yield handles


def _torch_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[::-1] if path.endswith("/kernel") else shape


def _read(handles: Mapping[str, Any], path: str, shape: tuple[int, ...], source: str) -> np.ndarray:
    """One of our leaves from the checkpoint (kernels transposed from torch's (out, in)), shape-checked."""
    key = hf_param_name(path)
    value = handles[key].get_tensor(key)
    if tuple(value.shape) != _torch_shape(path, shape):
        raise ValueError(
            f"{source}: {key!r} has shape {tuple(value.shape)}, expected {_torch_shape(path, shape)} for our "
            f"{path!r}; the checkpoint does not belong to this config.json"
        )
    return value.T if path.endswith("/kernel") else value


def _unrolled_paths(path: str, scanned: bool, depth: int) -> list[str]:
    """Our unrolled path(s) of one leaf: a stacked ``layers/<leaf>`` stands for ``layers/{i}/<leaf>`` of each layer."""
    if scanned and path.startswith("layers/"):
        return [f"layers/{i}/{path.removeprefix('layers/')}" for i in range(depth)]
    return [path]


def _check_keys(handles: Mapping[str, Any], expected: set[str], config: LlamaConfig, source: str) -> None:
    present = set(handles)
    if config.tie_word_embeddings and "lm_head.weight" in present:
        head, table = (handles[k].get_tensor(k) for k in ("lm_head.weight", "model.embed_tokens.weight"))
        if head.shape != table.shape or not np.array_equal(head, table):
            raise ValueError(f"{source}: lm_head.weight differs from the embedding, but config.json ties them.")
        present.discard("lm_head.weight")
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match a {config.model_type} model with {config.num_hidden_layers} layers "
            f"(tie_word_embeddings={config.tie_word_embeddings}): missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}."
        )


def load_hf_weights(
    path_or_repo: str | os.PathLike,
    *,
    config: LlamaConfig | None = None,
    scan_layers: bool = True,
    dtype: Any = None,
) -> Llama:
    """A :class:`Llama` holding the weights of a Hugging Face ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` checkpoint.

    Args:
        path_or_repo: a directory with ``config.json`` and ``model.safetensors`` or a sharded
            ``model.safetensors.index.json``, one such file, or a hub repo id (downloaded when online).
        config: overrides the ``config.json``.
        scan_layers: the scanned layout (stacked layers, default) or the unrolled one.
        dtype: weight dtype; None keeps the checkpoint's (a bfloat16 checkpoint gives a bfloat16 model).

    Returns:
        The model, in the requested layout and dtype.

    Raises:
        FileNotFoundError: no checkpoint there (or offline). ValueError: unreadable files, missing, unexpected or
        mis-shaped tensors.

    Example:
        >>> model = load_hf_weights("Qwen/Qwen2.5-0.5B", dtype=jnp.bfloat16)  # doctest: +SKIP
    """
    directory = resolve(path_or_repo)
    config = config or config_from_hf(directory)
    files = _weight_files(directory)
    source = str(files[0] if len(files) == 1 else directory / "model.safetensors.index.json")
    with _open_tensors(files) as handles:
        if "model.embed_tokens.weight" not in handles:
            raise ValueError(f"{source} is no Llama-family checkpoint: it has no 'model.embed_tokens.weight'.")
        if dtype is None:
            dtype = handles["model.embed_tokens.weight"].get_tensor("model.embed_tokens.weight").dtype
        abstract = nnx.eval_shape(lambda: Llama(config, scan_layers=scan_layers, dtype=dtype, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        shapes = {path: tuple(leaf.shape) for path, leaf in leaves_with_paths(state)}
        depth = config.num_hidden_layers
        per_path = {path: _unrolled_paths(path, scan_layers, depth) for path in shapes}
        _check_keys(handles, {hf_param_name(p) for paths in per_path.values() for p in paths}, config, source)
        values = {}
        for path, shape in shapes.items():
            buffer = np.empty(shape, jnp.dtype(dtype))
            if scan_layers and path.startswith("layers/"):
                for i, layer_path in enumerate(per_path[path]):
                    buffer[i] = _read(handles, layer_path, shape[1:], source)
            else:
                buffer[...] = _read(handles, path, shape, source)
            values[path] = jnp.asarray(buffer)
    nnx.replace_by_pure_dict(state, _nest(values))
    return nnx.merge(graphdef, state)


def _nest(flat: Mapping[str, Any]) -> dict:
    nested: dict = {}
    for path, value in flat.items():
        node = nested
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(int(name) if name.isdigit() else name, {})
        node[leaf] = value
    return nested


def save_hf_weights(model: Llama, directory: str | os.PathLike) -> Path:
    """Writes `model` as a Hugging Face checkpoint (``config.json`` + ``model.safetensors``, weights in its dtype).

    ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` loads it, e.g. as the base for a PEFT
    adapter trained here.

    Returns:
        The directory.

    Example:
        >>> save_hf_weights(model, "runs/base")  # doctest: +SKIP
    """
    from safetensors.numpy import save_file

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    if model.scan_layers:
        params = unstack_layers(params)
    tensors = {}
    for path, value in leaves_with_paths(params):
        value = np.asarray(value)
        tensors[hf_param_name(path)] = np.ascontiguousarray(value.T if path.endswith("/kernel") else value)
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    hf = {**model.config.to_hf_dict(), "torch_dtype": str(np.dtype(model.dtype)), "dtype": str(np.dtype(model.dtype))}
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return directory
