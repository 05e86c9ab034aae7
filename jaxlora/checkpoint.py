"""Adapter-only checkpoints with orbax: the adapters, their config and a fingerprint of the base they fit.

A checkpoint directory holds orbax items ``adapters`` (the LoRA pytree), ``saved`` (the modules_to_save leaves,
trained in full, when there are any), ``opt_state`` (training checkpoints only) and ``meta`` (JSON: format
version, ``config.to_dict()``, and the paths, shapes and dtypes of the base leaves the adapters belong to).
Writes are atomic: a checkpoint appears complete or not at all, and a replaced one stays until its successor
is fully written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxlora._paths import PyTree, leaves_with_paths, map_with_paths, nested_set
from jaxlora.config import LoraConfig
from jaxlora.plan import plan

FORMAT = "jaxlora.adapter"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------
# Atomic directories
# ----------------------------------------------------------------------------------------------------------------


def _siblings(directory: Path, kind: str) -> list[Path]:
    return sorted(directory.parent.glob(f".{directory.name}.{kind}-*"), key=lambda p: p.stat().st_mtime)


def committed(directory: str | os.PathLike) -> Path | None:
    """The complete checkpoint at `directory`, or the one a replacement cut short by a crash moved aside."""
    directory = Path(directory).expanduser().absolute()
    if directory.exists():
        return directory
    old = _siblings(directory, "old")
    return old[-1] if old else None


def recover(directory: str | os.PathLike) -> None:
    """Before writing `directory`: undoes a replacement cut short by a crash and removes half-written saves.

    If the process died between moving the old checkpoint aside and moving the new one in, the old one is
    put back; temporaries of saves that never finished are deleted.
    """
    directory = Path(directory).expanduser().absolute()
    old = _siblings(directory, "old")
    if old and not directory.exists():
        os.rename(old[-1], directory)
        old = old[:-1]
    for path in old + _siblings(directory, "tmp"):
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling path to write into; it becomes `directory` only when the block succeeds.

    With `overwrite=False` an existing `directory` is an error; with `overwrite=True` it is replaced, and
    stays intact until the new one is completely written. On an exception nothing is left behind.
    """
    directory = Path(directory).expanduser().absolute()
    recover(directory)
    if directory.exists() and not overwrite:
        raise FileExistsError(
            f"{directory} already exists; pass overwrite=True to replace it "
            "(the old one is kept until the new one is completely written)"
        )
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory; choose another path")
    directory.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    tmp = directory.parent / f".{directory.name}.tmp-{token}"
    try:
        yield tmp
        if not tmp.is_dir():
            raise RuntimeError(f"nothing was written to {tmp}")
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{token}"
            os.rename(directory, old)
            try:
                os.rename(tmp, directory)
            except BaseException:
                os.rename(old, directory)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    finally:
        for leftover in directory.parent.glob(f".{directory.name}.tmp-{token}*"):
            shutil.rmtree(leftover, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# Fingerprint and metadata
# ----------------------------------------------------------------------------------------------------------------


def _spec(leaf: Any) -> dict[str, Any]:
    return {"shape": [int(d) for d in np.shape(leaf)], "dtype": str(np.dtype(leaf.dtype))}


def fingerprint(params: PyTree, config: LoraConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """Paths, shapes and dtypes of the base leaves `config` adapts ("adapted") and trains in full ("saved")."""
    resolved = plan(params, config)
    flat = dict(leaves_with_paths(params))
    return {
        "adapted": {p: {"shape": list(leaf.shape), "dtype": str(leaf.dtype)} for p, leaf in resolved.leaves.items()},
        "saved": {p: _spec(flat[p]) for p in resolved.saved},
    }


def _describe(spec: Mapping[str, Any] | None) -> str:
    if spec is None:
        return "no such leaf"
    return f"a {spec['dtype']} array of shape {tuple(spec['shape'])}"


def check_fingerprint(expected: Mapping[str, Any], params: PyTree, config: LoraConfig, source: str) -> None:
    """Raises ValueError naming the first base leaf where `params` differ from the fingerprint `expected`."""
    flat = {p: _spec(leaf) for p, leaf in leaves_with_paths(params)}
    for group in ("adapted", "saved"):
        for path, spec in expected.get(group, {}).items():
            got = flat.get(path)
            if got != {"shape": list(spec["shape"]), "dtype": spec["dtype"]}:
                raise ValueError(
                    f"{source} does not fit these params: at {path!r} it expects {_describe(spec)}, "
                    f"but params have {_describe(got)}. Load it with the base model it was trained on."
                )
    actual = fingerprint(params, config)
    for group in ("adapted", "saved"):
        extra = [p for p in actual[group] if p not in expected.get(group, {})]
        if extra:
            verb = "adapts" if group == "adapted" else "trains in full"
            raise ValueError(
                f"{source} does not fit these params: its config also {verb} {extra[0]!r} "
                f"({_describe(actual[group][extra[0]])}), which the checkpoint has no entry for. "
                "Load it with the base model it was trained on."
            )


def _metadata(params: PyTree, adapters: Mapping, config: LoraConfig, saved_included: bool) -> dict[str, Any]:
    resolved = plan(params, config)
    flat = resolved.check_adapters(adapters)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "base": fingerprint(params, config),
        "adapters": {p: {name: _spec(x) for name, x in pair.items()} for p, pair in flat.items()},
        "saved_included": saved_included,
    }


def _read_metadata(meta: Any, source: str) -> tuple[dict[str, Any], LoraConfig]:
    if not isinstance(meta, Mapping) or meta.get("format") != FORMAT:
        raise ValueError(f"{source} is not a jaxlora adapter checkpoint (its 'meta' item is missing or foreign)")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{source} has checkpoint format version {version!r}; this jaxlora reads versions up to "
            f"{FORMAT_VERSION}: upgrade jaxlora to load it"
        )
    return dict(meta), LoraConfig.from_dict(meta["config"])


def _saved_leaves(params: PyTree, config: LoraConfig) -> dict:
    """The modules_to_save leaves of `params` as nested dicts (empty when the config saves none)."""
    saved = set(plan(params, config).saved)
    out: dict = {}
    for path, leaf in leaves_with_paths(params):
        if path in saved:
            nested_set(out, path, leaf)
    return out


def _struct(spec: Mapping[str, Any], sharding: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(spec["shape"]), jnp.dtype(spec["dtype"]), sharding=sharding)


def _abstract(specs: Mapping[str, Mapping[str, Any]], sharding: jax.sharding.Sharding) -> dict:
    """Nested ShapeDtypeStructs to restore into, from a flat ``{path: {name: spec}}`` or ``{path: spec}``."""
    out: dict = {}
    for path, spec in specs.items():
        if "shape" in spec:
            nested_set(out, path, _struct(spec, sharding))
        else:
            for name, sub in spec.items():
                nested_set(out, f"{path}/{name}", _struct(sub, sharding))
    return out


def _as_restore_target(tree: PyTree, sharding: jax.sharding.Sharding) -> PyTree:
    """ShapeDtypeStructs (with a sharding, which orbax needs) for a template of arrays or abstract values."""

    def abstract(leaf):
        dtype = getattr(leaf, "dtype", None) or np.result_type(leaf)  # Python scalars have none
        return jax.ShapeDtypeStruct(np.shape(leaf), dtype, sharding=getattr(leaf, "sharding", None) or sharding)

    return jax.tree.map(abstract, tree)


def _with_saved(params: PyTree, saved: Mapping) -> PyTree:
    """`params` with the leaves in `saved` (nested dicts of trained full weights) put in place."""
    flat = dict(leaves_with_paths(saved))
    return map_with_paths(lambda path, leaf: flat.get(path, leaf), params)


def _checkpointer() -> contextlib.closing[ocp.Checkpointer]:
    return contextlib.closing(ocp.Checkpointer(ocp.CompositeCheckpointHandler()))


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _save_args(params: PyTree, adapters: Mapping, config: LoraConfig, include_saved: bool, **extra: Any) -> Any:
    meta = _metadata(params, adapters, config, include_saved)
    items = {"adapters": ocp.args.StandardSave(dict(adapters)), "meta": ocp.args.JsonSave(meta)}
    saved = _saved_leaves(params, config) if include_saved else {}
    if saved:
        items["saved"] = ocp.args.StandardSave(saved)
    for name, tree in extra.items():
        items[name] = ocp.args.StandardSave(tree)
    return ocp.args.Composite(**items)


def _restore_arrays(
    restore: Any, meta: Mapping[str, Any], params: PyTree, **templates: Any
) -> tuple[PyTree, dict, dict]:
    """Restores adapters, saved leaves (into `params`) and any templated items, with the checkpoint's dtypes."""
    sharding = _default_sharding()
    items = {"adapters": ocp.args.StandardRestore(_abstract(meta["adapters"], sharding))}
    if meta.get("saved_included") and meta["base"]["saved"]:
        items["saved"] = ocp.args.StandardRestore(_abstract(meta["base"]["saved"], sharding))
    for name, template in templates.items():
        items[name] = ocp.args.StandardRestore(_as_restore_target(template, sharding))
    out = restore(ocp.args.Composite(**items))
    if "saved" in items:
        params = _with_saved(params, out["saved"])
    return params, out["adapters"], {name: out[name] for name in templates}


# ----------------------------------------------------------------------------------------------------------------
# One adapter checkpoint
# ----------------------------------------------------------------------------------------------------------------


def save_adapter(
    directory: str | os.PathLike,
    params: PyTree,
    adapters: Mapping,
    config: LoraConfig,
    *,
    include_saved: bool = True,
    overwrite: bool = False,
) -> Path:
    """Writes `adapters` (and, with `include_saved`, the modules_to_save leaves of `params`) to `directory`.

    `params` is the base the adapters belong to: its adapted leaves are fingerprinted, not stored (with
    init="pissa" that base is the residual `jaxlora.init` returned, which must be kept to load them again).
    Returns the absolute path written. Raises FileExistsError if `directory` exists and `overwrite` is False.
    """
    directory = Path(directory).expanduser().absolute()
    args = _save_args(params, adapters, config, include_saved)  # validates before anything touches the disk
    with atomic_directory(directory, overwrite) as tmp, _checkpointer() as ckpt:
        ckpt.save(tmp, args)
    return directory


def load_adapter(directory: str | os.PathLike, params: PyTree) -> tuple[PyTree, dict, LoraConfig]:
    """`(params, adapters, config)` from a checkpoint written by `save_adapter` for this base `params`.

    The returned params are `params` with any saved modules_to_save leaves put in. Raises ValueError naming
    the first leaf where `params` differ from the base the checkpoint was saved with.
    """
    requested = Path(directory).expanduser().absolute()
    directory = committed(requested)
    if directory is None or not directory.is_dir():
        raise FileNotFoundError(f"no adapter checkpoint at {requested}")
    with _checkpointer() as ckpt:
        try:
            raw = ckpt.restore(directory, ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except (FileNotFoundError, KeyError, ValueError) as err:
            raise ValueError(f"{directory} is not a jaxlora adapter checkpoint ({err})") from err
        meta, config = _read_metadata(raw, str(directory))
        check_fingerprint(meta["base"], params, config, f"adapter checkpoint {directory}")
        params, adapters, _ = _restore_arrays(lambda args: ckpt.restore(directory, args), meta, params)
    return params, adapters, config


# ----------------------------------------------------------------------------------------------------------------
# Training checkpoints
# ----------------------------------------------------------------------------------------------------------------


class TrainingState(NamedTuple):
    """What `restore_training` gives back: where training stopped and everything needed to go on from there."""

    step: int
    params: PyTree
    adapters: dict
    opt_state: PyTree
    config: LoraConfig


def checkpoint_manager(
    directory: str | os.PathLike, *, max_to_keep: int | None = 3, async_save: bool = True
) -> ocp.CheckpointManager:
    """An orbax CheckpointManager for training checkpoints under `directory`, keeping the last `max_to_keep`.

    Saves are atomic (a killed run leaves the previous step loadable, and the half-written step is removed
    here on the next start) and, with `async_save`, written in the background: call
    ``manager.wait_until_finished()`` (or ``manager.close()``) before exiting.
    """
    directory = Path(directory).expanduser().absolute()
    if directory.is_dir():  # steps a killed run left half-written (orbax's own cleanup runs in the background)
        for leftover in directory.glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(leftover, ignore_errors=True)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(directory, options=options)


def save_training(
    manager: ocp.CheckpointManager,
    step: int,
    params: PyTree,
    adapters: Mapping,
    opt_state: PyTree,
    config: LoraConfig,
    *,
    force: bool = False,
) -> bool:
    """Saves adapters, modules_to_save leaves, optimizer state and `step`; True if a checkpoint was started."""
    args = _save_args(params, adapters, config, True, opt_state=opt_state)
    return manager.save(int(step), args=args, force=force)


def restore_training(
    manager: ocp.CheckpointManager, params: PyTree, opt_state: PyTree, *, step: int | None = None
) -> TrainingState | None:
    """The checkpoint at `step` (default: the latest), or None when the manager holds none.

    `params` is the base model (checked against the checkpoint's fingerprint); `opt_state` is a template of
    the optimizer state (e.g. ``tx.init(trainable)`` or its ``jax.eval_shape``) giving its structure.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    if step not in manager.all_steps():
        raise ValueError(f"no checkpoint for step {step} in {manager.directory}; saved steps: {manager.all_steps()}")
    source = f"training checkpoint {manager.directory} step {step}"
    meta, config = _read_metadata(
        manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"], source
    )
    check_fingerprint(meta["base"], params, config, source)
    params, adapters, rest = _restore_arrays(
        lambda args: manager.restore(step, args=args), meta, params, opt_state=opt_state
    )
    return TrainingState(step=int(step), params=params, adapters=adapters, opt_state=rest["opt_state"], config=config)
