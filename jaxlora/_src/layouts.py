"""Reading each kernel's layout from the operations that use it, in a traced model call (no values computed).

For every parameter, `usages` walks the jaxpr of one call and lists the operations that consume it: which of one
layer's axes a `dot_general` contracts with x, whether a convolution or a row gather reads it, and how many of its
leading axes are layer stacks (sliced by `lax.scan`, or mapped over as `dot_general` batch axes by vmap). `plan`
turns these into each adapter's `in_axes` and `stacked_axes`, so that a config of path patterns is all a user
writes, whatever module computes with the kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jax.extend import core as jex_core

_PASSTHROUGH = {"convert_element_type", "copy", "copy_p", "sharding_constraint", "name", "pvary", "device_put",
                "reduce_precision", "optimization_barrier"}  # fmt: skip
_INLINE = {"jit", "pjit", "closed_call", "core_call", "custom_lin"}


@dataclasses.dataclass(frozen=True)
class Usage:
    """One operation consuming a kernel: `op`, the stack axes before its layer axes, and the layer axes it contracts
    with x (None where it does not contract, e.g. an unsupported use, whose `problem` says why)."""

    op: str
    stacked: int
    contracted: tuple[int, ...] | None
    problem: str | None = None


@dataclasses.dataclass(frozen=True)
class _Tag:
    path: str
    sliced: int  # leading axes already sliced off by scans
    perm: tuple[int, ...] | None = None  # the value is the (sliced) kernel transposed by perm

    def axis(self, axis: int) -> int:
        return axis if self.perm is None else self.perm[axis]


def usages(jaxpr: Any, paths: tuple[str, ...]) -> dict[str, list[Usage]]:
    """The operations consuming each parameter (the first `len(paths)` inputs of the closed `jaxpr`)."""
    found: dict[str, list[Usage]] = {}
    tags = [_Tag(p, 0) for p in paths] + [None] * (len(jaxpr.jaxpr.invars) - len(paths))
    _walk(jaxpr.jaxpr, tags, found)
    return found


def _walk(jaxpr: Any, tags: list[_Tag | None], found: dict[str, list[Usage]]) -> list[_Tag | None]:
    env: dict[Any, _Tag] = {v: t for v, t in zip(jaxpr.invars, tags, strict=True) if t is not None}

    def tag_of(v):
        return None if isinstance(v, jex_core.Literal) else env.get(v)

    for eqn in jaxpr.eqns:
        in_tags = [tag_of(v) for v in eqn.invars]
        if all(t is None for t in in_tags):
            continue
        out_tags = _eqn(eqn, in_tags, found)
        for v, t in zip(eqn.outvars, out_tags, strict=True):
            if t is not None:
                env[v] = t
    return [tag_of(v) for v in jaxpr.outvars]


def _eqn(eqn: Any, tags: list[_Tag | None], found: dict[str, list[Usage]]) -> list[_Tag | None]:
    name = eqn.primitive.name
    none = [None] * len(eqn.outvars)
    if name in _PASSTHROUGH and len(tags) == 1:
        return [tags[0]] * len(eqn.outvars)
    if name == "transpose":
        t = tags[0]
        return [dataclasses.replace(t, perm=tuple(t.axis(p) for p in eqn.params["permutation"]))]
    if name in _INLINE and "jaxpr" in eqn.params:
        closed = eqn.params["jaxpr"]
        return _walk(getattr(closed, "jaxpr", closed), tags, found)
    if name == "remat2":
        _walk(eqn.params["jaxpr"], tags, found)
        return none
    if name == "scan":
        n_consts, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
        inner = [
            t if t is None or i < n_consts else None if i < n_consts + n_carry else _Tag(t.path, t.sliced + 1, t.perm)
            for i, t in enumerate(tags)
        ]
        for i, t in enumerate(tags):
            if t is not None and n_consts <= i < n_consts + n_carry:
                _add(found, t, Usage("scan carry", t.sliced, None, "it is a loop carry of a lax.scan"))
        _walk(eqn.params["jaxpr"].jaxpr, inner, found)
        return none
    if name == "cond":
        for closed in eqn.params["branches"]:
            _walk(closed.jaxpr, tags[1:], found)
        return none
    if name == "while":
        nc, nb = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
        carry = [None] * (len(tags) - nc - nb)
        _walk(eqn.params["cond_jaxpr"].jaxpr, [*tags[:nc], *carry], found)
        _walk(eqn.params["body_jaxpr"].jaxpr, [*tags[nc : nc + nb], *carry], found)
        return none
    if name == "dot_general" and (tags[0] is None) != (tags[1] is None):
        kernel_is_rhs = tags[1] is not None
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        t = tags[1] if kernel_is_rhs else tags[0]
        kc, kb = (rc, rb) if kernel_is_rhs else (lc, lb)
        kc, kb = tuple(t.axis(c) for c in kc), tuple(t.axis(b) for b in kb)
        if tuple(kb) != tuple(range(len(kb))):
            _add(found, t, Usage(name, t.sliced, None, f"a dot_general uses its axes {tuple(kb)} as batch axes"))
        else:
            contracted = tuple(sorted(c - len(kb) for c in kc))
            _add(found, t, Usage(name, t.sliced + len(kb), contracted))
        return none
    if name == "conv_general_dilated" and tags[0] is None and tags[1] is not None:
        t = tags[1]
        out_feature = eqn.params["dimension_numbers"].rhs_spec[0]
        ndim = len(eqn.invars[1].aval.shape)
        _add(found, t, Usage(name, t.sliced, tuple(d for d in range(ndim) if d != out_feature)))
        return none
    if name == "gather" and tags[0] is not None and tags[1] is None:
        _add(found, tags[0], Usage(name, tags[0].sliced, (0,)))
        return none
    for t in tags:
        if t is not None:
            _add(found, t, Usage(name, t.sliced, None, f"it goes through `{name}` before reaching an operation with x"))
    return none


def _add(found: dict[str, list[Usage]], tag: _Tag, usage: Usage) -> None:
    found.setdefault(tag.path, []).append(usage)
