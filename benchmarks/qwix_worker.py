"""The qwix peer (`pip install qwix`, what tunix and MaxText use): GPT-2 LoRA r16 through `qwix.apply_lora_to_model`.

Same linen GPT-2 (`jaxlora.models.gpt2`), same random weights, batch, rank 16, alpha 16, targets (attn c_attn,
attn c_proj, mlp c_fc, mlp c_proj), trainable 2-class head and AdamW as `jax_gpt2_lora_r16`. qwix intercepts the
Dense layers' `dot_general` and adds `(x A) B · alpha/rank`, with `kernel_lora_a` / `kernel_lora_b` params next to
each adapted kernel (A from qwix's default he_uniform, B zeros). Gradients are taken for the adapters and the head
only, as a user of linen would (`jax.value_and_grad` over the trainable subtree). Run by `benchmarks/run.py`:
`python -m benchmarks.qwix_worker --profile full --result out.json qwix_gpt2_lora_r16`.
"""

from __future__ import annotations

import importlib.metadata
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common, jax_worker
from benchmarks.common import GPT2_LORA, Profile, Unavailable

LORA_SUFFIXES = ("_lora_a", "_lora_b")


def _import_qwix():
    try:
        import qwix
    except Exception as err:
        raise Unavailable(f"import qwix failed: {type(err).__name__}: {err} (pip install qwix)") from err
    return qwix


def _path(keys: tuple) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in keys)


def _qwix_params(model: nn.Module, params: dict, shape: common.GPT2Shape, rank: int) -> tuple[nn.Module, dict]:
    """The qwix-wrapped model and its params: the given base weights plus qwix's LoRA params (A he_uniform, B 0)."""
    qwix = _import_qwix()
    spec = GPT2_LORA["r16"]
    provider = qwix.LoraProvider(
        module_path=rf"(.*/)?h_\d+/({'|'.join(spec['modules'])})", rank=rank, alpha=float(spec["alpha"])
    )
    lora_model = qwix.apply_lora_to_model(model, provider)
    ids = jnp.zeros((1, shape.seq), jnp.int32)
    shapes = nn.unbox(jax.eval_shape(lora_model.init, jax.random.key(0), ids)["params"])
    base = {_path(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    init_a = jax.nn.initializers.he_uniform()  # qwix.LoraRule's default lora_a_initializer
    keys = iter(jax.random.split(jax.random.key(1), 4 * shape.n_layer))

    def leaf(path: tuple, s: jax.ShapeDtypeStruct) -> jax.Array:
        name = _path(path)
        if name.endswith("_lora_a"):
            return init_a(next(keys), s.shape, s.dtype)
        if name.endswith("_lora_b"):
            return jnp.zeros(s.shape, s.dtype)
        return base[name]

    full = jax.tree_util.tree_map_with_path(leaf, shapes)
    adapters = sum(1 for k, _ in jax.tree_util.tree_flatten_with_path(full)[0] if _path(k).endswith("_lora_a"))
    if adapters != 4 * shape.n_layer:
        raise RuntimeError(f"qwix adapted {adapters} kernels, expected {4 * shape.n_layer}: check module_path")
    return lora_model, full


def _split(params: dict) -> tuple[dict, dict]:
    """(trainable: the LoRA params and the head, frozen: everything else), as flat {path: array} dicts."""
    flat = {_path(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    trains = re.compile(r".*(_lora_a|_lora_b)$|head/kernel")
    trainable = {k: v for k, v in flat.items() if trains.fullmatch(k)}
    return trainable, {k: v for k, v in flat.items() if k not in trainable}


def _nest(flat: dict) -> dict:
    out: dict = {}
    for path, value in flat.items():
        *parents, last = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def gpt2_qwix(profile: Profile) -> dict[str, Any]:
    """The r16 LoRA step with qwix: value_and_grad over qwix's LoRA params + head, AdamW, donated state."""
    shape = profile.gpt2
    model, params = jax_worker._gpt2(shape)
    lora_model, full = _qwix_params(model, params, shape, GPT2_LORA["r16"]["rank"])
    del params
    trainable, frozen = _split(full)
    del full
    probe_name = next(k for k in frozen if k.endswith("attn/c_attn/kernel"))
    probe_before = np.array(frozen[probe_name], copy=True)
    tx = jax_worker._gpt2_tx()

    def step(trainable, opt_state, frozen, x, y):
        def loss_fn(trainable):
            logits = lora_model.apply({"params": _nest({**frozen, **trainable})}, x)
            return jax_worker._cross_entropy(logits, y)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    state = [trainable, tx.init(trainable)]
    b_before = {k: float(jnp.abs(v).max()) for k, v in trainable.items() if k.endswith("_lora_b")}
    common.mark_setup_done()
    result = jax_worker._train_result(
        jax.jit(step, donate_argnums=(0, 1)),
        state,
        (frozen,),
        jax_worker._gpt2_batches(shape, profile.loss_batches),
        profile,
        common.gpt2_flops(shape, "lora", "r16"),
        steps=profile.steps,
        repeats=profile.repeats,
    )
    # The frozen base must not move, and the adapters must: B starts at zero and the steps train it.
    base_change = float(np.abs(np.asarray(frozen[probe_name]) - probe_before).max())
    b_moved = sum(float(jnp.abs(state[0][k]).max()) > v for k, v in b_before.items())
    if b_moved != len(b_before):
        raise RuntimeError(f"only {b_moved} of {len(b_before)} qwix lora_b params changed in training")
    return {
        **result,
        "frozen_base_max_change": base_change,
        "adapters_trained": b_moved,
        "trainable_params": jax_worker._count(state[0]),
        "lorax_note": f"qwix {importlib.metadata.version('qwix')}; frozen base max |dW| {base_change:.2g}",
    }


RUNNERS: dict[str, Callable[[Profile], dict[str, Any]]] = {"qwix_gpt2_lora_r16": gpt2_qwix}

if __name__ == "__main__":
    common.run_worker(RUNNERS)
