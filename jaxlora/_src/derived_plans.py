"""Plans for adapters jaxlora builds itself (combinations, banks): one exact pattern per adapted path.

A derived plan is an ordinary `Plan`, resolved against the same base as the plans it comes from, with a config
that names each adapted path literally (its rank, alpha, input axes, stacked_axes and layers spelled out), so
it saves, loads, merges and serves like any other plan.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax

from jaxlora._src.config import LoraConfig
from jaxlora._src.planning import LeafPlan, Plan, plan


def base_fingerprint(plan_: Plan) -> tuple:
    """What identifies the base a plan was built for: its leaves' paths, shapes and dtypes, and its tree structure."""
    return (tuple(plan_.shapes.items()), tuple((p, str(d)) for p, d in plan_.dtypes.items()), plan_.treedef)


def check_same_base(plans: Sequence[Plan], what: str) -> None:
    """Raises ValueError naming the first leaf where a plan's base differs from the first plan's base."""
    first = plans[0]
    for i, other in enumerate(plans[1:], start=1):
        if base_fingerprint(other) == base_fingerprint(first):
            continue
        paths = list(first.shapes) + [p for p in other.shapes if p not in first.shapes]
        path = next(
            (
                p
                for p in paths
                if (first.shapes.get(p), first.dtypes.get(p)) != (other.shapes.get(p), other.dtypes.get(p))
            ),
            None,
        )
        where = (
            f"at {path!r} adapter 0's base has {_spec(first, path)} and adapter {i}'s has {_spec(other, path)}"
            if path is not None
            else "their parameter trees have different structures"
        )
        raise ValueError(
            f"{what}: the adapters were planned for different base models ({where}); adapters can only be "
            "combined or banked over the base they were trained on: load each with that same base's params"
        )


def _spec(plan_: Plan, path: str) -> str:
    if path not in plan_.shapes:
        return "no such leaf"
    return f"a {plan_.dtypes[path]} array of shape {plan_.shapes[path]}"


def shape_tree(plan_: Plan):
    """The base params as `jax.ShapeDtypeStruct`s, rebuilt from what the plan recorded."""
    specs = [jax.ShapeDtypeStruct(s, d) for s, d in zip(plan_.shapes.values(), plan_.dtypes.values(), strict=True)]
    return jax.tree.unflatten(plan_.treedef, specs)


def derived_plan(
    base: Plan,
    leaves: Mapping[str, LeafPlan],
    ranks: Mapping[str, int],
    alphas: Mapping[str, float],
    layers: Mapping[str, tuple[int, ...] | None] | None = None,
) -> Plan:
    """A plan over `base`'s params adapting exactly `leaves` (their input axes and stack), with new ranks and alphas.

    `use_rslora` is off, so each leaf's scale is alpha / rank; `layers` overrides `layers_to_transform`.
    """
    layers = {} if layers is None else layers
    exact = {path: re.escape(path) for path in leaves}
    selected = {path: layers.get(path, leaves[path].layers) for path in leaves}
    config = LoraConfig(
        rank=max(ranks.values()),
        alpha=float(max(ranks.values())),
        targets=tuple(exact.values()),
        rank_pattern={exact[p]: int(ranks[p]) for p in leaves},
        alpha_pattern={exact[p]: float(alphas[p]) for p in leaves},
        fan_in_ndim={exact[p]: leaf.fan_in_ndim for p, leaf in leaves.items() if leaf.in_axes is None},
        in_axes={exact[p]: leaf.in_axes for p, leaf in leaves.items() if leaf.in_axes is not None},
        stacked_axes={exact[p]: leaf.stacked_axes for p, leaf in leaves.items() if leaf.stacked_axes},
        layers_to_transform={exact[p]: sel for p, sel in selected.items() if sel is not None},
    )
    return plan(shape_tree(base), config, allow_excess_rank=True)
