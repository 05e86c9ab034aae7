"""What the operation-level serving knows about a value that is (a view of) a parameter: its `Operand` tag.

When `jaxlora.apply` runs a model, every adapted kernel (and every frozen kernel that a fast or quantized path
serves) enters the model's traced program tagged with an `Operand`: the leaf's path and plan, its adapter's arrays,
and how much of its layer stack is still present. The tag follows the value through dtype conversions, sharding
constraints, nested jits and rematerialisation, and is sliced with it by `lax.scan` (the stacked adapter's arrays
are scanned alongside), so that the operation that finally consumes the kernel (a `dot_general`, a convolution,
an embedding gather) knows its adapter, whatever module or flax transform produced it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora._src.layer_kinds import Adapter
from jaxlora._src.planning import LeafPlan


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Operand:
    """A parameter's tag: its adapter's arrays (None for a frozen kernel) at the current slicing of its stack.

    Attributes:
      a, b: A (*stack, *in, r) and B (*stack, r, *out), with `depth` stack axes left (B masked to the adapted layers);
        for an adapter bank's kernel, A (*stack, N, *in, R) and B (*stack, N, R, *out), one slot per adapter set.
      rng: the LoRA dropout key(s) of the leaf (one per stacked layer left), or None.
      magnitude: DoRA's magnitude, or None.
      quantized: the quantized kernel (a `qwix.QArray`) the traced placeholder stands for, or None.
      path: the leaf's "/"-joined path.
      leaf: its `LeafPlan`, or None for a frozen kernel.
      depth: how many of the leaf's stack axes the value still has (the plan's `stacked_axes`, less one per scan).
      dropout: the LoRA dropout rate.
      dtype: the dtype the model converted the kernel to (for a quantized kernel, whose value is not an array).
      perm: the value is the kernel's view transposed by `perm` (e.g. `embedding.T` in a tied head), or None.
      slots: for a bank's kernel, each example's slot (*stack, batch) int32, -1 for the base model; else None.
      factor: for a bank's kernel, each example's scale (*stack, batch) float32: its slot's alpha / r, 0 for the
        base model, NaN for a slot out of range.
    """

    a: Any = None
    b: Any = None
    rng: Any = None
    magnitude: Any = None
    quantized: Any = None
    path: str = dataclasses.field(default="", metadata={"static": True})
    leaf: LeafPlan | None = dataclasses.field(default=None, metadata={"static": True})
    depth: int = dataclasses.field(default=0, metadata={"static": True})
    dropout: float = dataclasses.field(default=0.0, metadata={"static": True})
    dtype: Any = dataclasses.field(default=None, metadata={"static": True})
    perm: tuple[int, ...] | None = dataclasses.field(default=None, metadata={"static": True})
    slots: Any = None
    factor: Any = None

    def original_axis(self, axis: int) -> int:
        """The axis of the (sliced) kernel that axis `axis` of this transposed view is."""
        return axis if self.perm is None else self.perm[axis]

    def transposed(self, permutation: tuple[int, ...]) -> Operand:
        """The tag of `jnp.transpose(value, permutation)`."""
        return dataclasses.replace(self, perm=tuple(self.original_axis(p) for p in permutation))

    @property
    def adapted(self) -> bool:
        return self.leaf is not None

    @property
    def banked(self) -> bool:
        """Whether each example has its own adapter (a bank's kernel)."""
        return self.slots is not None

    @property
    def safe_slots(self) -> jax.Array:
        """A bank's slot per example, clipped into the bank (a base or out-of-range row reads slot 0 or N-1, then
        `example_rows` zeroes or poisons it)."""
        return jnp.clip(self.slots, 0, self.a.shape[self.depth] - 1)

    def example_rows(self, x: jax.Array, scaled: bool = False) -> jax.Array:
        """x (batch, ...) gathered per example from a bank, zero on base rows and, if `scaled`, times each
        example's factor (NaN for a slot out of range). Gradients reach each slot from its own examples only."""

        def per_row(v):
            return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))

        if scaled:
            x = x * per_row(self.factor).astype(x.dtype)
        return jnp.where(per_row(self.slots == -1), jnp.zeros((), x.dtype), x)

    def adapter(self) -> Adapter:
        """The `Adapter` the layer-kind helpers take (dropout, scaling)."""
        return Adapter(self.a, self.b, self.leaf, self.dropout, self.rng, self.magnitude)

    def sliced(self) -> Operand:
        """The tag of one slice along the leading stack axis (inside `lax.scan`, whose xs carry the arrays)."""
        return dataclasses.replace(self, depth=self.depth - 1)

    def delta(self, dtype: Any) -> jax.Array:
        """s·A B in W's own axis order (stack axes left included), in `dtype`: what merging adds to this view."""
        leaf = self.leaf
        a, b = jnp.asarray(self.a, jnp.float32), jnp.asarray(self.b, jnp.float32)
        k = self.depth
        product = jax.lax.dot_general(a, b, (((a.ndim - 1,), (k,)), (tuple(range(k)), tuple(range(k)))))
        product = leaf.scale * product  # (*stack left, *in, *out)
        layer_order = (*leaf.layer_in_axes, *leaf.layer_out_axes)
        if layer_order != tuple(range(len(layer_order))):
            inverse = [layer_order.index(d) for d in range(len(layer_order))]
            product = jnp.transpose(product, (*range(k), *(k + i for i in inverse)))
        if self.perm is not None:
            product = jnp.transpose(product, self.perm)
        return product.astype(dtype)
