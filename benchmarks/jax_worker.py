"""The jax configurations: jaxlora (factored, merged, bf16 base), full fine-tuning, inference, merge, MLPs, matmul.

Run by `benchmarks/run.py`, one configuration per process:
`python -m benchmarks.jax_worker --profile full --result out.json jax_gpt2_lora_r16`.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dataclasses
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlora
from benchmarks import common
from benchmarks.common import GPT2_LORA, GPT2Shape, Profile
from jaxlora.models import GPT2Classifier, GPT2Config

# --------------------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------------------


def _block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def _xla_flops(compiled: Any) -> float | None:
    """XLA's own FLOP count of a compiled executable (a cross-check of the analytic count)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    flops = (cost or {}).get("flops")
    return float(flops) if flops is not None else None


# Seconds of the latest `_compile` spent tracing + lowering to StableHLO, and in XLA's compiler.
COMPILE_SPLIT: dict[str, float] = {}


def _compile(fn: Callable, *args: Any) -> tuple[Any, float, float | None]:
    """(compiled executable, seconds to trace + lower + compile, XLA FLOPs)."""
    start = time.perf_counter()
    lowered = fn.lower(*args)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    end = time.perf_counter()
    COMPILE_SPLIT.update(trace_lower_s=lowered_at - start, xla_compile_s=end - lowered_at)
    return compiled, end - start, _xla_flops(compiled)


def _step_memory(compiled: Any) -> dict[str, int]:
    """XLA's compiled memory of a step: arguments + outputs + temporaries - donated (aliased) bytes."""
    try:
        mem = compiled.memory_analysis()
        sizes = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    except Exception:
        return {}
    peak = sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]
    return {"step_peak_bytes": peak, "step_temp_bytes": sizes["temp"], "step_argument_bytes": sizes["argument"]}


def _count(tree: Any) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def _train_result(
    step: Callable,
    state: list[Any],
    constants: tuple[Any, ...],
    batches: list[tuple[jax.Array, jax.Array]],
    profile: Profile,
    model_flops: int,
    *,
    steps: int,
    repeats: int,
) -> dict[str, Any]:
    """Compiles `step(*state, *constants, x, y) -> (*state, loss)`, then times it, keeping every loss.

    `step` donates its state, so each call consumes the previous state and the next call uses the result.
    """
    n_state = len(state)
    common.mark_setup_done()
    rss_before_compile = common.peak_rss_mb()
    compiled, compile_s, xla_flops = _compile(step, *state, *constants, *batches[0])
    rss_after_compile = common.peak_rss_mb()
    losses: list[jax.Array] = []

    def one() -> Any:
        x, y = batches[len(losses) % len(batches)]
        *new_state, loss = compiled(*state, *constants, x, y)
        state[:n_state] = new_state
        losses.append(loss)
        return new_state, loss

    timing = common.time_steps(one, _block, warmup=profile.warmup, steps=steps, repeats=repeats)
    return {
        **common.throughput(timing, model_flops),
        **_step_memory(compiled),
        "compile_s": compile_s,
        "xla_gflop": None if xla_flops is None else xla_flops / 1e9,
        "losses": common.finite_losses(losses),
        "compile_split": dict(COMPILE_SPLIT),
        "peak_rss_before_compile_mb": rss_before_compile,
        "peak_rss_after_compile_mb": rss_after_compile,
    }


# --------------------------------------------------------------------------------------------------------------
# GPT-2
# --------------------------------------------------------------------------------------------------------------


def _gpt2(shape: GPT2Shape, scan_layers: bool = False) -> tuple[GPT2Classifier, dict]:
    config = GPT2Config(
        scan_layers=scan_layers,
        vocab_size=shape.vocab,
        n_positions=max(1024 if shape.n_embd >= 768 else 64, shape.seq),
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        dropout=0.0,
    )
    model = GPT2Classifier(config, num_classes=shape.classes)
    ids = jnp.zeros((1, shape.seq), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    rng = np.random.default_rng(0)

    def leaf(path: tuple, s: jax.ShapeDtypeStruct) -> jax.Array:
        # Filled one leaf at a time with numpy, so the process holds the weights and nothing more, as after
        # loading a checkpoint (jitted flax init would peak at several times the model size in RNG temporaries).
        name = getattr(path[-1], "key", "")
        if name == "scale":
            return jnp.ones(s.shape, s.dtype)
        if name == "bias":
            return jnp.zeros(s.shape, s.dtype)
        return jnp.asarray(rng.standard_normal(s.shape, dtype=np.float32) * np.float32(0.02), s.dtype)

    return model, jax.tree_util.tree_map_with_path(leaf, shapes)


def _gpt2_batches(shape: GPT2Shape, count: int) -> list[tuple[jax.Array, jax.Array]]:
    rng = np.random.default_rng(0)
    return [
        (
            jnp.asarray(rng.integers(0, shape.vocab - 1, (shape.batch, shape.seq)), jnp.int32),
            jnp.asarray(rng.integers(0, shape.classes, (shape.batch,)), jnp.int32),
        )
        for _ in range(count)
    ]


def gpt2_lora_config(variant: str, scan_layers: bool = False) -> jaxlora.LoraConfig:
    """The jaxlora config of a GPT-2 LoRA variant; the new classifier head trains in full, as in PEFT's SEQ_CLS.

    With `scan_layers` the blocks are stacked under "h" and each stacked layer gets its own adapter."""
    spec = GPT2_LORA[variant]
    modules = "|".join(spec["modules"])
    blocks = "h" if scan_layers else r"h_\d+"
    return jaxlora.LoraConfig(
        rank=spec["rank"],
        alpha=spec["alpha"],
        targets=(rf"{blocks}/({modules})/kernel",),
        stacked_axes={r"h/.*": 1} if scan_layers else {},
        modules_to_save=(r"head/kernel",),
    )


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def _gpt2_tx() -> optax.GradientTransformation:
    return optax.adamw(common.GPT2_LR, weight_decay=common.GPT2_WEIGHT_DECAY)


def _full_step(model: nn.Module, tx: optax.GradientTransformation) -> Callable:
    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: _cross_entropy(model.apply({"params": p}, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def _lora_step(model: nn.Module, cfg: jaxlora.LoraConfig, tx: optax.GradientTransformation, mode: str) -> Callable:
    def step(trainable, opt_state, frozen, x, y):
        def loss_fn(trainable):
            params, adapters = jaxlora.combine(trainable, frozen)
            if mode == "merged":  # W + s·A B formed inside the step, for any model
                logits = model.apply({"params": jaxlora.merge(params, adapters, cfg)}, x)
            else:
                logits = jaxlora.apply(model, {"params": params}, adapters, cfg, x)
            return _cross_entropy(logits, y)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def gpt2_full(profile: Profile) -> dict[str, Any]:
    """Full fine-tuning of every weight with plain flax autodiff."""
    shape = profile.gpt2
    model, params = _gpt2(shape)
    tx = _gpt2_tx()
    state = [params, tx.init(params)]
    result = _train_result(
        _full_step(model, tx),
        state,
        (),
        _gpt2_batches(shape, profile.loss_batches),
        profile,
        common.gpt2_flops(shape, "full"),
        steps=profile.steps,
        repeats=profile.repeats,
    )
    return {**result, "trainable_params": _count(params), "total_params": _count(params)}


def _gpt2_lora_train(profile: Profile, cfg: jaxlora.LoraConfig, variant: str | None, **kw: Any) -> dict[str, Any]:
    shape = profile.gpt2
    model, params = _gpt2(shape, kw.pop("scan_layers", False))
    plan = jaxlora.plan(params, cfg)
    params, adapters = jaxlora.init(jax.random.key(1), params, plan)
    quantized = kw.pop("quantized", None)
    if quantized is not None:  # QLoRA: the adapted kernels stored as NF4 / int8, dequantized inside the step
        params = jaxlora.quantization.quantize(params, plan, kind=quantized, embeddings=True)
    trainable, frozen = jaxlora.partition(params, adapters, plan)
    counts = {
        "trainable_params": _count(trainable),
        "total_params": _count(params) + _count(adapters),
        "frozen_bytes": sum(jaxlora.quantization.nbytes(x) for x in jax.tree.leaves(frozen)),
    }
    del params, adapters  # the trainable and frozen halves hold everything the step needs
    base_dtype = kw.pop("base_dtype", None)
    if base_dtype is not None:
        frozen = jax.tree.map(lambda x: x.astype(base_dtype), frozen)  # the float32 base is freed here
    tx = jaxlora.optimizer(_gpt2_tx(), cfg)
    state = [trainable, tx.init(trainable)]
    flops = common.gpt2_flops(shape, "lora", variant) if variant else common.gpt2_flops(shape, "full")
    result = _train_result(
        _lora_step(model, cfg, tx, kw.pop("mode", "factored")),
        state,
        (frozen,),
        _gpt2_batches(shape, profile.loss_batches),
        profile,
        flops,
        steps=profile.steps,
        repeats=profile.repeats,
    )
    return {**result, **counts}


def gpt2_full_jaxlora(profile: Profile) -> dict[str, Any]:
    """Full fine-tuning through jaxlora.apply: every weight in modules_to_save, so each Dense runs jaxlora's
    hand-written backward pass (with dW). A rank-1 adapter on the 2-column head is the one adapter a
    config needs; it adds (768 + 2) parameters."""
    cfg = jaxlora.LoraConfig(rank=1, alpha=1.0, targets=(r"head/kernel",), modules_to_save=(r"(?!head/kernel$).*",))
    return _gpt2_lora_train(profile, cfg, None)


def gpt2_lora(variant: str, **kw: Any) -> Callable[[Profile], dict[str, Any]]:
    config = gpt2_lora_config(variant, kw.get("scan_layers", False))
    return lambda profile: _gpt2_lora_train(profile, config, variant, **dict(kw))


# --- inference ------------------------------------------------------------------------------------------------


def _perturbed_adapters(adapters: dict) -> dict:
    """Adapters with a non-zero B, so the merged and unmerged paths compute something to compare."""
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    return jax.tree.unflatten(
        tree, [x + 0.01 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)]
    )


def gpt2_infer(kind: str) -> Callable[[Profile], dict[str, Any]]:
    def run(profile: Profile) -> dict[str, Any]:
        shape = profile.gpt2
        model, params = _gpt2(shape)
        cfg = gpt2_lora_config("r16")
        params, adapters = jaxlora.init(jax.random.key(1), params, cfg)
        adapters = _perturbed_adapters(adapters)
        x = _gpt2_batches(shape, 1)[0][0]
        forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
        extra: dict[str, Any] = {}
        if kind == "base":
            fn, args, flops = forward, (params, x), common.gpt2_flops(shape, "infer")
        elif kind == "merged":
            merged = jaxlora.merge(params, adapters, cfg)
            fn, args, flops = forward, (merged, x), common.gpt2_flops(shape, "infer")
        else:
            fn = jax.jit(lambda p, a, x: jaxlora.apply(model, {"params": p}, a, cfg, x))
            args, flops = (params, adapters, x), common.gpt2_flops(shape, "infer", "r16")
        common.mark_setup_done()
        compiled, compile_s, xla_flops = _compile(fn, *args)
        if kind == "unmerged":
            # The factored and merged paths must agree (same adapters, same input).
            merged_out = forward(jaxlora.merge(params, adapters, cfg), x)
            extra["max_abs_diff_vs_merged"] = float(jnp.max(jnp.abs(compiled(*args) - merged_out)))
        timing = common.time_steps(
            lambda: compiled(*args), _block, warmup=max(profile.warmup, 1), steps=profile.steps, repeats=profile.repeats
        )
        return {
            **common.throughput(timing, flops),
            "compile_s": compile_s,
            "xla_gflop": None if xla_flops is None else xla_flops / 1e9,
            **extra,
        }

    return run


# --- several adapters in one batch ----------------------------------------------------------------------------


MULTI_ADAPTER_SLOTS = 4


def _side_by_side(fns: dict[str, Callable[[], Any]], profile: Profile) -> dict[str, dict[str, Any]]:
    """Seconds per call of each function, timed in alternating blocks (so a load change hits all of them alike)."""
    for fn in fns.values():
        for _ in range(max(profile.warmup, 1)):
            _block(fn())
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(profile.repeats, 3)):
        for name, fn in fns.items():
            start = time.perf_counter()
            out = None
            for _ in range(profile.steps):
                out = fn()
            _block(out)
            samples[name].append((time.perf_counter() - start) / profile.steps)
    return {name: common.summarize(values) for name, values in samples.items()}


def gpt2_multi_adapter(profile: Profile) -> dict[str, Any]:
    """A batch whose rows use 4 different r16 adapters (one jaxlora.apply_bank call) vs the same batch with one
    adapter (jaxlora.apply): forward and training step (Adam on the adapters), timed side by side in one process."""
    shape = profile.gpt2
    model, params = _gpt2(shape)
    cfg = dataclasses.replace(gpt2_lora_config("r16"), modules_to_save=())
    plan = jaxlora.plan(params, cfg)
    sets = []
    for i in range(MULTI_ADAPTER_SLOTS):
        _, adapters = jaxlora.init(jax.random.key(10 + i), params, plan)
        sets.append((_perturbed_adapters(adapters), plan))
    bank = jaxlora.adapter_bank(sets)
    ids = jnp.arange(shape.batch, dtype=jnp.int32) % MULTI_ADAPTER_SLOTS
    single = sets[0][0]
    x, y = _gpt2_batches(shape, 1)[0]
    tx = optax.adam(1e-4)

    mixed_forward = jax.jit(lambda p, bank, ids, x: jaxlora.apply_bank(model, {"params": p}, bank, ids, x))
    single_forward = jax.jit(lambda p, a, x: jaxlora.apply(model, {"params": p}, a, plan, x))

    @jax.jit
    def mixed_step(bank, state, p, ids, x, y):
        loss, grads = jax.value_and_grad(
            lambda b: _cross_entropy(jaxlora.apply_bank(model, {"params": p}, b, ids, x), y)
        )(bank)
        updates, state = tx.update(grads, state, bank)
        return optax.apply_updates(bank, updates), state, loss

    @jax.jit
    def single_step(adapters, state, p, x, y):
        loss, grads = jax.value_and_grad(lambda a: _cross_entropy(jaxlora.apply(model, {"params": p}, a, plan, x), y))(
            adapters
        )
        updates, state = tx.update(grads, state, adapters)
        return optax.apply_updates(adapters, updates), state, loss

    # Each row's logits must equal running it alone with its adapter merged.
    mixed_logits = mixed_forward(params, bank, ids, x)
    worst = 0.0
    for row in range(shape.batch):
        merged = jaxlora.merge(params, *sets[int(ids[row])])
        alone = model.apply({"params": merged}, x[row : row + 1])[0]
        worst = max(worst, float(jnp.max(jnp.abs(mixed_logits[row] - alone))))
    bank_state, single_state = tx.init(bank), tx.init(single)
    timings = _side_by_side(
        {
            "forward_mixed": lambda: mixed_forward(params, bank, ids, x),
            "forward_single": lambda: single_forward(params, single, x),
            "train_mixed": lambda: mixed_step(bank, bank_state, params, ids, x, y),
            "train_single": lambda: single_step(single, single_state, params, x, y),
        },
        profile,
    )
    ratio = lambda a, b: timings[a]["median"] / timings[b]["median"]
    single_bytes = sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(single))
    return {
        "step_s": timings["train_mixed"],
        "timings": timings,
        "forward_ratio_mixed_vs_single": ratio("forward_mixed", "forward_single"),
        "train_ratio_mixed_vs_single": ratio("train_mixed", "train_single"),
        "max_abs_diff_vs_rows_merged": worst,
        "slots": MULTI_ADAPTER_SLOTS,
        "bank_bytes": bank.num_bytes,
        "one_adapter_bytes": single_bytes,
    }


# --- merge and adapter files ----------------------------------------------------------------------------------


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _save_adapter_files(trainable: dict, adapters: dict, cfg: jaxlora.LoraConfig, params: dict) -> dict[str, Any]:
    """Bytes on disk of the r16 adapter (+ trained head): orbax, safetensors, and jaxlora's writers if present."""
    import orbax.checkpoint as ocp
    from safetensors.numpy import save_file

    from jaxlora._src.paths import leaves_with_paths

    sizes: dict[str, Any] = {}
    saved = {"lora": adapters, "head": trainable["params"]["head"]}
    root = Path(tempfile.mkdtemp(prefix="jaxlora_bench_"))
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(root / "orbax", saved)
        checkpointer.wait_until_finished()
        sizes["orbax_standard_bytes"] = _dir_bytes(root / "orbax")
        flat = {path: np.asarray(leaf) for path, leaf in leaves_with_paths(saved)}
        save_file(flat, str(root / "adapter.safetensors"))
        sizes["safetensors_bytes"] = _dir_bytes(root / "adapter.safetensors")
        sizes["tensor_bytes"] = sum(v.nbytes for v in flat.values())
        sizes.update(_jaxlora_writers(root, params, adapters, cfg))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return sizes


def _jaxlora_writers(root: Path, params: dict, adapters: dict, cfg: jaxlora.LoraConfig) -> dict[str, Any]:
    """Bytes written by jaxlora's own writers (orbax adapter checkpoint, PEFT directory), or why not measured."""
    out: dict[str, Any] = {}
    try:
        from jaxlora.checkpoint import save_adapter

        out["jaxlora_checkpoint_bytes"] = _dir_bytes(save_adapter(root / "jaxlora_ckpt", params, adapters, cfg))
    except Exception as err:
        out["jaxlora_checkpoint_bytes"] = f"not measured: {type(err).__name__}: {err}"
    try:
        from jaxlora.models.gpt2 import PEFT_NAME_MAP
        from jaxlora.peft_format import save_peft

        directory = save_peft(root / "peft", params, adapters, cfg, name_map=PEFT_NAME_MAP, task_type="SEQ_CLS")
        out["jaxlora_peft_bytes"] = _dir_bytes(Path(directory))
    except Exception as err:
        out["jaxlora_peft_bytes"] = f"not measured: {type(err).__name__}: {err}"
    return out


def gpt2_merge(profile: Profile) -> dict[str, Any]:
    """Jitted jaxlora.merge of the r16 adapter (plain and with the params donated), eager merge, adapter files."""
    shape = profile.gpt2
    _, params = _gpt2(shape)
    cfg = gpt2_lora_config("r16")
    params, adapters = jaxlora.init(jax.random.key(1), params, cfg)
    adapters = _perturbed_adapters(adapters)
    repeats = max(profile.repeats, profile.small_repeats)
    common.mark_setup_done()

    merge = jax.jit(lambda p, a: jaxlora.merge(p, a, cfg))
    compiled, compile_s, _ = _compile(merge, params, adapters)
    plain = common.time_steps(lambda: compiled(params, adapters), _block, warmup=1, steps=1, repeats=repeats)

    start = time.perf_counter()
    _block(jaxlora.merge(params, adapters, cfg))
    eager_s = time.perf_counter() - start

    trainable, _ = jaxlora.partition(params, adapters, cfg)
    files = _save_adapter_files(trainable, adapters, cfg, params)

    donated = jax.jit(lambda p, a: jaxlora.merge(p, a, cfg), donate_argnums=0)
    state = [jax.tree.map(jnp.copy, params)]
    compiled_donated = donated.lower(state[0], adapters).compile()

    def merge_in_place() -> Any:
        state[0] = compiled_donated(state[0], adapters)
        return state[0]

    in_place = common.time_steps(merge_in_place, _block, warmup=1, steps=1, repeats=repeats)
    adapted = jaxlora.plan(params, cfg).leaves.values()
    return {
        "step_s": plain,
        "donated_s": in_place,
        "eager_s": eager_s,
        "compile_s": compile_s,
        "adapted_weight_bytes": sum(4 * math.prod(leaf.shape) for leaf in adapted),
        "lora_params": jaxlora.count_params(adapters),
        "files": files,
    }


# --------------------------------------------------------------------------------------------------------------
# MNIST MLP and the regression model
# --------------------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Dense layers of the given widths with ReLU between them."""

    widths: tuple[int, ...]
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for k, width in enumerate(self.widths[1:]):
            x = nn.Dense(width, use_bias=self.use_bias)(x)
            if k < len(self.widths) - 2:
                x = nn.relu(x)
        return x


def _small_model(model: str) -> tuple[MLP, Callable[[jax.Array, jax.Array], jax.Array]]:
    if model == "mnist":
        return MLP(common.MLP_LAYERS), _cross_entropy
    return MLP(common.REGRESSION_LAYERS, use_bias=False), lambda out, y: jnp.mean((out - y) ** 2)


def _small_batches(model: str, widths: tuple[int, ...], batch: int, count: int) -> list:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        x = jnp.asarray(rng.standard_normal((batch, widths[0])), jnp.float32)
        if model == "mnist":
            y = jnp.asarray(rng.integers(0, widths[-1], (batch,)), jnp.int32)
        else:
            y = jnp.asarray(rng.standard_normal((batch, widths[-1])), jnp.float32)
        out.append((x, y))
    return out


def small(model: str, batch: int, mode: str) -> Callable[[Profile], dict[str, Any]]:
    def run(profile: Profile) -> dict[str, Any]:
        net, loss = _small_model(model)
        batches = _small_batches(model, net.widths, batch, profile.loss_batches)
        params = jax.jit(net.init)(jax.random.key(0), batches[0][0])["params"]
        tx = optax.adamw(common.SMALL_LR, weight_decay=common.SMALL_WEIGHT_DECAY)
        flops = common.mlp_flops(net.widths, batch, mode)
        kw = dict(steps=profile.small_steps, repeats=profile.small_repeats)
        if mode == "full":

            def full_step(params, opt_state, x, y):
                value, grads = jax.value_and_grad(lambda p: loss(net.apply({"params": p}, x), y))(params)
                updates, opt_state = tx.update(grads, opt_state, params)
                return optax.apply_updates(params, updates), opt_state, value

            step = jax.jit(full_step, donate_argnums=(0, 1))
            result = _train_result(step, [params, tx.init(params)], (), batches, profile, flops, **kw)
            return {**result, "trainable_params": _count(params)}
        cfg = jaxlora.LoraConfig(rank=1, alpha=1.0, targets=(jaxlora.ALL_KERNELS,))
        params, adapters = jaxlora.init(jax.random.key(1), params, cfg)
        trainable, frozen = jaxlora.partition(params, adapters, cfg)
        lora_tx = jaxlora.optimizer(tx, cfg)

        def lora_step(trainable, opt_state, frozen, x, y):
            def loss_fn(trainable):
                params, adapters = jaxlora.combine(trainable, frozen)
                return loss(jaxlora.apply(net, {"params": params}, adapters, cfg, x), y)

            value, grads = jax.value_and_grad(loss_fn)(trainable)
            updates, opt_state = lora_tx.update(grads, opt_state, trainable)
            return optax.apply_updates(trainable, updates), opt_state, value

        step = jax.jit(lora_step, donate_argnums=(0, 1))
        result = _train_result(step, [trainable, lora_tx.init(trainable)], (frozen,), batches, profile, flops, **kw)
        return {**result, "trainable_params": _count(trainable)}

    return run


# --------------------------------------------------------------------------------------------------------------
# The ceiling: float32 matmuls of the shapes involved
# --------------------------------------------------------------------------------------------------------------


def matmul(profile: Profile) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    product = jax.jit(jnp.matmul)
    shapes = {}
    for m, k, n in common.matmul_shapes(profile.gpt2):
        a = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        b = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
        timing = common.time_steps(
            lambda a=a, b=b: product(a, b),
            _block,
            warmup=1,
            steps=common.matmul_calls(m, k, n),
            repeats=profile.matmul_repeats,
        )
        shapes[f"{m}x{k}x{n}"] = {"step_s": timing, "gflops": 2 * m * k * n / timing["median"] / 1e9}
    best = max(s["gflops"] for s in shapes.values())
    return {"shapes": shapes, "gflops": best}


RUNNERS: dict[str, Callable[[Profile], dict[str, Any]]] = {
    "jax_gpt2_full": gpt2_full,
    "jax_gpt2_full_jaxlora": gpt2_full_jaxlora,
    "jax_gpt2_lora_r16": gpt2_lora("r16"),
    "jax_gpt2_lora_r8": gpt2_lora("r8"),
    "jax_gpt2_lora_r16_merged": gpt2_lora("r16", mode="merged"),
    "jax_gpt2_lora_r16_scanned": gpt2_lora("r16", scan_layers=True),
    "jax_gpt2_lora_r16_dora": lambda profile: _gpt2_lora_train(
        profile, dataclasses.replace(gpt2_lora_config("r16"), use_dora=True), "r16"
    ),
    "jax_gpt2_lora_r16_nf4": gpt2_lora("r16", quantized="nf4"),
    "jax_gpt2_lora_r16_bf16": gpt2_lora("r16", base_dtype=jnp.bfloat16),
    "jax_gpt2_infer_base": gpt2_infer("base"),
    "jax_gpt2_infer_unmerged": gpt2_infer("unmerged"),
    "jax_gpt2_infer_merged": gpt2_infer("merged"),
    "jax_gpt2_merge": gpt2_merge,
    "jax_gpt2_multi_adapter": gpt2_multi_adapter,
    "jax_matmul": matmul,
}
for _model, _batches in (("mnist", common.MLP_BATCHES), ("regression", (common.REGRESSION_BATCH,))):
    for _batch in _batches:
        for _mode in ("full", "lora"):
            RUNNERS[f"jax_{_model}_b{_batch}_{_mode}"] = small(_model, _batch, _mode)

# --- serving several adapters (issue 18): benchmarks/multi_adapter_serving.py ---
from benchmarks import multi_adapter_serving  # noqa: E402

RUNNERS["jax_gpt2_multi_adapter_prefill"] = multi_adapter_serving.prefill
RUNNERS["jax_gpt2_multi_adapter_decode"] = multi_adapter_serving.decode


if __name__ == "__main__":
    common.run_worker(RUNNERS)
