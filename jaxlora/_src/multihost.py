"""Coordination between the processes of a multi-process JAX run (``jax.distributed``), for checkpoints and exports.

Every helper here is called by every process in the same order (they are collectives of JAX's runtime, or
agree on a value through one); in a single-process run they cost nothing and need no ``jax.distributed``.
Files on a shared file system are touched by process 0 only.
"""

from __future__ import annotations

import secrets
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def is_primary() -> bool:
    """True on the process that writes shared files (process 0; the only one in a single-process run)."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """A barrier of every process (JAX's `sync_global_devices`); `name` must be the same on all of them."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def all_succeeded(succeeded: bool) -> bool:
    """True when `succeeded` is True on every process (each process learns the others' outcome)."""
    if jax.process_count() == 1:
        return succeeded
    return bool(np.all(multihost_utils.process_allgather(np.array(succeeded, np.bool_))))


def shared_token() -> str:
    """A random hex token, the same on every process (drawn by process 0)."""
    if jax.process_count() == 1:
        return secrets.token_hex(6)
    draw = np.frombuffer(secrets.token_bytes(8), np.uint32) if is_primary() else np.zeros(2, np.uint32)
    return "".join(f"{int(x):08x}" for x in multihost_utils.broadcast_one_to_all(draw))[:12]


def host_array(x: Any) -> np.ndarray:
    """`x` as one NumPy array holding all its values, on every process.

    An array sharded across processes is gathered (a collective: every process must call this for it);
    others are read locally.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def replicated_everywhere() -> jax.sharding.Sharding:
    """Where restored arrays go by default: device 0 in one process, replicated on every device across processes."""
    if jax.process_count() == 1:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return NamedSharding(Mesh(np.array(jax.devices()), ("devices",)), PartitionSpec())
