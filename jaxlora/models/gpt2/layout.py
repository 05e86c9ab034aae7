"""The two layouts of GPT-2's blocks: unrolled (``h_0``, ``h_1``, ...) and stacked under ``h`` for ``nn.scan``."""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, Any]


def stack_layers(params: Params, n_layer: int) -> Params:
    """The scan_layers=True params from unscanned ones: h_0 ... h_{n-1} stacked leaf by leaf under "h"."""
    blocks = [params[f"h_{i}"] for i in range(n_layer)]
    rest = {k: v for k, v in params.items() if not re.fullmatch(r"h_\d+", k)}
    return {**rest, "h": jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)}


def unstack_layers(params: Params) -> Params:
    """The unscanned params from scan_layers=True ones: "h" split into h_0, h_1, ..."""
    n_layer = jax.tree.leaves(params["h"])[0].shape[0]
    rest = {k: v for k, v in params.items() if k != "h"}
    return {**rest, **{f"h_{i}": jax.tree.map(lambda leaf, i=i: leaf[i], params["h"]) for i in range(n_layer)}}
