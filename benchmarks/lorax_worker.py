"""The lorax peer (`pip install jax-lorax`): GPT-2 LoRA r16 through `lorax.lora(model.apply)`.

jax-lorax 0.3.1 pins jax<0.5, so it usually runs from its own environment (`run.py --lorax-python`); there the
same process also times jaxlora's r16 step, so the two are compared on the same jax. When lorax cannot be
imported, both configurations report why ("unavailable", with the exact error).
"""

from __future__ import annotations

import importlib.metadata
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from benchmarks import common
from benchmarks.common import GPT2_LORA, Profile, Unavailable


def _import_lorax():
    """lorax, or Unavailable with the import error and the jax range the installed jax-lorax declares."""
    try:
        import lorax
    except Exception as err:
        try:
            pins = [r for r in importlib.metadata.requires("jax-lorax") or [] if r.startswith(("jax", "qax"))]
            declared = f"; installed jax-lorax {importlib.metadata.version('jax-lorax')} requires {pins}"
        except importlib.metadata.PackageNotFoundError:
            declared = "; jax-lorax is not installed in this environment"
        raise Unavailable(
            f"import lorax failed under jax {jax.__version__}: {type(err).__name__}: {err}{declared}"
        ) from err
    return lorax


def gpt2_lorax(profile: Profile) -> dict[str, Any]:
    """The r16 LoRA step with lorax: `lorax.lora` over the flax apply, lorax's wrapped AdamW, head trained."""
    lorax = _import_lorax()
    from benchmarks import jax_worker

    shape = profile.gpt2
    model, params = jax_worker._gpt2(shape)
    spec_r16 = GPT2_LORA["r16"]
    adapted = re.compile(rf"h_\d+/({'|'.join(spec_r16['modules'])})/kernel")

    def decision(path: tuple, leaf: Any) -> int:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if adapted.fullmatch(name):
            return spec_r16["rank"]
        return lorax.LORA_FULL if name == "head/kernel" else lorax.LORA_FREEZE

    spec = lorax.simple_spec(params, decision_fn=decision, tune_vectors=False)
    lora_params = lorax.init_lora(params, spec, jax.random.key(1), alpha=spec_r16["alpha"])
    tx = lorax.wrap_optimizer(optax.adamw(common.GPT2_LR, weight_decay=common.GPT2_WEIGHT_DECAY), spec)
    lora_apply = lorax.lora(model.apply)
    is_lora = lambda x: isinstance(x, lorax.LoraWeight)
    first_w = np.array(next(x.w for x in jax.tree.leaves(lora_params, is_leaf=is_lora) if is_lora(x)), copy=True)

    def step(lora_params, opt_state, x, y):
        def loss_fn(p):
            return jax_worker._cross_entropy(lora_apply({"params": p}, x), y)

        loss, grads = jax.value_and_grad(loss_fn)(lora_params)
        updates, opt_state = tx.update(grads, opt_state, lora_params)
        return optax.apply_updates(lora_params, updates), opt_state, loss

    state = [lora_params, tx.init(lora_params)]
    result = jax_worker._train_result(
        jax.jit(step, donate_argnums=(0, 1)),
        state,
        (),
        jax_worker._gpt2_batches(shape, profile.loss_batches),
        profile,
        common.gpt2_flops(shape, "lora", "r16"),
        steps=profile.steps,
        repeats=profile.repeats,
    )
    note = f"jax {jax.__version__}, jax-lorax {importlib.metadata.version('jax-lorax')}"
    # lorax is meant to keep each LoraWeight's w frozen; check that its optimizer really left it alone.
    trained_w = np.asarray(next(x.w for x in jax.tree.leaves(state[0], is_leaf=is_lora) if is_lora(x)))
    base_change = float(np.abs(trained_w - first_w).max())
    if base_change > 0:
        note += f"; NB: lorax's optimizer changed the frozen base W (max |dW| {base_change:.2g})"
    trainable = sum(
        x.a.size + x.b.size if isinstance(x, lorax.LoraWeight) else x.size if s == lorax.LORA_FULL else 0
        for x, s in zip(
            jax.tree.leaves(lora_params, is_leaf=lambda x: isinstance(x, lorax.LoraWeight)),
            jax.tree.leaves(spec),
            strict=True,
        )
    )
    return {
        **result,
        "jax_version": jax.__version__,
        "lorax_note": note,
        "frozen_base_max_change": base_change,
        "trainable_params": int(trainable),
    }


def gpt2_jaxlora_same_env(profile: Profile) -> dict[str, Any]:
    """jaxlora's r16 step in lorax's environment (its jax), the like-for-like partner of `gpt2_lorax`."""
    _import_lorax()
    from benchmarks import jax_worker

    result = jax_worker.gpt2_lora("r16")(profile)
    return {**result, "jax_version": jax.__version__, "lorax_note": f"jax {jax.__version__} (lorax's environment)"}


RUNNERS: dict[str, Callable[[Profile], dict[str, Any]]] = {
    "lorax_gpt2_lora_r16": gpt2_lorax,
    "lorax_env_jaxlora_r16": gpt2_jaxlora_same_env,
}

if __name__ == "__main__":
    common.run_worker(RUNNERS)
