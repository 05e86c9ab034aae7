"""Reading and writing safetensors files (PEFT adapters, Hugging Face checkpoints) as numpy/jax arrays."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def read_tensors(files: Iterable[Path], remedy: str = "download or export it again") -> dict[str, Any]:
    """Every tensor of the safetensors `files` by key, as jax arrays (bf16 stays bf16, no float32 detour).

    Raises ValueError naming the file that cannot be read, and `remedy`, the fix to offer.
    """
    from safetensors import safe_open

    tensors: dict[str, Any] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="flax") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                    tensors[key] = handle.get_tensor(key)
        except Exception as err:
            raise ValueError(
                f"cannot read {file} as a safetensors file ({type(err).__name__}: {err}); "
                f"it is truncated or corrupted: {remedy}"
            ) from err
    return tensors


def write_tensors(file: Path, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes `tensors` to a safetensors `file` with PyTorch's metadata, so that torch tools read it."""
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(file), metadata={"format": "pt"})
