"""Rematerialisation of decoder blocks: the ``jax.checkpoint`` policies the model families take by name.

A rematerialised block keeps only what its policy saves in the forward pass and recomputes the rest in the
backward pass: less activation memory for more compute, the same loss and gradients. It pays off in the scanned
layouts, whose backward pass runs block by block (unrolled, XLA:CPU was measured to schedule the recomputation
early and save nothing).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

__all__ = ["POLICIES", "checkpoint_policy"]

POLICIES = (
    "nothing_saveable",
    "dots_with_no_batch_dims_saveable",
    "dots_saveable",
    "everything_saveable",
)
"""The policy names a model's ``remat`` takes (attributes of ``jax.checkpoint_policies``): ``"nothing_saveable"``
keeps only each block's input (about one more forward pass of compute); ``"dots_with_no_batch_dims_saveable"``
also keeps the projections' outputs and recomputes the element-wise work."""


def checkpoint_policy(remat: str | Callable[..., bool] | None) -> Callable[..., bool] | None:
    """The ``jax.checkpoint`` policy `remat` names: one of :data:`POLICIES`, a policy callable, or None (none).

    Args:
      remat: a name from :data:`POLICIES`, a ``jax.checkpoint_policies`` callable, or None.

    Returns:
      The policy callable, or None.

    Raises:
      ValueError: a name that is no policy.

    Example:
      >>> checkpoint_policy("nothing_saveable") is jax.checkpoint_policies.nothing_saveable
      True
    """
    if remat is None or callable(remat):
        return remat
    if remat not in POLICIES:
        raise ValueError(
            f"remat={remat!r} is no rematerialisation policy; use one of {list(POLICIES)} (from "
            "jax.checkpoint_policies), a policy callable such as jax.checkpoint_policies.save_only_these_names(...), "
            "or None to keep every residual."
        )
    return getattr(jax.checkpoint_policies, remat)
