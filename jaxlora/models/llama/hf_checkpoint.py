"""Hugging Face safetensors checkpoints (single file or sharded) read straight into our layouts, and written back.

Tensors are read as numpy in the checkpoint's dtype (bfloat16 through ``ml_dtypes``), transposed and written
into one preallocated buffer per parameter in the model's dtype, stacked for the scanned layout: a bfloat16
checkpoint loaded as bfloat16 never passes through float32, and the host holds one buffer plus one tensor.
With ``quantize=``, the kernels a QLoRA plan quantizes are read a slice of rows at a time and quantized into
preallocated codes and scales (``streamed_quantization``), so the float model never exists. Each shard is opened
for each read and closed after it, so that the pages read do not stay resident.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora._src import quantization
from jaxlora._src.config import LoraConfig
from jaxlora._src.paths import leaves_with_paths
from jaxlora._src.planning import Plan
from jaxlora._src.quantization import DEFAULT_BLOCK_SIZE, Kind
from jaxlora._src.streamed_quantization import quantize_as_read
from jaxlora.models.llama.config import LlamaConfig
from jaxlora.models.llama.layout import unstack_layers
from jaxlora.models.llama.model import Llama
from jaxlora.models.llama.names import hf_param_name

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some older checkpoints carry
_MAX_HEADER = 100_000_000  # safetensors refuses longer headers
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
            raise FileNotFoundError(
                f"{index} names shards that are not in {directory}: {missing[:4]}; download them again (an "
                "interrupted download leaves some out) or pass the directory that holds every shard"
            )
        return [directory / shard for shard in shards]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}. {_HINT}")


@dataclasses.dataclass(frozen=True)
class _Shard:
    """One safetensors file, opened for each read and closed after it.

    ``safe_open`` maps the whole file: held open through the load, every page read would stay resident in the
    process (the whole checkpoint, by the end); closed after each read, only the values copied out remain.
    """

    file: Path

    def read(self, key: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        """Tensor `key` (the part `index` selects), copied out of the file."""
        with _safe_open(self.file) as handle:
            return handle.get_slice(key)[index] if index else handle.get_tensor(key)

    def shape(self, key: str) -> tuple[int, ...]:
        with _safe_open(self.file) as handle:
            return tuple(handle.get_slice(key).get_shape())


def _safe_open(file: Path) -> Any:
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="numpy")
    except Exception as err:
        raise ValueError(_cut_short(file) or f"could not read {file} as a safetensors file: {err}") from err


def _open_tensors(files: list[Path]) -> dict[str, _Shard]:
    """``{key: shard}`` over every shard (each file checked readable; tensors read lazily)."""
    shards: dict[str, _Shard] = {}
    for file in files:
        with _safe_open(file) as handle:
            keys = handle.keys()
        shards.update({key: _Shard(file) for key in keys if not key.endswith(_IGNORED_SUFFIXES)})
    return shards


def _cut_short(file: Path) -> str | None:
    """Why `file` is a truncated safetensors file (naming the first tensor it cuts), or None if it is not one."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        text = f.read(min(length, _MAX_HEADER))
    if size < 8 or length > _MAX_HEADER or not text.startswith(b"{"):
        return None  # not a safetensors file at all
    fix = "the file is truncated (an interrupted download or copy): download or copy it again"
    if 8 + length > size:
        return f"{file} is cut short inside its header ({size} bytes); {fix}"
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    ends = sorted((v["data_offsets"][1], k) for k, v in header.items() if isinstance(v, dict) and "data_offsets" in v)
    cut = [key for end, key in ends if 8 + length + end > size]
    if not cut:
        return None
    return (
        f"{file} is cut short: it has {size} bytes, but its header places tensor {cut[0]!r} up to byte "
        f"{8 + length + header[cut[0]]['data_offsets'][1]} ({len(cut)} tensor(s) lie past the end); {fix}"
    )


def _torch_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[::-1] if path.endswith("/kernel") else shape


def _read(handles: Mapping[str, Any], path: str, shape: tuple[int, ...], source: str) -> np.ndarray:
    """One of our leaves from the checkpoint (kernels transposed from torch's (out, in)), shape-checked."""
    key = hf_param_name(path)
    value = handles[key].read(key)
    _check_shape(key, tuple(value.shape), path, shape, source)
    return value.T if path.endswith("/kernel") else value


def _check_shape(key: str, found: tuple[int, ...], path: str, shape: tuple[int, ...], source: str) -> None:
    if found != _torch_shape(path, shape):
        raise ValueError(
            f"{source}: {key!r} has shape {found}, expected {_torch_shape(path, shape)} for our "
            f"{path!r}; the checkpoint does not belong to this config.json"
        )


def _unrolled_paths(path: str, scanned: bool, depth: int) -> list[str]:
    """Our unrolled path(s) of one leaf: a stacked ``layers/<leaf>`` stands for ``layers/{i}/<leaf>`` of each layer."""
    if scanned and path.startswith("layers/"):
        return [f"layers/{i}/{path.removeprefix('layers/')}" for i in range(depth)]
    return [path]


def _check_keys(handles: Mapping[str, Any], expected: set[str], config: LlamaConfig, source: str) -> None:
    present = set(handles)
    if config.tie_word_embeddings and "lm_head.weight" in present:
        head, table = (handles[k].read(k) for k in ("lm_head.weight", "model.embed_tokens.weight"))
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
    quantize: Kind | None = None,
    plan: Plan | LoraConfig | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    frozen_dense: bool = False,
    embeddings: bool = False,
    remat: Any = None,
) -> Llama:
    """A :class:`Llama` holding the weights of a Hugging Face ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` checkpoint.

    With `quantize`, the kernels that ``jaxlora.quantization.quantize(params, plan, ...)`` would quantize are
    quantized as they are read, one slice of output rows at a time (layer by layer for the scanned layout), so
    that the float model never exists in memory: a QLoRA base for a model whose float weights do not fit.

    Args:
        path_or_repo: a directory with ``config.json`` and ``model.safetensors`` or a sharded
            ``model.safetensors.index.json``, one such file, or a hub repo id (downloaded when online).
        config: overrides the ``config.json``.
        scan_layers: the scanned layout (stacked layers, default) or the unrolled one.
        dtype: weight dtype; None keeps the checkpoint's (a bfloat16 checkpoint gives a bfloat16 model).
        quantize: None (float weights), "nf4" or "int8": as ``quantization.quantize``'s `kind`.
        plan: with `quantize`, the ``jaxlora.Plan`` or ``LoraConfig`` whose adapted kernels are quantized
            (for the scanned layout, a config with ``stacked_axes=llama.STACKED_AXES``).
        block_size, frozen_dense, embeddings: as for ``quantization.quantize``.
        remat: the model's rematerialisation policy (see :class:`Llama`), None for none.

    Returns:
        The model, in the requested layout and dtype; with `quantize`, its chosen kernels are ``qwix.QArray``
        equal bit for bit to ``quantization.quantize(nnx.state(float_model, nnx.Param), plan, ...)``.

    Raises:
        FileNotFoundError: no checkpoint there (or offline), or a shard of the index is missing. ValueError:
        unreadable or truncated files, missing, unexpected or mis-shaped tensors, what ``quantize`` refuses.

    Example:
        >>> model = load_hf_weights("Qwen/Qwen2.5-0.5B", dtype=jnp.bfloat16)  # doctest: +SKIP
        >>> import jaxlora
        >>> from jaxlora.models import llama
        >>> lora = jaxlora.LoraConfig(rank=16, targets=(llama.PEFT_TARGETS_SCANNED,), stacked_axes=llama.STACKED_AXES)
        >>> qlora_base = load_hf_weights("meta-llama/Llama-3.1-8B", quantize="nf4", plan=lora)  # doctest: +SKIP
    """
    _check_quantize_args(quantize, plan)
    directory = resolve(path_or_repo)
    config = config or config_from_hf(directory)
    files = _weight_files(directory)
    source = str(files[0] if len(files) == 1 else directory / "model.safetensors.index.json")
    handles = _open_tensors(files)
    if "model.embed_tokens.weight" not in handles:
        raise ValueError(f"{source} is no Llama-family checkpoint: it has no 'model.embed_tokens.weight'.")
    dtype = jnp.dtype(_checkpoint_dtype(handles) if dtype is None else dtype)
    abstract = nnx.eval_shape(
        lambda: Llama(config, scan_layers=scan_layers, dtype=dtype, remat=remat, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(abstract)
    shapes = {path: tuple(leaf.shape) for path, leaf in leaves_with_paths(state)}
    per_path = {path: _unrolled_paths(path, scan_layers, config.num_hidden_layers) for path in shapes}
    _check_keys(handles, {hf_param_name(p) for paths in per_path.values() for p in paths}, config, source)
    chosen = {}
    if quantize is not None:
        chosen = quantization.chosen_leaves(state, plan, frozen_dense=frozen_dense, embeddings=embeddings)
        chosen = {path: (quantize, block_size, *where) for path, where in chosen.items()}
        for path, how in chosen.items():
            quantization.check_quantizable(shapes[path], *how[:2], path, *how[2:])
    values = {}
    for path, shape in shapes.items():
        values[path] = _load_leaf(handles, path, per_path[path], shape, dtype, scan_layers, chosen.get(path), source)
    nnx.replace_by_pure_dict(state, _nest(values))
    return nnx.merge(graphdef, state)


def _load_leaf(
    handles: Mapping[str, Any],
    path: str,
    paths: list[str],
    shape: tuple[int, ...],
    dtype: Any,
    scanned: bool,
    quantized: tuple[Kind, int, int, int] | None,
    source: str,
) -> Any:
    """Our leaf `path` (read from the checkpoint keys of `paths`), quantized as read when `quantized` gives
    (kind, block_size, axis, stacked)."""
    if quantized is None:
        return jnp.asarray(_read_whole(handles, paths, shape, dtype, scanned, source))
    kind, block_size, axis, stacked = quantized
    read = _slice_reader(handles, paths, shape[stacked:], 1 - axis, dtype, source)
    return quantize_as_read(read, shape, kind, block_size, path, axis, stacked)


def _check_quantize_args(quantize: Any, plan: Any) -> None:
    if quantize is None and plan is not None:
        raise ValueError("load_hf_weights got plan= without quantize=: pass quantize='nf4' (or 'int8'), or drop plan")
    if quantize is not None and quantize not in quantization.KINDS:
        raise ValueError(f"load_hf_weights(quantize={quantize!r}): pass one of {quantization.KINDS}, or None")
    if quantize is not None and plan is None:
        raise ValueError(
            f"load_hf_weights(quantize={quantize!r}) needs plan=, the jaxlora.Plan or LoraConfig whose adapted "
            "kernels to quantize, e.g. LoraConfig(rank=16, targets=(llama.PEFT_TARGETS_SCANNED,), "
            "stacked_axes=llama.STACKED_AXES) for the scanned layout"
        )


def _checkpoint_dtype(handles: Mapping[str, Any]) -> np.dtype:
    """The embedding's dtype in the checkpoint, read from one row (not the whole table)."""
    return handles["model.embed_tokens.weight"].read("model.embed_tokens.weight", (slice(0, 1),)).dtype


def _read_whole(
    handles: Mapping[str, Any], paths: list[str], shape: tuple[int, ...], dtype: Any, scanned: bool, source: str
) -> np.ndarray:
    """One leaf in float, into one buffer (the layers stacked for a scanned ``layers/`` leaf)."""
    buffer = np.empty(shape, dtype)
    if scanned and paths[0].startswith("layers/"):
        for i, layer_path in enumerate(paths):
            buffer[i] = _read(handles, layer_path, shape[1:], source)
    else:
        buffer[...] = _read(handles, paths[0], shape, source)
    return buffer


def _slice_reader(
    handles: Mapping[str, Any], paths: list[str], shape: tuple[int, ...], keep: int, dtype: Any, source: str
) -> Callable[[tuple[int, ...], int, int], np.ndarray]:
    """Reads indices start:stop along `keep` of one layer's 2-D leaf of `shape`, in `dtype` (see quantize_as_read)."""

    def read(layer: tuple[int, ...], start: int, stop: int) -> np.ndarray:
        path = paths[layer[0] if layer else 0]
        key = hf_param_name(path)
        if start == 0:
            _check_shape(key, handles[key].shape(key), path, shape, source)
        kernel = path.endswith("/kernel")
        rows = slice(start, stop)
        part = handles[key].read(key, (rows,) if (1 - keep if kernel else keep) == 0 else (slice(None), rows))
        return np.asarray(part.T if kernel else part, dtype)

    return read


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
