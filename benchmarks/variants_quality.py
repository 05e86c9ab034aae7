"""QLoRA quality: the spam recipe's first steps on an NF4 base against the float32 base, same init and batches.

    python -m benchmarks.variants_quality --data-dir DIR --bpe-dir DIR     # the offline GPT-2 of the example
    python -m benchmarks.variants_quality --pretrained runs/gpt2_spam/pretrained ...   # reuse its base
    python -m benchmarks.variants_quality --quick                          # tiny model, seconds (tests)
    python -m benchmarks.variants_quality --inits ...                      # LoftQ vs kaiming on the NF4 base

The base is the example's offline GPT-2 (`examples/gpt2_spam.py --offline-pretrain`: pretrained here on the
training texts, or restored with --pretrained). LoRA r16 on every block linear, the head trained in full, AdamW at
the example's learning rate, batch 8: `--steps` steps (default 50) from the same adapter init over the same
batches, once on the float32 base and once on the base quantized to NF4 (`jaxlora.quantization.quantize(...,
kind="nf4", embeddings=True)`: every block kernel and both embedding tables; LayerNorms and biases stay float).
The result names the loss of both runs (the mean of the last `--window` training losses and the validation loss),
the tolerance they are judged by and whether it holds, and each quantized leaf's relative error ‖W - Q(W)‖/‖W‖.

With `--inits`, the comparison is of initialisations on the NF4 base instead: the float32 base with kaiming adapters
(the reference), the NF4 base with kaiming adapters (QLoRA), and LoftQ (`LoraConfig(init="loftq")`: the block
kernels' NF4 codes and the adapters chosen together, `--loftq-iter` steps each; the embedding tables quantized as in
the kaiming run), same batches. For each NF4 run it reports the gap to the float32 run's validation loss before
training and after `--steps` steps, the gap of the mean last training losses, and, for the start itself (the
quantization error the init leaves), the gap of the base's causal-LM loss on the validation texts (Q + s·A B merged,
the classifier head left out: the "before" classification loss is dominated by the new random head) and the mean
‖W - (Q + s·A B)‖/‖W‖ over the block kernels.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlora
from jaxlora import quantization
from jaxlora._src.paths import leaves_with_paths
from jaxlora.models import GPT2, GPT2Classifier

# The NF4 base's loss may differ from the float32 base's by at most ABS + REL x the float32 loss (in nats), for
# both the mean of the last training losses and the validation loss. QLoRA reports NF4 matching 16-bit bases.
LOSS_ATOL, LOSS_RTOL = 0.02, 0.05


def _example():
    """examples/gpt2_spam.py, imported from the repository (benchmarks may use the examples; the library never)."""
    root = Path(__file__).resolve().parents[1]
    if str(root / "examples") not in sys.path:
        sys.path.insert(0, str(root / "examples"))
    import gpt2_spam

    return gpt2_spam


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, help="SMSSpamCollection file or folder (default: download)")
    parser.add_argument("--bpe-dir", type=Path, help="folder with GPT-2's encoder.json and vocab.bpe")
    parser.add_argument("--pretrained", type=Path, help="a base saved by an earlier --offline-pretrain run")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--window", type=int, default=10, help="last training losses averaged")
    parser.add_argument("--eval-batches", type=int, default=20, help="validation batches (0: all)")
    parser.add_argument("--block-size", type=int, help="NF4 block (default 64; 16 with --quick, width 32)")
    parser.add_argument("--quick", action="store_true", help="the example's tiny model and data subset")
    parser.add_argument("--work", type=Path, default=Path("runs/variants_quality"), help="the base is saved here")
    parser.add_argument("--out", type=Path, help="write the result JSON here")
    parser.add_argument("--inits", action="store_true", help="compare LoftQ with kaiming on the NF4 base")
    parser.add_argument("--loftq-iter", type=int, nargs="+", default=[1, 5], help="LoftQ steps (one run each)")
    args = parser.parse_args(argv)
    if args.block_size is None:
        args.block_size = 16 if args.quick else quantization.DEFAULT_BLOCK_SIZE
    return args


def _recipe_args(args: argparse.Namespace) -> argparse.Namespace:
    argv = ["--offline-pretrain", "--out", str(args.work)]
    for flag, value in (("--data-dir", args.data_dir), ("--bpe-dir", args.bpe_dir), ("--pretrained", args.pretrained)):
        if value is not None:
            argv += [flag, str(value)]
    return _example().parse_args(argv + (["--quick"] if args.quick else []))


def train(
    recipe, model, plan, params, base, data, steps: int, eval_batches: int, adapters=None, before: bool = False
) -> dict[str, Any]:
    """`steps` recipe steps from `adapters` (default: those `jaxlora.init` makes with the recipe's key) on the base
    `base`; with `before`, also the validation loss of the initial model."""
    ex = _example()
    if adapters is None:
        _, adapters = jaxlora.init(jax.random.key(recipe.seed + 2), params, plan)
    trainable, frozen = jaxlora.partition(base, adapters, plan)
    tx = jaxlora.optimizer(optax.adamw(recipe.lr, weight_decay=recipe.weight_decay), plan)
    opt_state = tx.init(trainable)
    train_step, eval_step = ex.make_steps(model, plan, tx)
    initial = {}
    if before:
        val_batches = ex.batches(data["validation"], recipe.batch_size)
        initial["val_loss_before"], initial["val_acc_before"] = ex.evaluate(
            eval_step, trainable, frozen, val_batches, eval_batches or None
        )
    losses: list[float] = []
    rng, key = np.random.default_rng(recipe.seed), jax.random.key(recipe.seed + 3)
    start = time.perf_counter()
    while len(losses) < steps:
        for batch in ex.batches(data["train"], recipe.batch_size, rng):
            trainable, opt_state, loss = train_step(
                trainable, frozen, opt_state, batch.ids, batch.lengths, batch.labels, key
            )
            losses.append(float(loss))
            if len(losses) == steps:
                break
    seconds = time.perf_counter() - start
    val_loss, val_acc = ex.evaluate(
        eval_step, trainable, frozen, ex.batches(data["validation"], recipe.batch_size), eval_batches or None
    )
    return {"losses": losses, "val_loss": val_loss, "val_acc": val_acc, "train_s": seconds, **initial}


def _within(nf4: float, fp32: float) -> dict[str, Any]:
    allowed = LOSS_ATOL + LOSS_RTOL * abs(fp32)
    return {
        "float32": fp32,
        "nf4": nf4,
        "abs_diff": abs(nf4 - fp32),
        "allowed": allowed,
        "ok": abs(nf4 - fp32) <= allowed,
    }


def _setup(args: argparse.Namespace):
    """The recipe, its data, the classifier over the offline base (pretrained or restored), its params and plan."""
    ex = _example()
    recipe = _recipe_args(args)
    _, data = ex.gather_inputs(recipe)
    args.work.mkdir(parents=True, exist_ok=True)
    gpt_config, params, _ = ex.base_model(recipe, data["train"], {})
    gpt_config = dataclasses.replace(gpt_config, dropout=0.0)  # the recipe fine-tunes without dropout
    model = GPT2Classifier(gpt_config, num_classes=2)
    params = {**params, "head": ex.init_params(model, recipe.seed)["head"]}
    plan = jaxlora.plan(params, ex.lora_config(recipe.rank, recipe.alpha))
    return recipe, data, gpt_config, model, params, plan


def _reconstruction_error(params, base, adapters, plan) -> float:
    """Mean over the adapted kernels of ‖W - (dequantize(Q) + s·A B)‖ / ‖W‖ (Q: the base the run starts from)."""
    merged = dict(leaves_with_paths(jaxlora.merge(quantization.dequantize_params(base), adapters, plan)))
    floats = dict(leaves_with_paths(params))
    errors = [
        float(np.linalg.norm(np.asarray(floats[p]) - np.asarray(merged[p])) / np.linalg.norm(np.asarray(floats[p])))
        for p in plan.leaves
    ]
    return float(np.mean(errors))


def _lm_loss(gpt_config, params, split, batch_size: int, max_batches: int) -> float:
    """The base's causal-LM loss (nats per predicted token) on the first texts of `split`: how far a start's
    weights (Q + s·A B merged, the head left out) are from the pretrained language model."""
    ex = _example()
    lm = GPT2(gpt_config)
    body = {k: v for k, v in params.items() if k != "head"}

    @jax.jit
    def nll(ids, lengths):
        logits = lm.apply({"params": body}, ids)[:, :-1]
        targets = ids[:, 1:]
        real = jnp.arange(targets.shape[1])[None, :] < (lengths[:, None] - 1)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(jnp.where(real, losses, 0.0)), jnp.sum(real)

    total = count = 0.0
    for i, batch in enumerate(ex.batches(split, batch_size)):
        if i == max_batches:
            break
        loss, n = nll(jnp.asarray(batch.ids), jnp.asarray(batch.lengths))
        total, count = total + float(loss), count + float(n)
    return total / count


def run_inits(args: argparse.Namespace) -> dict[str, Any]:
    """Kaiming on the float32 base, kaiming on the NF4 base, and LoftQ (per --loftq-iter): gaps to float32."""
    recipe, data, gpt_config, model, params, plan = _setup(args)
    _, kaiming = jaxlora.init(jax.random.key(recipe.seed + 2), params, plan)
    nf4 = quantization.quantize(params, plan, kind="nf4", block_size=args.block_size, embeddings=True)
    starts = {"float32 + kaiming": (params, kaiming), "nf4 + kaiming": (nf4, kaiming)}
    for iterations in args.loftq_iter:
        config = dataclasses.replace(plan.config, init="loftq", loftq_iter=iterations, loftq_block_size=args.block_size)
        loftq_base, loftq_adapters = jaxlora.init(jax.random.key(recipe.seed + 2), params, jaxlora.plan(params, config))
        loftq_base = quantization.quantize(loftq_base, plan, kind="nf4", block_size=args.block_size, embeddings=True)
        starts[f"nf4 + loftq (loftq_iter={iterations})"] = (loftq_base, loftq_adapters)
    runs = {}
    for name, (base, adapters) in starts.items():
        runs[name] = train(recipe, model, plan, params, base, data, args.steps, args.eval_batches, adapters, True)
        runs[name]["init_reconstruction_error"] = _reconstruction_error(params, base, adapters, plan)
        merged = jaxlora.merge(quantization.dequantize_params(base), adapters, plan)
        runs[name]["lm_loss_at_init"] = _lm_loss(
            gpt_config, merged, data["validation"], recipe.batch_size, args.eval_batches or 10**9
        )
    window = min(args.window, args.steps)
    reference = runs["float32 + kaiming"]
    mean_last = {name: float(np.mean(r["losses"][-window:])) for name, r in runs.items()}
    gaps = {
        name: {
            "val_loss_gap_before": r["val_loss_before"] - reference["val_loss_before"],
            "val_loss_gap_after": r["val_loss"] - reference["val_loss"],
            f"last_{window}_train_loss_gap": mean_last[name] - mean_last["float32 + kaiming"],
            "init_reconstruction_error": r["init_reconstruction_error"],
            "lm_loss_gap_at_init": r["lm_loss_at_init"] - reference["lm_loss_at_init"],
        }
        for name, r in runs.items()
        if name != "float32 + kaiming"
    }
    return {
        "command": "python -m benchmarks.variants_quality " + " ".join(sys.argv[1:]),
        "base": f"offline GPT-2 of examples/gpt2_spam.py ({gpt_config.n_layer} layers, width {gpt_config.n_embd})",
        "recipe": {**_recipe(recipe, args), "eval_batches": args.eval_batches},
        "gaps_to_float32": gaps,
        "float32": {
            "val_loss_before": reference["val_loss_before"],
            "lm_loss_at_init": reference["lm_loss_at_init"],
            "val_loss_after": reference["val_loss"],
            f"mean_last_{window}_train_loss": mean_last["float32 + kaiming"],
        },
        "runs": runs,
    }


def _recipe(recipe: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The training recipe as the results files record it."""
    return {
        "rank": recipe.rank,
        "alpha": recipe.alpha,
        "lr": recipe.lr,
        "weight_decay": recipe.weight_decay,
        "batch_size": recipe.batch_size,
        "steps": args.steps,
        "nf4_block": args.block_size,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    recipe, data, gpt_config, model, params, plan = _setup(args)
    nf4 = quantization.quantize(params, plan, kind="nf4", block_size=args.block_size, embeddings=True)
    floats = dict(leaves_with_paths(params))
    errors = {
        p: quantization.relative_error(floats[p], q) for p, q in leaves_with_paths(nf4) if quantization.is_quantized(q)
    }
    frozen_bytes = {
        name: sum(quantization.nbytes(leaf) for p, leaf in leaves_with_paths(tree) if p not in plan.saved)
        for name, tree in (("float32", params), ("nf4", nf4))
    }
    runs = {
        name: train(recipe, model, plan, params, base, data, args.steps, args.eval_batches)
        for name, base in (("float32", params), ("nf4", nf4))
    }
    window = min(args.window, args.steps)
    last = {name: float(np.mean(r["losses"][-window:])) for name, r in runs.items()}
    checks = {
        f"mean of the last {window} training losses": _within(last["nf4"], last["float32"]),
        "validation loss": _within(runs["nf4"]["val_loss"], runs["float32"]["val_loss"]),
    }
    return {
        "command": "python -m benchmarks.variants_quality " + " ".join(sys.argv[1:]),
        "base": f"offline GPT-2 of examples/gpt2_spam.py ({gpt_config.n_layer} layers, width {gpt_config.n_embd})",
        "recipe": _recipe(recipe, args),
        "tolerance": f"|loss_nf4 - loss_fp32| <= {LOSS_ATOL} + {LOSS_RTOL} * loss_fp32 (nats)",
        "checks": checks,
        "ok": all(c["ok"] for c in checks.values()),
        "runs": runs,
        "frozen_bytes": frozen_bytes,
        "relative_error": errors,
        "mean_relative_error": float(np.mean(list(errors.values()))),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.inits:
        result = run_inits(args)
        print(f"float32 + kaiming: {result['float32']}")
        for name, gaps in result["gaps_to_float32"].items():
            print(f"{name}: " + ", ".join(f"{k} {v:+.4f}" for k, v in gaps.items()))
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        return result
    result = run(args)
    for what, check in result["checks"].items():
        print(
            f"{what}: float32 {check['float32']:.4f}, nf4 {check['nf4']:.4f}, |diff| {check['abs_diff']:.4f} "
            f"<= {check['allowed']:.4f}: {'ok' if check['ok'] else 'MISSED'}"
        )
    print(
        f"mean ‖W - Q(W)‖/‖W‖ over {len(result['relative_error'])} quantized leaves: "
        f"{result['mean_relative_error']:.4f}"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
