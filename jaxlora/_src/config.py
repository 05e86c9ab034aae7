"""The LoRA configuration: a frozen, JSON-serialisable description of what to adapt and how."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

from jaxlora._src.immutable import FrozenMapping

# Every leaf named `kernel` (Dense, DenseGeneral, Einsum, Conv kernels), at any depth.
ALL_KERNELS = r"(.*/)?kernel"
# Every leaf named `embedding` (flax Embed tables).
ALL_EMBEDDINGS = r"(.*/)?embedding"

InitKind = Literal["kaiming", "gaussian", "pissa", "olora", "loftq", "eva"]
_INITS = ("kaiming", "gaussian", "pissa", "olora", "loftq", "eva")


def _as_tuple(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _check_regexes(field: str, patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"LoraConfig.{field}: {pattern!r} is not a valid regular expression ({err})") from None


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What to adapt (regexes over "/"-joined param paths, fully matched) and how.

    Immutable and hashable, so it can be a static argument of `jax.jit`. `rank_pattern`, `alpha_pattern` and
    `fan_in_ndim` map a regex to a per-path value (given as dicts, held as read-only `FrozenMapping`s); the
    first matching pattern wins. `predicate(path, leaf)` further filters the targets; it takes part in `==`
    and hashing by identity, and is not serialised.

    Args:
      rank: the adapters' rank r.
      alpha: the scale numerator: s = alpha / r (alpha / sqrt(r) with `use_rslora`).
      targets: regexes of the leaves that get adapters (default: every `kernel`).
      exclude: regexes removed from `targets`.
      init: "kaiming" (PEFT's default), "gaussian" (the paper's, `init_std`), "pissa" (top-r SVD of W), "olora"
        (QR of W), "loftq" (alternating NF4 quantization and SVD of the error: returns the quantized base) or "eva"
        (SVD of the layers' inputs over data: `jaxlora.init_eva`). pissa/olora/loftq return a changed base.
      init_std: the Gaussian's standard deviation (default 1/r).
      use_rslora: scale by alpha / sqrt(r).
      rank_pattern: regex -> rank for some leaves.
      alpha_pattern: regex -> alpha for some leaves.
      dropout: LoRA dropout on the adapter's input (active when a `lora_dropout` rng is given).
      modules_to_save: regexes of leaves trained in full (e.g. a new head).
      fan_in_ndim: regex -> how many kernel axes (after any stack axes) are inputs (default: all but the last).
      in_axes: regex -> which axes of one layer's kernel contract with x, for kernels whose inputs are not their
        leading axes (e.g. `(1,)` for a (heads, features, head_dim) kernel); `plan(..., model=...)` reads them from
        the operations and spells them out here. A is then (*stack, *W[in_axes], r), B (*stack, r, *W[other axes]).
      stacked_axes: regex -> how many leading axes of the kernel stack layers (e.g. 1 for a kernel (L, in, out)
        made by `nn.scan` / `nnx.scan` / `nnx.vmap`); each stacked layer gets its own adapter, A (L, in, r) and
        B (L, r, out).
      layers_to_transform: regex -> the indices of the stacked layers to adapt (PEFT's `layers_to_transform`),
        counted over the flattened stack axes; the other layers keep B = 0 and receive no update.
      predicate: an extra filter `predicate(path, leaf) -> bool` over the targets.
      use_dora: DoRA (weight-decomposed LoRA): W' = m ⊙ (W + s·A B) / ‖W + s·A B‖ per output column, with a
        trainable magnitude m (initialised to ‖W‖) stored as a third adapter entry "magnitude".
      loftq_iter: LoftQ's alternating steps (PEFT's `loftq_config["loftq_iter"]`, default 1).
      loftq_bits: LoftQ's code width; 4 (NF4, jaxlora.quantization's format) is the only one.
      loftq_block_size: LoftQ's NF4 block length along the input features (QLoRA's 64, as `quantize`).
      eva_rho: EVA's rho >= 1 (PEFT's `EvaConfig.rho`): a layer may get up to round(rho x its rank) directions.

    Example:
      >>> import jaxlora
      >>> config = jaxlora.LoraConfig(rank=4, alpha=8.0, targets=(".*/kernel",), rank_pattern={"head/kernel": 2})
      >>> hash(config) == hash(jaxlora.LoraConfig.from_json(config.to_json()))
      True
    """

    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = (ALL_KERNELS,)
    exclude: tuple[str, ...] = ()
    init: InitKind = "kaiming"
    init_std: float | None = None
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = FrozenMapping()
    alpha_pattern: Mapping[str, float] = FrozenMapping()
    dropout: float = 0.0
    modules_to_save: tuple[str, ...] = ()
    fan_in_ndim: Mapping[str, int] = FrozenMapping()
    in_axes: Mapping[str, tuple[int, ...]] = FrozenMapping()
    stacked_axes: Mapping[str, int] = FrozenMapping()
    layers_to_transform: Mapping[str, tuple[int, ...]] = FrozenMapping()
    predicate: Callable[[str, Any], bool] | None = None
    use_dora: bool = False
    loftq_iter: int = 1
    loftq_bits: int = 4
    loftq_block_size: int = 64
    eva_rho: float = 2.0

    def __post_init__(self) -> None:
        _check_field_types(self)
        for field in ("targets", "exclude", "modules_to_save"):
            object.__setattr__(self, field, _as_tuple(getattr(self, field)))
        for field in ("rank_pattern", "alpha_pattern", "fan_in_ndim", "stacked_axes", "layers_to_transform"):
            object.__setattr__(self, field, FrozenMapping(getattr(self, field)))
        object.__setattr__(self, "in_axes", FrozenMapping(_checked_in_axes(self.in_axes)))
        if not self.targets and self.predicate is None:
            raise ValueError("LoraConfig.targets is empty: give at least one regex, e.g. jaxlora.ALL_KERNELS")
        for field in ("targets", "exclude", "modules_to_save"):
            _check_regexes(field, getattr(self, field))
        for field in ("rank_pattern", "alpha_pattern", "fan_in_ndim", "in_axes", "stacked_axes", "layers_to_transform"):
            _check_regexes(field, tuple(getattr(self, field)))
        _check_rank("rank", self.rank)
        _check_alpha("alpha", self.alpha)
        for pattern, rank in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{pattern!r}]", rank)
        for pattern, alpha in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{pattern!r}]", alpha)
        for pattern, ndim in self.fan_in_ndim.items():
            if isinstance(ndim, bool) or not isinstance(ndim, int) or ndim < 1:
                raise ValueError(f"LoraConfig.fan_in_ndim[{pattern!r}] must be an int >= 1, got {ndim!r}")
        for pattern, ndim in self.stacked_axes.items():
            if isinstance(ndim, bool) or not isinstance(ndim, int) or ndim < 0:
                raise ValueError(f"LoraConfig.stacked_axes[{pattern!r}] must be an int >= 0, got {ndim!r}")
        layers = {}
        for pattern, indices in self.layers_to_transform.items():
            indices = (indices,) if isinstance(indices, int) else indices
            if not isinstance(indices, list | tuple) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices
            ):
                raise ValueError(
                    f"LoraConfig.layers_to_transform[{pattern!r}] must be layer indices (ints >= 0), got {indices!r}"
                )
            layers[pattern] = tuple(sorted(set(indices)))
        object.__setattr__(self, "layers_to_transform", FrozenMapping(layers))
        if self.init not in _INITS:
            raise ValueError(f"LoraConfig.init must be one of {_INITS}, got {self.init!r}")
        if self.init_std is not None and not self.init_std > 0:
            raise ValueError(f"LoraConfig.init_std must be > 0 (or None for 1/rank), got {self.init_std!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoraConfig.use_dora must be True or False, got {self.use_dora!r}")
        if isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, int) or self.loftq_iter < 1:
            raise ValueError(f"LoraConfig.loftq_iter must be an int >= 1, got {self.loftq_iter!r}")
        if self.loftq_bits != 4 or isinstance(self.loftq_bits, bool):
            raise ValueError(
                f"LoraConfig.loftq_bits must be 4 (LoftQ quantizes to jaxlora.quantization's NF4), "
                f"got {self.loftq_bits!r}"
            )
        if (
            isinstance(self.loftq_block_size, bool)
            or not isinstance(self.loftq_block_size, int)
            or (self.loftq_block_size < 1)
        ):
            raise ValueError(f"LoraConfig.loftq_block_size must be a positive int, got {self.loftq_block_size!r}")
        if not _is_number(self.eva_rho) or not self.eva_rho >= 1.0:
            raise ValueError(f"LoraConfig.eva_rho must be a number >= 1 (PEFT's EvaConfig.rho), got {self.eva_rho!r}")

    def rank_for(self, path: str) -> int:
        """The rank of the adapter at `path`: the first matching `rank_pattern`, else `rank`."""
        return _first_match(self.rank_pattern, path, self.rank)

    def alpha_for(self, path: str) -> float:
        """The alpha of the adapter at `path`: the first matching `alpha_pattern`, else `alpha`."""
        return _first_match(self.alpha_pattern, path, self.alpha)

    def stacked_axes_for(self, path: str) -> int:
        """How many leading axes of the kernel at `path` stack layers (0: not stacked)."""
        return _first_match(self.stacked_axes, path, 0)

    def scale_for(self, path: str) -> float:
        """The factor s in `W + s·A B`: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        rank = self.rank_for(path)
        return self.alpha_for(path) / (math.sqrt(rank) if self.use_rslora else rank)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; the predicate, a Python callable, cannot be saved and is refused."""
        if self.predicate is not None:
            raise ValueError(
                "LoraConfig.predicate is a Python callable and cannot be serialised; "
                "express the selection with `targets`/`exclude` regexes to save this config"
            )
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "predicate"}
        for field in ("targets", "exclude", "modules_to_save"):
            out[field] = list(out[field])
        for field in ("rank_pattern", "alpha_pattern", "fan_in_ndim", "stacked_axes"):
            out[field] = dict(out[field])
        out["layers_to_transform"] = {k: list(v) for k, v in self.layers_to_transform.items()}
        out["in_axes"] = {k: list(v) for k, v in self.in_axes.items()}
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        """Inverse of `to_dict`; keys written by a newer jaxlora are ignored with a warning.

        Raises:
          ValueError: if `data` is not a mapping, or a field has the wrong type or value (naming the field).
        """
        if not isinstance(data, Mapping):
            raise ValueError(
                f"LoraConfig.from_dict expects a mapping of field names to values (a JSON object), "
                f"got {type(data).__name__}: {data!r:.80}"
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"predicate"}
        unknown = sorted(set(data) - known)
        if unknown and set(unknown) & {"r", "lora_alpha", "target_modules", "peft_type"}:
            raise ValueError(
                f"LoraConfig.from_dict: keys {unknown} are PEFT's adapter_config.json names, not a jaxlora config: "
                "read a PEFT adapter with jaxlora.peft_format.load_peft(directory, params, name_map=...)"
            )
        if unknown:
            warnings.warn(f"LoraConfig: ignoring unknown keys {unknown} (written by a newer jaxlora?)", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self) -> str:
        """The config as JSON text (see `to_dict`)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LoraConfig:
        """Inverse of `to_json`.

        Raises:
          ValueError: if `text` is not JSON, not a JSON object, or a field has the wrong type or value.
        """
        return cls.from_dict(json.loads(text))


# Hugging Face PEFT's LoraConfig names that jaxlora spells otherwise (or does not have): keyword -> the fix.
_PEFT_NAMES = {
    "r": "PEFT's r is jaxlora's rank: LoraConfig(rank=...)",
    "lora_alpha": "PEFT's lora_alpha is jaxlora's alpha: LoraConfig(alpha=...)",
    "target_modules": (
        "PEFT's target_modules is jaxlora's targets: LoraConfig(targets=...), regexes fully matched against "
        "'/'-joined parameter paths, e.g. targets=(r'.*/(query|value)/kernel',)"
    ),
    "lora_dropout": "PEFT's lora_dropout is jaxlora's dropout: LoraConfig(dropout=...)",
    "exclude_modules": "PEFT's exclude_modules is jaxlora's exclude: LoraConfig(exclude=...), regexes over paths",
    "init_lora_weights": f"PEFT's init_lora_weights is jaxlora's init: LoraConfig(init=...), one of {_INITS}",
    "bias": (
        "jaxlora adds no bias adapters (PEFT's bias='none'); to train biases in full, "
        "LoraConfig(modules_to_save=(r'.*/bias',))"
    ),
    "task_type": "a PEFT task type belongs to the file: jaxlora.peft_format.save_peft(..., task_type=...)",
    "fan_in_fan_out": (
        "flax kernels are (in, out) already; how torch stores a weight is the name map's business "
        "(jaxlora.name_maps), and LoraConfig(fan_in_ndim=...) sets how many kernel axes are inputs"
    ),
    "layers_pattern": (
        "jaxlora selects layers by regex: LoraConfig(layers_to_transform={regex: (indices...)}) for layers stacked "
        "by a scan (with stacked_axes={regex: 1}); unrolled layers are chosen by the regexes in targets"
    ),
    "inference_mode": "a config has no inference mode: adapters train only when the optimizer updates them",
}


def _fields_hint(name: str, fields: list[str]) -> str:
    """The fix for an unknown LoraConfig keyword: PEFT's name mapped, else the closest field, else the fields."""
    if name in _PEFT_NAMES:
        return _PEFT_NAMES[name]
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]}=...?"
    return f"LoraConfig's fields are {', '.join(fields)}"


def _check_keywords(init):
    """Wraps LoraConfig.__init__ so that an unknown keyword names itself and its fix, not the bare TypeError."""

    @functools.wraps(init)
    def checked_init(self, *args, **kwargs):
        fields = [f.name for f in dataclasses.fields(type(self))]
        unknown = [name for name in kwargs if name not in fields]
        if unknown:
            fixes = "; ".join(f"{name!r}: {_fields_hint(name, fields)}" for name in unknown)
            raise TypeError(f"LoraConfig got unknown keyword{'s' if len(unknown) > 1 else ''} {fixes}")
        init(self, *args, **kwargs)

    return checked_init


LoraConfig.__init__ = _check_keywords(LoraConfig.__init__)


def _first_match(patterns: Mapping[str, Any], path: str, default: Any) -> Any:
    for pattern, value in patterns.items():
        if re.fullmatch(pattern, path):
            return value
    return default


def _checked_in_axes(patterns: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """`in_axes` with each value as a sorted tuple of distinct axis indices, or ValueError naming the pattern."""
    out = {}
    for pattern, axes in patterns.items():
        axes = (axes,) if isinstance(axes, int) and not isinstance(axes, bool) else axes
        if (
            not isinstance(axes, list | tuple)
            or not axes
            or not all(isinstance(a, int) and not isinstance(a, bool) and a >= 0 for a in axes)
            or len(set(axes)) != len(axes)
        ):
            raise ValueError(
                f"LoraConfig.in_axes[{pattern!r}] must be distinct axis indices (ints >= 0) of one layer's kernel, "
                f"e.g. (1,) or [0, 2]; got {axes!r}"
            )
        out[pattern] = tuple(sorted(axes))
    return out


def _check_rank(name: str, rank: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"LoraConfig.{name} must be a positive int, got {rank!r}")


def _check_alpha(name: str, alpha: Any) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"LoraConfig.{name} must be a finite number > 0, got {alpha!r}")


# The JSON-level type each serialisable field must have (checked before any conversion, so that bad input
# from a file gets a ValueError naming the field instead of a TypeError from deep inside).
_REGEX_LISTS = ("targets", "exclude", "modules_to_save")
_MAPPINGS = ("rank_pattern", "alpha_pattern", "fan_in_ndim", "in_axes")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_field_types(config: LoraConfig) -> None:
    """Raises ValueError naming the first field whose value has the wrong type, and the type expected."""

    def refuse(field: str, expected: str, value: Any) -> None:
        raise ValueError(f"LoraConfig.{field} must be {expected}, got {type(value).__name__} {value!r:.80}")

    for field in _REGEX_LISTS:
        value = getattr(config, field)
        if isinstance(value, str):
            continue
        if not isinstance(value, list | tuple) or not all(isinstance(p, str) for p in value):
            refuse(field, "a regex string or a list of regex strings", value)
    for field in _MAPPINGS:
        value = getattr(config, field)
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            refuse(field, "a mapping (JSON object) from regex strings to values", value)
    if not isinstance(config.use_rslora, bool):
        refuse("use_rslora", "a bool (true or false)", config.use_rslora)
    if not _is_number(config.dropout):
        refuse("dropout", "a number in [0, 1)", config.dropout)
    if config.init_std is not None and not _is_number(config.init_std):
        refuse("init_std", "a number > 0 or None", config.init_std)
    if not isinstance(config.init, str):
        refuse("init", f"one of {_INITS}", config.init)
    if config.predicate is not None and not callable(config.predicate):
        refuse("predicate", "a callable predicate(path, leaf) -> bool or None", config.predicate)
