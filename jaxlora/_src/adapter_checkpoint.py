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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxlora._src import multihost
from jaxlora._src.atomic_files import committed, shared_atomic_directory
from jaxlora._src.config import LoraConfig
from jaxlora._src.fingerprints import check_fingerprint, fingerprint
from jaxlora._src.paths import PyTree, leaves_with_paths, map_with_paths, nested_set
from jaxlora._src.planning import Plan, resolve
from jaxlora._src.planning import plan as make_plan

FORMAT = "jaxlora.adapter"
FORMAT_VERSION = 1

# Where restored adapters go: one Sharding for all, a tree of them with the adapters' structure, or a function of
# the restored plan giving either (e.g. ``lambda plan: jaxlora.adapter_shardings(plan, param_shardings)``).
Shardings = jax.sharding.Sharding | Mapping | Callable[[Plan], Any] | None


def _spec(leaf: Any) -> dict[str, Any]:
    return {"shape": [int(d) for d in np.shape(leaf)], "dtype": str(np.dtype(leaf.dtype))}


def _metadata(params: PyTree, plan: Plan, adapters: Mapping, saved_included: bool) -> dict[str, Any]:
    flat = plan.check_adapters(adapters)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": plan.config.to_dict(),
        "base": fingerprint(plan, params),
        "adapters": {p: {name: _spec(x) for name, x in pair.items()} for p, pair in flat.items()},
        "saved_included": saved_included,
    }


def read_metadata(meta: Any, source: str) -> tuple[dict[str, Any], LoraConfig]:
    if not isinstance(meta, Mapping) or meta.get("format") != FORMAT:
        raise ValueError(f"{source} is not a jaxlora adapter checkpoint (its 'meta' item is missing or foreign)")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{source} has checkpoint format version {version!r}; this jaxlora reads versions up to "
            f"{FORMAT_VERSION}: upgrade jaxlora to load it"
        )
    return dict(meta), LoraConfig.from_dict(meta["config"])


def _saved_leaves(params: PyTree, plan: Plan) -> dict:
    """The modules_to_save leaves of `params` as nested dicts (empty when the plan saves none)."""
    saved = set(plan.saved)
    out: dict = {}
    for path, leaf in leaves_with_paths(params):
        if path in saved:
            nested_set(out, path, leaf)
    return out


def _struct(spec: Mapping[str, Any], sharding: jax.sharding.Sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(spec["shape"]), jnp.dtype(spec["dtype"]), sharding=sharding)


def _abstract(specs: Mapping[str, Mapping[str, Any]], sharding: Callable[[str], jax.sharding.Sharding]) -> dict:
    """Nested ShapeDtypeStructs to restore into, from a flat ``{path: {name: spec}}`` or ``{path: spec}``,
    each placed by ``sharding(its path)``."""
    out: dict = {}
    for path, spec in specs.items():
        if "shape" in spec:
            nested_set(out, path, _struct(spec, sharding(path)))
        else:
            for name, sub in spec.items():
                nested_set(out, f"{path}/{name}", _struct(sub, sharding(f"{path}/{name}")))
    return out


def _is_sharding(x: Any) -> bool:
    return isinstance(x, jax.sharding.Sharding)


def _adapter_placement(shardings: Shardings, plan: Plan) -> tuple[Callable[[str], Any], jax.sharding.Sharding]:
    """`(sharding of an adapter leaf by path, sharding for other restored leaves)` from the `shardings=` argument."""
    if callable(shardings) and not _is_sharding(shardings):
        shardings = shardings(plan)
    if shardings is None or _is_sharding(shardings):
        fallback = shardings or multihost.replicated_everywhere()
        return (lambda path: fallback), fallback
    if not isinstance(shardings, Mapping):
        raise TypeError(
            f"shardings must be a jax.sharding.Sharding, a tree of them with the adapters' structure, or a function "
            f"of the plan giving one; got {type(shardings).__name__}"
        )
    flat = dict(leaves_with_paths(shardings, is_leaf=_is_sharding))
    wrong = [p for p, s in flat.items() if not _is_sharding(s)]
    if wrong:
        raise TypeError(f"shardings[{wrong[0]!r}] is {flat[wrong[0]]!r}, not a jax.sharding.Sharding")

    def adapter_sharding(path: str) -> jax.sharding.Sharding:
        if path not in flat:
            raise ValueError(
                f"shardings has no entry for the adapter leaf {path!r} (it has {sorted(flat)[:4]}...); give one "
                "per adapter leaf, e.g. jaxlora.adapter_shardings(plan, param_shardings), or one Sharding for all"
            )
        return flat[path]

    first = next(iter(flat.values()), None)
    if isinstance(first, jax.sharding.NamedSharding):  # other leaves go replicated on the adapters' mesh
        return adapter_sharding, jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec())
    return adapter_sharding, multihost.replicated_everywhere()


def _as_restore_target(tree: PyTree, sharding: jax.sharding.Sharding, strict: bool = False) -> PyTree:
    """ShapeDtypeStructs (with a sharding, which orbax needs) for a template of arrays or abstract values.

    A leaf goes where the template's is, else to `sharding`; with `strict`, also when the template's lies on
    other devices than `sharding` (``tx.init`` puts scalars such as Adam's step count on one device).
    """

    def abstract(leaf):
        dtype = getattr(leaf, "dtype", None) or np.result_type(leaf)  # Python scalars have none
        where = getattr(leaf, "sharding", None)
        if where is None or (strict and where.device_set != sharding.device_set):
            where = sharding
        return jax.ShapeDtypeStruct(np.shape(leaf), dtype, sharding=where)

    return jax.tree.map(abstract, tree)


def _with_saved(params: PyTree, saved: Mapping) -> PyTree:
    """`params` with the leaves in `saved` (nested dicts of trained full weights) put in place."""
    flat = dict(leaves_with_paths(saved))
    return map_with_paths(lambda path, leaf: flat.get(path, leaf), params)


def _checkpointer() -> contextlib.closing[ocp.Checkpointer]:
    return contextlib.closing(ocp.Checkpointer(ocp.CompositeCheckpointHandler()))


def save_args(params: PyTree, adapters: Mapping, plan: Plan, include_saved: bool, **extra: Any) -> Any:
    """The orbax items of a checkpoint: adapters, meta, the saved leaves and any `extra` trees (validated first)."""
    meta = _metadata(params, plan, adapters, include_saved)
    items = {"adapters": ocp.args.StandardSave(dict(adapters)), "meta": ocp.args.JsonSave(meta)}
    saved = _saved_leaves(params, plan) if include_saved else {}
    if saved:
        items["saved"] = ocp.args.StandardSave(saved)
    for name, tree in extra.items():
        items[name] = ocp.args.StandardSave(tree)
    return ocp.args.Composite(**items)


def restore_arrays(
    restore: Any, meta: Mapping[str, Any], params: PyTree, plan: Plan, shardings: Shardings = None, **templates: Any
) -> tuple[PyTree, dict, dict]:
    """Restores adapters, saved leaves (into `params`) and any templated items, with the checkpoint's dtypes.

    Adapters go where `shardings` says; saved leaves where their leaf in `params` is (when it is a jax.Array);
    templated items where their template's leaves are (when on the adapters' devices); anything else replicated
    on the adapters' mesh, on `shardings` when it is one Sharding, or by default `replicated_everywhere`.
    """
    adapter_sharding, fallback = _adapter_placement(shardings, plan)
    base = {path: getattr(leaf, "sharding", None) for path, leaf in leaves_with_paths(params)}
    items = {"adapters": ocp.args.StandardRestore(_abstract(meta["adapters"], adapter_sharding))}
    if meta.get("saved_included") and meta["base"]["saved"]:
        saved_at = lambda path: base.get(path) or fallback
        items["saved"] = ocp.args.StandardRestore(_abstract(meta["base"]["saved"], saved_at))
    for name, template in templates.items():
        items[name] = ocp.args.StandardRestore(_as_restore_target(template, fallback, shardings is not None))
    out = restore(ocp.args.Composite(**items))
    if "saved" in items:
        params = _with_saved(params, out["saved"])
    return params, out["adapters"], {name: out[name] for name in templates}


def save_adapter(
    directory: str | os.PathLike,
    params: PyTree,
    adapters: Mapping,
    plan: Plan | LoraConfig,
    *,
    include_saved: bool = True,
    overwrite: bool = False,
) -> Path:
    """Writes `adapters` (and, with `include_saved`, the modules_to_save leaves of `params`) to `directory`.

    `params` is the base the adapters belong to: its adapted leaves are fingerprinted, not stored (with
    init="pissa" that base is the residual `jaxlora.init` returned, which must be kept to load them again).

    Args:
      directory: where to write; written atomically (complete or not at all).
      params: the base params (with any trained modules_to_save leaves).
      adapters: the adapters.
      plan: from `jaxlora.plan(params, config)` (a `LoraConfig` is resolved here).
      include_saved: also store the modules_to_save leaves.
      overwrite: replace an existing checkpoint (kept until the new one is complete).

    In a multi-process run (``jax.distributed``) every process calls it with the same arguments and a
    `directory` on a file system they share; each writes its shards, process 0 the rest.

    Returns:
      The absolute path written.

    Raises:
      FileExistsError: if `directory` exists and `overwrite` is False.
      ValueError: if the adapters or the plan do not fit `params` (nothing is written).

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, jaxlora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
      >>> params, adapters = jaxlora.init(jax.random.key(0), params, plan)
      >>> path = jaxlora.checkpoint.save_adapter(tempfile.mkdtemp() + "/adapter", params, adapters, plan)
      >>> _, restored, plan2 = jaxlora.checkpoint.load_adapter(path, params)
      >>> plan2 == plan
      True
    """
    directory = Path(directory).expanduser().absolute()
    resolved = resolve(params, plan)
    args = save_args(params, adapters, resolved, include_saved)  # validates before anything touches the disk
    with shared_atomic_directory(directory, overwrite) as tmp, _checkpointer() as ckpt:
        ckpt.save(tmp, args)
    return directory


def load_adapter(
    directory: str | os.PathLike, params: PyTree, *, check_content: bool = True, shardings: Shardings = None
) -> tuple[PyTree, dict, Plan]:
    """`(params, adapters, plan)` from a checkpoint written by `save_adapter` for this base `params`.

    The base is checked against the fingerprint stored with the adapter: paths, shapes and dtypes, and a
    checksum of every adapted leaf's values, so that the adapter does not load silently onto another base of
    the same architecture (another checkpoint, a fine-tuned copy, a PiSSA base without its residual).

    Args:
      directory: the checkpoint (a replacement cut short by a crash is recovered).
      params: the base params the adapters belong to.
      check_content: also check the adapted leaves' values (False: shapes and dtypes only, to load an
        adapter onto a base that differs on purpose).
      shardings: where to put the adapters: one `jax.sharding.Sharding` for all, a tree of them with the
        adapters' structure, or a function of the restored plan giving either (e.g.
        ``lambda plan: jaxlora.adapter_shardings(plan, param_shardings)``). Default: device 0 in a
        single-process run, replicated on every device in a multi-process one. Any number of devices and
        processes may restore what any other number saved. Saved modules_to_save leaves go where their leaf
        in `params` is.

    Returns:
      `params` with any saved modules_to_save leaves put in, the adapters, and the plan of the stored config
      over `params` (its config is `plan.config`).

    Raises:
      FileNotFoundError: if there is no checkpoint at `directory`.
      ValueError: naming the first leaf where `params` differ from the base the checkpoint was saved with
        (in path, shape, dtype, or, with `check_content`, value), or an adapter leaf `shardings` has no entry for.

    Example:
      See `save_adapter`.
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
        meta, config = read_metadata(raw, str(directory))
        resolved = make_plan(params, config, allow_excess_rank=True)  # as saved: never refuse
        check_fingerprint(meta["base"], resolved, f"adapter checkpoint {directory}", params if check_content else None)
        params, adapters, _ = restore_arrays(
            lambda args: ckpt.restore(directory, args), meta, params, resolved, shardings
        )
    return params, adapters, resolved
