"""Training checkpoints: adapters, modules_to_save leaves, optimizer state and step, managed by orbax."""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import orbax.checkpoint as ocp

from jaxlora._src import multihost
from jaxlora._src.adapter_checkpoint import Shardings, read_metadata, restore_arrays, save_args
from jaxlora._src.config import LoraConfig
from jaxlora._src.fingerprints import check_fingerprint
from jaxlora._src.paths import PyTree
from jaxlora._src.planning import Plan, resolve
from jaxlora._src.planning import plan as make_plan

# Steps pruned by max_to_keep are first renamed into this sub-folder (one atomic rename), then removed from it:
# a run killed while a step is being deleted leaves the step either complete and listed, or out of the list.
PRUNED = ".jaxlora-pruned"
_ITEMS = ("meta", "adapters", "opt_state")  # every training checkpoint has these ("saved" only with saved leaves)


def _remove_leftovers(directory: Path) -> None:
    """Removes steps a killed run left half-written, and pruned steps not yet removed."""
    for leftover in directory.glob("*.orbax-checkpoint-tmp*"):
        shutil.rmtree(leftover, ignore_errors=True)
    shutil.rmtree(directory / PRUNED, ignore_errors=True)


class TrainingState(NamedTuple):
    """What `restore_training` gives back: where training stopped and everything needed to go on from there."""

    step: int
    params: PyTree
    adapters: dict
    opt_state: PyTree
    plan: Plan

    @property
    def config(self) -> LoraConfig:
        """The stored config (`plan.config`)."""
        return self.plan.config


def checkpoint_manager(
    directory: str | os.PathLike, *, max_to_keep: int | None = 3, async_save: bool = True
) -> ocp.CheckpointManager:
    """An orbax CheckpointManager for training checkpoints under `directory`, keeping the last `max_to_keep`.

    Saves are atomic (a killed run leaves the previous step loadable, and the half-written step is removed
    here on the next start) and, with `async_save`, written in the background: call
    ``manager.wait_until_finished()`` (or ``manager.close()``) before exiting. Old steps are pruned by renaming
    them into ``directory/.jaxlora-pruned`` first (atomic), then deleting them there (on the next save or the
    next start), so a run killed at any moment never leaves a half-deleted step that `all_steps()` lists.

    Args:
      directory: the folder holding one sub-folder per step.
      max_to_keep: how many of the latest steps to keep (None: all).
      async_save: write in a background thread.

    In a multi-process run (``jax.distributed``) every process creates it, on a file system they share, and
    calls `save_training` and `restore_training` with it in the same order.

    Returns:
      An `orbax.checkpoint.CheckpointManager` for `save_training` / `restore_training`.

    Example:
      >>> import tempfile, jaxlora
      >>> manager = jaxlora.checkpoint.checkpoint_manager(tempfile.mkdtemp(), max_to_keep=2)
      >>> manager.latest_step() is None
      True
      >>> manager.close()
    """
    directory = Path(directory).expanduser().absolute()
    if directory.is_dir() and multihost.is_primary():  # before orbax's own cleanup, which runs in the background
        _remove_leftovers(directory)
    multihost.sync(f"jaxlora: checkpoint_manager {directory}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save, todelete_subdir=PRUNED
    )
    return ocp.CheckpointManager(directory, options=options)


def save_training(
    manager: ocp.CheckpointManager,
    step: int,
    params: PyTree,
    adapters: Mapping,
    opt_state: PyTree,
    plan: Plan | LoraConfig,
    *,
    force: bool = False,
) -> bool:
    """Saves adapters, modules_to_save leaves, optimizer state and `step`; True if a checkpoint was started.

    Args:
      manager: from `checkpoint_manager`.
      step: the training step.
      params: the base params (with the trained modules_to_save leaves).
      adapters: the adapters.
      opt_state: the optimizer state.
      plan: from `jaxlora.plan(params, config)` (a `LoraConfig` is resolved here).
      force: save even if the manager's save interval would skip this step.

    Returns:
      True if a checkpoint was started (asynchronously with `async_save`).

    Example:
      See `restore_training`.
    """
    args = save_args(params, adapters, resolve(params, plan), True, opt_state=opt_state)
    manager.wait_until_finished()  # the previous save (and its pruning) is done: what it pruned can go
    if multihost.is_primary():
        shutil.rmtree(Path(manager.directory) / PRUNED, ignore_errors=True)
    return manager.save(int(step), args=args, force=force)


def restore_training(
    manager: ocp.CheckpointManager,
    params: PyTree,
    opt_state: PyTree,
    *,
    step: int | None = None,
    check_content: bool = True,
    shardings: Shardings = None,
) -> TrainingState | None:
    """The checkpoint at `step` (default: the latest), or None when the manager holds none.

    Args:
      manager: from `checkpoint_manager`.
      params: the base model (checked against the checkpoint's fingerprint).
      opt_state: a template of the optimizer state (e.g. ``tx.init(trainable)`` or its ``jax.eval_shape``);
        its leaves are restored where the template's are (so a sharded ``tx.init(trainable)`` restores sharded;
        with `shardings`, leaves on other devices, such as a step count, go replicated on the adapters' mesh).
      step: which step (default: the latest).
      check_content: also check the values of the adapted base leaves against the checkpoint's checksums.
      shardings: where to put the adapters, as in `jaxlora.checkpoint.load_adapter` (any number of devices and
        processes may restore what any other number saved).

    Returns:
      A `TrainingState(step, params, adapters, opt_state, plan)`, or None when there is no checkpoint.

    Raises:
      ValueError: if `step` is not saved, if the checkpoint does not fit `params`, or if it cannot be read
        (naming the step and what is missing, e.g. a step cut short by a kill under an older jaxlora).

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, optax, jaxlora
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
      >>> params, adapters = jaxlora.init(jax.random.key(0), params, plan)
      >>> tx = jaxlora.optimizer(optax.adam(1e-3), plan)
      >>> opt_state = tx.init(jaxlora.partition(params, adapters, plan)[0])
      >>> manager = jaxlora.checkpoint.checkpoint_manager(tempfile.mkdtemp(), async_save=False)
      >>> jaxlora.checkpoint.save_training(manager, 7, params, adapters, opt_state, plan)
      True
      >>> jaxlora.checkpoint.restore_training(manager, params, opt_state).step
      7
      >>> manager.close()
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    if step not in manager.all_steps():
        raise ValueError(f"no checkpoint for step {step} in {manager.directory}; saved steps: {manager.all_steps()}")
    source = f"training checkpoint {manager.directory} step {step}"
    restore = functools.partial(_restore_step, manager, step, source)
    meta, config = read_metadata(restore(ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"], source)
    resolved = make_plan(params, config, allow_excess_rank=True)  # as saved: never refuse
    check_fingerprint(meta["base"], resolved, source, params if check_content else None)
    params, adapters, rest = restore_arrays(restore, meta, params, resolved, shardings, opt_state=opt_state)
    return TrainingState(step=int(step), params=params, adapters=adapters, opt_state=rest["opt_state"], plan=resolved)


def _restore_step(manager: ocp.CheckpointManager, step: int, source: str, args: Any) -> Any:
    """`manager.restore(step, args)`, with orbax's and TensorStore's errors on a damaged step made explicit."""
    try:
        return manager.restore(step, args=args)
    except (KeyError, ValueError, FileNotFoundError, OSError) as err:
        folder = Path(manager.directory) / str(step)
        missing = [item for item in _ITEMS if not (folder / item).is_dir()]
        what = f"items {missing} are missing" if missing else "an item's files are incomplete"
        others = [s for s in manager.all_steps() if s != step]
        raise ValueError(
            f"{source} cannot be restored: {what} in {folder} ({type(err).__name__}: {str(err)[:300]}). It was "
            f"probably cut short while being written or deleted; restore another step ({others}) or delete it"
        ) from err
