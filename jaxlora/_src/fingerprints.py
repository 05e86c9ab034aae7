"""A fingerprint of the base an adapter belongs to, stored with its checkpoints and checked when it is loaded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxlora._src.planning import Plan


def _spec(shape: tuple[int, ...], dtype: Any) -> dict[str, Any]:
    return {"shape": [int(d) for d in shape], "dtype": str(dtype)}


def fingerprint(plan: Plan) -> dict[str, dict[str, dict[str, Any]]]:
    """Paths, shapes and dtypes of the base leaves the plan adapts ("adapted") and trains in full ("saved")."""
    return {
        "adapted": {p: _spec(leaf.shape, leaf.dtype) for p, leaf in plan.leaves.items()},
        "saved": {p: _spec(plan.shapes[p], plan.dtypes[p]) for p in plan.saved},
    }


def _describe(spec: Mapping[str, Any] | None) -> str:
    if spec is None:
        return "no such leaf"
    return f"a {spec['dtype']} array of shape {tuple(spec['shape'])}"


def check_fingerprint(expected: Mapping[str, Any], plan: Plan, source: str) -> None:
    """Raises ValueError naming the first base leaf where the plan's params differ from the fingerprint `expected`."""
    specs = {p: _spec(plan.shapes[p], plan.dtypes[p]) for p in plan.shapes}
    for group in ("adapted", "saved"):
        for path, spec in expected.get(group, {}).items():
            got = specs.get(path)
            if got != {"shape": list(spec["shape"]), "dtype": spec["dtype"]}:
                raise ValueError(
                    f"{source} does not fit these params: at {path!r} it expects {_describe(spec)}, "
                    f"but params have {_describe(got)}. Load it with the base model it was trained on."
                )
    actual = fingerprint(plan)
    for group in ("adapted", "saved"):
        extra = [p for p in actual[group] if p not in expected.get(group, {})]
        if extra:
            verb = "adapts" if group == "adapted" else "trains in full"
            raise ValueError(
                f"{source} does not fit these params: its config also {verb} {extra[0]!r} "
                f"({_describe(actual[group][extra[0]])}), which the checkpoint has no entry for. "
                "Load it with the base model it was trained on."
            )
