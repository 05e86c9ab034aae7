"""The drop-in contract, checked the same way on every model: a config of path patterns is all the user writes.

`check_drop_in(model, params, example, config)` (linen or nnx) asserts, with the plan read from the model's own
operations (`jaxlora.plan(..., model=, example=)`):
- every adapter is served factored under `strict=True`;
- the output equals the plain model run on weights merged by a plain-numpy formula (relative 1e-5 of the update);
- a plain call before and after a jaxlora call is the base, bit for bit;
- a second call with other adapters counts them once (it equals its own merged reference);
- 3 optax steps on the adapters lower a loss, with the base bit-identical afterwards.

`check_bank(model, params, example, configs, slots)` asserts that a mixed batch over an adapter bank of adapters
planned the same way (`jaxlora.apply_bank` / `apply_bank_nnx`) gives each row what the plain model gives that row
alone on weights merged by the same formula with the row's adapter (the base weights for -1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxlora


def formula_merge(params, adapters, plan):
    """W + s·A B per adapted leaf in float64 numpy, A holding one layer's `in_axes` and B the others, in W's order."""
    flat = jaxlora._src.paths.flatten_adapters(adapters)

    def merged(path, w):
        if path not in plan.leaves:
            return w
        leaf, pair = plan.leaves[path], flat[path]
        a, b = np.asarray(pair["lora_a"], np.float64), np.asarray(pair["lora_b"], np.float64)
        k, ins, outs = leaf.stacked_axes, leaf.layer_in_axes, leaf.layer_out_axes
        stack = a.shape[:k]
        a = a.reshape(-1, int(np.prod(a.shape[k:-1])), a.shape[-1])
        b = b.reshape(a.shape[0], b.shape[k], -1)
        delta = leaf.scale * np.einsum("lir,lro->lio", a, b)
        delta = delta.reshape(*stack, *(leaf.layer_shape[d] for d in ins), *(leaf.layer_shape[d] for d in outs))
        order = (*ins, *outs)  # delta's layer axes are W's axes in this order
        delta = np.transpose(delta, (*range(k), *(k + order.index(d) for d in range(len(order)))))
        return (np.asarray(w, np.float64) + delta).astype(w.dtype)

    return jaxlora._src.paths.map_with_paths(merged, params)


def _randomized(adapters, seed):
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + 0.2 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(tree, noisy)


def runners(model, params):
    """(plain(params, *args), served(plan) -> fn(params, adapters, *args)) for a linen or an nnx model."""
    if isinstance(model, nnx.Module):
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)

        def plain(p, *args, **kwargs):
            return nnx.merge(graphdef, p, jax.tree.map(lambda v: v, rest))(*args, **kwargs)

        def served(plan):
            fn = jaxlora.apply_nnx_fn(plan, strict=True)

            def run(p, adapters, *args, **kwargs):
                return fn(nnx.merge(graphdef, p, jax.tree.map(lambda v: v, rest)), adapters, *args, **kwargs)

            return run

        return plain, served

    def plain(p, *args, **kwargs):
        return model.apply({"params": p}, *args, **kwargs)

    def served(plan):
        fn = jaxlora.apply_fn(model, plan, strict=True)
        return lambda p, adapters, *args, **kwargs: fn({"params": p}, adapters, *args, **kwargs)

    return plain, served


def _close(got, want, base, what):
    got, want, base = (np.asarray(jax.tree.leaves(t)[0], np.float64) for t in (got, want, base))
    update = np.abs(want - base).max()
    assert update > 1e-4, f"{what}: the adapters change nothing, the check would be empty"
    err = np.abs(got - want).max()
    assert err <= 1e-5 * update + 1e-6, f"{what}: off by {err} for an update of {update}"


def check_drop_in(model, params, example, config, *, seed=0, steps=3):
    """Asserts the contract in the module docstring; returns the plan."""
    example = example if isinstance(example, tuple) else (example,)
    plan = jaxlora.plan(params, config, model=model, example=example)
    _, adapters = jaxlora.init(jax.random.key(seed), params, plan)
    adapters = _randomized(adapters, seed + 1)
    plain, served = runners(model, params)
    run = jax.jit(served(plan))  # one compile serves every call below (and checks the served path under jit)
    before = plain(params, *example)
    out = run(params, adapters, *example)
    after = plain(params, *example)
    jax.tree.map(np.testing.assert_array_equal, before, after)  # a jaxlora call changes no later plain call
    _close(out, plain(formula_merge(params, adapters, plan), *example), before, "served vs merged")
    other = _randomized(adapters, seed + 2)
    _close(run(params, other, *example), plain(formula_merge(params, other, plan), *example), before, "second call")
    again = plain(params, *example)
    jax.tree.map(np.testing.assert_array_equal, before, again)

    target = jax.tree.map(lambda y: jax.random.normal(jax.random.key(seed + 3), y.shape, jnp.float32), before)
    frozen_bits = jax.tree.map(np.array, params)
    tx = optax.adam(3e-2)

    def loss_fn(adapters):
        pred = run(params, adapters, *example)
        pairs = zip(jax.tree.leaves(pred), jax.tree.leaves(target), strict=True)
        return sum(jnp.mean((jnp.asarray(p, jnp.float32) - t) ** 2) for p, t in pairs)

    @jax.jit
    def step(adapters, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    opt_state, losses = tx.init(adapters), []
    for _ in range(steps):
        adapters, opt_state, loss = step(adapters, opt_state)
        losses.append(float(loss))
    final = float(loss_fn(adapters))
    assert final < losses[0], (losses, final)
    jax.tree.map(np.testing.assert_array_equal, frozen_bits, jax.tree.map(np.array, params))
    return plan


def check_bank(model, params, example, configs, slots, *, seed=0):
    """Asserts the bank contract in the module docstring; returns the bank."""
    example = example if isinstance(example, tuple) else (example,)
    entries = []
    for i, config in enumerate(configs):
        plan = jaxlora.plan(params, config, model=model, example=example)
        entries.append((_randomized(jaxlora.init(jax.random.key(seed + i), params, plan)[1], seed + 10 + i), plan))
    bank = jaxlora.adapter_bank(entries)
    plain, _ = runners(model, params)
    if isinstance(model, nnx.Module):
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)
        module = nnx.merge(graphdef, params, rest)
        mixed = jax.jit(lambda bank, ids, *args: jaxlora.apply_bank_nnx(module, bank, ids, *args))
    else:
        mixed = jax.jit(lambda bank, ids, *args: jaxlora.apply_bank(model, {"params": params}, bank, ids, *args))
    first = lambda out: jax.tree.leaves(out)[0]  # the logits of a model returning more
    got, base = first(mixed(bank, bank.ids(slots), *example)), first(plain(params, *example))
    for row, slot in enumerate(slots):
        alone = tuple(None if a is None else a[row : row + 1] for a in example)
        merged = params if slot == -1 else formula_merge(params, *entries[slot])
        want = first(plain(merged, *alone))
        if slot == -1:
            np.testing.assert_allclose(got[row], want[0], atol=1e-6, rtol=0, err_msg=f"row {row} (the base)")
        else:
            _close(got[row : row + 1], want, base[row : row + 1], f"row {row} (slot {slot})")
    return bank
