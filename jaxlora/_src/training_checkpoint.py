"""Training checkpoints: adapters, modules_to_save leaves, optimizer state and step, managed by orbax."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import orbax.checkpoint as ocp

from jaxlora._src.adapter_checkpoint import read_metadata, restore_arrays, save_args
from jaxlora._src.config import LoraConfig
from jaxlora._src.fingerprints import check_fingerprint
from jaxlora._src.paths import PyTree
from jaxlora._src.planning import Plan, resolve
from jaxlora._src.planning import plan as make_plan


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
    ``manager.wait_until_finished()`` (or ``manager.close()``) before exiting.

    Args:
      directory: the folder holding one sub-folder per step.
      max_to_keep: how many of the latest steps to keep (None: all).
      async_save: write in a background thread.

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
    return manager.save(int(step), args=args, force=force)


def restore_training(
    manager: ocp.CheckpointManager, params: PyTree, opt_state: PyTree, *, step: int | None = None
) -> TrainingState | None:
    """The checkpoint at `step` (default: the latest), or None when the manager holds none.

    Args:
      manager: from `checkpoint_manager`.
      params: the base model (checked against the checkpoint's fingerprint).
      opt_state: a template of the optimizer state (e.g. ``tx.init(trainable)`` or its ``jax.eval_shape``).
      step: which step (default: the latest).

    Returns:
      A `TrainingState(step, params, adapters, opt_state, plan)`, or None when there is no checkpoint.

    Raises:
      ValueError: if `step` is not saved, or the checkpoint does not fit `params`.

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
    meta, config = read_metadata(
        manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"], source
    )
    resolved = make_plan(params, config)
    check_fingerprint(meta["base"], resolved, source)
    params, adapters, rest = restore_arrays(
        lambda args: manager.restore(step, args=args), meta, params, opt_state=opt_state
    )
    return TrainingState(step=int(step), params=params, adapters=adapters, opt_state=rest["opt_state"], plan=resolved)
