"""The digit-9 story: a rank-1 LoRA teaches a pretrained MNIST classifier one digit, its base untouched.

1. Load MNIST with tfds.data_source (array_record, no TensorFlow), normalised with mean 0.1307, std 0.3081.
2. Pretrain an over-sized MLP 784-1000-2000-10 for one epoch (batch 10, Adam lr 1e-3, seed 0).
3. Test it: accuracy and the wrong count for every digit.
4. Plan a rank-1 LoRA on all three kernels: 6,794 trainable numbers, 0.242% of 2,807,010.
5. Fine-tune only the adapters, 100 batches of 10 images of the digit 9 (the base frozen by the optimizer).
6. Prove the base did not change: every base weight is bit-identical to a copy taken before.
7. Test with LoRA (digit 9 improves, other digits get worse) and without it (exactly step 3 again).
8. Merge the adapters into the weights (same predictions), save the adapter and compare its size on disk.
9. Plot the wrong counts per digit and the loss curves.

    python examples/mnist.py                      # MNIST if it can be had, else scikit-learn's 8x8 digits
    python examples/mnist.py --dataset digits     # offline: the same story on 8x8 digits
    python examples/mnist.py --quick              # a smaller model and training subset (used by the tests)

On the 8x8 digits a base that saw every 9 already gets nearly all test 9s right, so there the base is pretrained
on a tenth of the training 9s (--pretrain-share) and the LoRA sees 20 batches of 9s instead of 100.

MNIST is looked for in --data-dir, else $TFDS_DATA_DIR, else ../shared/data/tfds beside the repo, else
tfds' default folder; with internet the four raw files are downloaded (checksums pinned) and prepared in tfds'
array_record format, without TensorFlow. The pretrained base is cached in OUT/cache, keyed by the data and the
recipe, so a second run skips pretraining.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import mnist_data
import numpy as np
import optax
from progress import Progress, track

import jaxlora
from jaxlora import checkpoint

Params = Any
LossFn = Callable[[Params, Params, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Preset:
    """Model width and how much data the pretraining sees."""

    hidden: tuple[int, ...]
    train_examples: int | None  # None: the whole training split


FULL = Preset(hidden=(1000, 2000), train_examples=None)
QUICK = Preset(hidden=(128, 256), train_examples=6000)
# Per data set: the share of the taught digit's training images the base is pretrained on, and the LoRA batches.
# On the small 8x8 digits a base that saw every 9 gets all but one of the 36 test 9s right, which leaves LoRA
# nothing to show; seeing a tenth of them it is weak on 9s, and 20 batches of 9s (the 144 training 9s seen about
# 1.4 times) teach them as 100 batches do on MNIST.
DEFAULT_SHARE = {"mnist": 1.0, "digits": 0.1}
DEFAULT_FINETUNE_STEPS = {"mnist": 100, "digits": 20}


class MLP(nn.Module):
    """Dense layers `linear1`, `linear2`, ... with ReLU between them; the last one gives the class logits."""

    hidden: tuple[int, ...] = FULL.hidden
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.hidden, start=1):
            x = nn.relu(nn.Dense(width, name=f"linear{i}")(x))
        return nn.Dense(self.num_classes, name=f"linear{len(self.hidden) + 1}")(x)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def batch_indices(rng: np.random.Generator, pool: np.ndarray, steps: int, batch_size: int) -> np.ndarray:
    """(steps, batch_size) indices: shuffled passes over `pool`, as many as the steps need, vectorised."""
    if len(pool) == 0:
        raise ValueError("no training examples to draw batches from")
    need = steps * batch_size
    passes = -(-need // len(pool))
    return np.concatenate([rng.permutation(pool) for _ in range(passes)])[:need].reshape(steps, batch_size)


def chunk_size(steps: int, most: int) -> int:
    """The largest divisor of `steps` that is at most `most`: equal chunks compile the scan only once."""
    return max(d for d in range(1, min(steps, most) + 1) if steps % d == 0)


def train(
    loss_fn: LossFn,
    trainable: Params,
    frozen: Params,
    tx: optax.GradientTransformation,
    images: np.ndarray,
    labels: np.ndarray,
    indices: np.ndarray,
    *,
    chunk: int,
    desc: str,
) -> tuple[Params, np.ndarray]:
    """One optimizer step per row of `indices`; up to `chunk` steps run inside one jit call as a `lax.scan`.

    The images stay on the device and each step gathers its batch there, so Python runs once per
    chunk, not once per step. Returns the trained leaves and the loss of every step.
    """
    chunk = chunk_size(len(indices), chunk)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def run_chunk(trainable, opt_state, frozen, images, labels, idx):
        def step(carry, batch):
            trainable, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, images[batch], labels[batch])
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return (optax.apply_updates(trainable, updates), opt_state), loss

        (trainable, opt_state), losses = jax.lax.scan(step, (trainable, opt_state), idx)
        return trainable, opt_state, losses

    images, labels = jnp.asarray(images), jnp.asarray(labels)
    opt_state = tx.init(trainable)
    losses = []
    with Progress(len(indices), f"   {desc}", "step") as bar:  # a bar on a terminal, else a line every 5 s
        for start in range(0, len(indices), chunk):
            trainable, opt_state, chunk_losses = run_chunk(
                trainable, opt_state, frozen, images, labels, indices[start : start + chunk]
            )
            losses.append(np.asarray(chunk_losses))
            bar.update(len(losses[-1]), loss=f"{losses[-1].mean():.4f}")
    return trainable, np.concatenate(losses)


def pretraining_pool(labels: np.ndarray, digit: int, share: float, seed: int) -> np.ndarray:
    """Indices the base is pretrained on: every image, except that only `share` of the `digit`s are kept.

    The kept ones are drawn with their own generator, so a share of 1 leaves the run exactly as without it.
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"--pretrain-share must be in (0, 1], got {share}")
    everything = np.arange(len(labels))
    if share == 1.0:
        return everything
    ones = np.flatnonzero(labels == digit)
    keep = np.random.default_rng([seed, digit]).choice(ones, size=max(1, round(share * len(ones))), replace=False)
    return np.sort(np.concatenate([everything[labels != digit], keep]))


def base_key(train_set: mnist_data.Split, indices: np.ndarray, recipe: dict[str, Any]) -> str:
    """A key for a pretrained base: the training images and labels, the batch schedule and the recipe."""
    digest = hashlib.sha256(json.dumps({**recipe, "format": 1}, sort_keys=True).encode())
    for array in (train_set.images, train_set.labels, indices):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def save_base(directory: Path, params: Params, losses: np.ndarray, recipe: dict[str, Any]) -> None:
    """The pretrained base and its loss curve with orbax; recipe.json is written last and marks it complete."""
    import orbax.checkpoint as ocp

    directory = directory.absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "state", {"params": params, "losses": np.asarray(losses)}, force=True)
    (directory / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")


def restore_base(directory: Path, template: Params) -> tuple[Params, np.ndarray]:
    """What `save_base` wrote: the base (shaped like `template`) and its loss curve."""
    import orbax.checkpoint as ocp

    directory = directory.absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        losses_shape = checkpointer.metadata(directory / "state").item_metadata["losses"].shape
        target = {"params": template, "losses": jax.ShapeDtypeStruct(losses_shape, np.float32)}
        state = checkpointer.restore(directory / "state", target)
    return state["params"], np.asarray(state["losses"])


def wrong_per_class(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """How many test images of each class the model gets wrong."""
    return np.bincount(labels[predictions != labels], minlength=num_classes)


def bits(x: Any) -> np.ndarray:
    """The raw bits of an array (float32 -> uint32, ...), so that equality means bit-identical, NaN or not."""
    x = np.asarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def bit_identical(a: Params, b: Params) -> list[bool]:
    """Leaf by leaf: are the two trees bit-for-bit the same?"""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    if jax.tree.structure(a) != jax.tree.structure(b):
        return [False]
    return [x.shape == y.shape and np.array_equal(bits(x), bits(y)) for x, y in zip(leaves_a, leaves_b, strict=True)]


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def save_tree(path: Path, tree: Params) -> None:
    """Writes a pytree of arrays with orbax (replacing an earlier save at `path`)."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path.absolute(), tree, force=True)
    checkpointer.wait_until_finished()


def _per_class_table(counts: np.ndarray, columns: dict[str, np.ndarray]) -> str:
    header = ["digit", "test images", *columns]
    rows = [header]
    for digit in range(len(counts)):
        rows.append([str(digit), f"{counts[digit]:,}", *(f"{col[digit]:,}" for col in columns.values())])
    rows.append(["all", f"{counts.sum():,}", *(f"{col.sum():,}" for col in columns.values())])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("   " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def plot_wrong_counts(before: np.ndarray, after: np.ndarray, digit: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = np.arange(len(before))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(classes - 0.2, before, width=0.4, label="original model")
    ax.bar(classes + 0.2, after, width=0.4, label=f"with the digit-{digit} LoRA")
    ax.set_xticks(classes)
    ax.set_xlabel("digit")
    ax.set_ylabel("wrong test predictions")
    ax.set_title(f"Wrong predictions per digit, before and after fine-tuning a rank-1 LoRA on {digit}s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_losses(pretrain: np.ndarray, finetune: np.ndarray, window: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, losses, title in (
        (axes[0], pretrain, "pretraining (all digits)"),
        (axes[1], finetune, "LoRA fine-tuning (one digit, base frozen)"),
    ):
        steps = np.arange(1, len(losses) + 1)
        ax.plot(steps, losses, alpha=0.3, linewidth=0.8, label="per batch")
        w = max(1, min(window, len(losses) // 5))
        running = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], running, label=f"running mean of {w}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.set_ylabel("cross-entropy (log scale)")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole story; prints it and returns the measured facts (the tests assert on them)."""
    started = time.perf_counter()
    preset = QUICK if args.quick else FULL
    hidden = tuple(args.hidden) if args.hidden else preset.hidden
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    facts: dict[str, Any] = {"seconds": {}}
    digit = args.digit

    # 1. Data.
    print("1. data")
    cache_dir = None if args.no_cache else (args.cache_dir or out / "cache")
    progress = functools.partial(track, unit="chunk")
    data = mnist_data.load(
        args.dataset,
        args.data_dir,
        download=not args.no_download,
        raw_dir=args.mnist_raw_dir,
        cache_dir=cache_dir,
        progress=progress,
        log=lambda line: print("   " + line),
    )
    train_set, test_set = data.train, data.test
    if preset.train_examples is not None and len(train_set) > preset.train_examples:
        train_set = mnist_data.Split(
            train_set.images[: preset.train_examples], train_set.labels[: preset.train_examples]
        )
    facts["seconds"]["load"] = time.perf_counter() - started
    facts.update(dataset=data.name, train_size=len(train_set), test_size=len(test_set))
    height, width = data.image_shape
    print(f"   dataset: {data.name}, from {data.source}")
    print(
        f"   train {len(train_set):,} and test {len(test_set):,} images of {height}x{width}, normalised "
        f"(x - {data.mean:.4f}) / {data.std:.4f}: inputs of {height * width} numbers"
    )
    print(f"   loaded in {facts['seconds']['load']:.1f} s")

    # 2. Pretraining.
    model = MLP(hidden=hidden, num_classes=data.num_classes)
    key_model, key_lora = jax.random.split(jax.random.key(args.seed))
    # Shapes only: a restored base needs no initial values, and computing them costs about a second.
    template = jax.eval_shape(model.init, key_model, train_set.images[:1])["params"]
    sizes = "-".join(str(n) for n in (height * width, *hidden, data.num_classes))
    share = args.pretrain_share if args.pretrain_share is not None else DEFAULT_SHARE[data.name]
    finetune_steps = args.finetune_steps or DEFAULT_FINETUNE_STEPS[data.name]
    pretrain_pool = pretraining_pool(train_set.labels, digit, share, args.seed)
    per_epoch = len(pretrain_pool) // args.batch_size  # the last partial batch of each epoch is dropped
    if per_epoch == 0:
        raise ValueError(f"--batch-size {args.batch_size} exceeds the {len(pretrain_pool)} training images; lower it")
    rng = np.random.default_rng(args.seed)
    indices = np.concatenate(
        [batch_indices(rng, pretrain_pool, per_epoch, args.batch_size) for _ in range(args.epochs)]
    )
    steps = len(indices)
    facts["pretrain_share"] = share
    print(
        f"\n2. pretraining an over-sized MLP {sizes} (ReLU, {jaxlora.count_params(template):,} parameters): "
        f"{args.epochs} epoch(s), batch {args.batch_size}, Adam lr {args.lr}, seed {args.seed} -> {steps:,} steps"
    )
    if share < 1.0:
        seen = int((train_set.labels[pretrain_pool] == digit).sum())
        print(
            f"   the base sees only {seen} of the {int((train_set.labels == digit).sum())} training {digit}s "
            f"(--pretrain-share {share:g}): on {data.name} a base that saw them all already gets nearly every "
            f"{digit} right, which would leave LoRA nothing to show"
        )

    def base_loss(params, _frozen, x, y):
        return cross_entropy(model.apply({"params": params}, x), y)

    start = time.perf_counter()
    cached = None
    if cache_dir is not None:
        recipe = {"hidden": list(hidden), "lr": args.lr, "seed": args.seed, "dataset": data.name}
        cached = Path(cache_dir) / f"base-{base_key(train_set, indices, recipe)}"
    if cached is not None and (cached / "recipe.json").is_file():
        params, pretrain_losses = restore_base(cached, template)
        facts["base_cached"] = True
        print(f"   restored the pretrained base from {cached} (same data and recipe; --no-cache pretrains again)")
    else:
        params, pretrain_losses = train(
            base_loss,
            model.init(key_model, train_set.images[:1])["params"],
            None,
            optax.adam(args.lr),
            train_set.images,
            train_set.labels,
            indices,
            chunk=args.chunk,
            desc="pretraining",
        )
        jax.block_until_ready(params)
        facts["base_cached"] = False
        if cached is not None:
            save_base(cached, params, pretrain_losses, recipe)
    facts["seconds"]["pretrain"] = time.perf_counter() - start
    facts["pretrain_losses"] = pretrain_losses
    tail = pretrain_losses[-min(len(pretrain_losses), 500) :].mean()
    print(
        f"   done in {facts['seconds']['pretrain']:.1f} s"
        + ("" if facts["base_cached"] else f" ({1e3 * facts['seconds']['pretrain'] / steps:.2f} ms/step)")
        + f"; mean loss of the last {min(len(pretrain_losses), 500)} batches {tail:.4f}"
    )

    # 3. Testing the pretrained model.
    predict = jax.jit(lambda params, x: jnp.argmax(model.apply({"params": params}, x), axis=-1))
    test_x, test_y = jnp.asarray(test_set.images), test_set.labels
    counts = np.bincount(test_y, minlength=data.num_classes)
    preds_before = np.asarray(predict(params, test_x))
    wrong_before = wrong_per_class(preds_before, test_y, data.num_classes)
    facts["accuracy_before"] = float((preds_before == test_y).mean())
    facts["wrong_before"] = wrong_before
    print(
        f"\n3. the pretrained model on the {len(test_y):,} test images: accuracy {100 * facts['accuracy_before']:.2f}%"
    )
    print(_per_class_table(counts, {"wrong": wrong_before}))
    print(
        f"   digit {digit}: {wrong_before[digit]} of {counts[digit]} wrong; LoRA will now be trained on {digit}s only"
    )

    # 4. The LoRA plan.
    cfg = jaxlora.LoraConfig(
        rank=args.rank, alpha=args.alpha, targets=(jaxlora.ALL_KERNELS,), init="gaussian", init_std=args.init_std
    )
    lora_plan = jaxlora.plan(params, cfg)
    facts.update(
        num_original=lora_plan.num_original,
        num_lora=lora_plan.num_lora,
        lora_percent=100 * lora_plan.num_lora / lora_plan.num_original,
    )
    print(f"\n4. a rank-{args.rank} LoRA (alpha {args.alpha}) on every kernel, jaxlora.plan(params, cfg):")
    print("\n".join(("   " + line).rstrip() for line in str(lora_plan).splitlines()))

    # 5. Fine-tuning the adapters on one digit.
    base_copy = jax.tree.map(np.array, params)  # a host copy, to prove in step 6 that nothing changed
    params, adapters = jaxlora.init(key_lora, params, cfg)
    trainable, frozen = jaxlora.partition(params, adapters, cfg)
    tx = jaxlora.optimizer(optax.adam(args.lr), cfg)
    pool = np.flatnonzero(train_set.labels == digit)
    lora_indices = batch_indices(rng, pool, finetune_steps, args.batch_size)
    print(
        f"\n5. fine-tuning only the adapters (A ~ N(0, {args.init_std}²), B = 0): {finetune_steps} batches of "
        f"{args.batch_size} images of the digit {digit} (from {len(pool):,}), Adam lr {args.lr}; "
        "the base is frozen by jaxlora.optimizer"
    )

    def lora_loss(trainable, frozen, x, y):
        params, adapters = jaxlora.combine(trainable, frozen)
        return cross_entropy(jaxlora.apply(model, {"params": params}, adapters, cfg, x), y)

    start = time.perf_counter()
    trainable, finetune_losses = train(
        lora_loss,
        trainable,
        frozen,
        tx,
        train_set.images,
        train_set.labels,
        lora_indices,
        chunk=args.chunk,
        desc=f"LoRA on {digit}s",
    )
    jax.block_until_ready(trainable)
    facts["seconds"]["finetune"] = time.perf_counter() - start
    facts["finetune_losses"] = finetune_losses
    params, adapters = jaxlora.combine(trainable, frozen)
    print(
        f"   done in {facts['seconds']['finetune']:.1f} s; loss {finetune_losses[:10].mean():.4f} (first 10 batches) "
        f"-> {finetune_losses[-10:].mean():.4f} (last 10)"
    )

    # 6. The base is untouched.
    identical = bit_identical(base_copy, params)
    facts["base_bit_identical"] = all(identical)
    print(
        f"\n6. the base after fine-tuning vs the copy taken before: {sum(identical)} of {len(identical)} "
        f"weight arrays bit-identical (compared as unsigned integers) -> base untouched: {all(identical)}"
    )

    # 7. Testing with and without the adapters.
    predict_lora = jax.jit(
        lambda params, adapters, x: jnp.argmax(jaxlora.apply(model, {"params": params}, adapters, cfg, x), axis=-1)
    )
    preds_lora = np.asarray(predict_lora(params, adapters, test_x))
    wrong_lora = wrong_per_class(preds_lora, test_y, data.num_classes)
    preds_off = np.asarray(predict(params, test_x))
    wrong_off = wrong_per_class(preds_off, test_y, data.num_classes)
    others = np.arange(data.num_classes) != digit
    facts.update(
        accuracy_lora=float((preds_lora == test_y).mean()),
        wrong_lora=wrong_lora,
        accuracy_disabled=float((preds_off == test_y).mean()),
        wrong_disabled=wrong_off,
        disabled_identical=bool(np.array_equal(preds_off, preds_before)),
    )
    print(
        f"\n7. testing with the adapters: accuracy {100 * facts['accuracy_lora']:.2f}% "
        f"(was {100 * facts['accuracy_before']:.2f}%)"
    )
    print(_per_class_table(counts, {"wrong before": wrong_before, "wrong with LoRA": wrong_lora}))
    print(
        f"   digit {digit}: {wrong_before[digit]} -> {wrong_lora[digit]} wrong of {counts[digit]}. The other digits: "
        f"{wrong_before[others].sum()} -> {wrong_lora[others].sum()} wrong, since the adapter only ever saw {digit}s "
        f"and now answers {digit} too often ({int((preds_lora == digit).sum()):,} predictions of {digit}, "
        f"{int((preds_before == digit).sum()):,} before)."
    )
    print(
        f"   without the adapters (the base alone): accuracy {100 * facts['accuracy_disabled']:.2f}%; its "
        f"{len(preds_off):,} predictions equal step 3's exactly: {facts['disabled_identical']}"
    )

    # 8. Merging and saving.
    merged = jaxlora.merge(params, adapters, cfg)
    preds_merged = np.asarray(predict(merged, test_x))
    facts["merged_mismatches"] = int((preds_merged != preds_lora).sum())
    facts["accuracy_merged"] = float((preds_merged == test_y).mean())
    adapter_dir, model_dir = out / "lora_adapter", out / "merged_model"
    start = time.perf_counter()
    checkpoint.save_adapter(adapter_dir, params, adapters, cfg, overwrite=True)
    save_tree(model_dir, merged)
    facts["seconds"]["save"] = time.perf_counter() - start
    facts["adapter_bytes"] = directory_bytes(adapter_dir)
    facts["model_bytes"] = directory_bytes(model_dir)
    _, reloaded, _ = checkpoint.load_adapter(adapter_dir, params)
    facts["reloaded_identical"] = all(bit_identical(reloaded, adapters))  # so its predictions are preds_lora's
    print(
        f"\n8. merged W + (alpha/r)·A·B into the kernels: accuracy {100 * facts['accuracy_merged']:.2f}%; "
        f"predictions differing from the factored LoRA model: {facts['merged_mismatches']} of {len(preds_lora):,}"
    )
    print(
        f"   saved with orbax: the adapter (jaxlora.checkpoint.save_adapter) {facts['adapter_bytes'] / 1e3:,.1f} kB "
        f"in {adapter_dir}, the merged model {facts['model_bytes'] / 1e6:,.2f} MB in {model_dir}"
    )
    print(
        f"   the adapter loaded back is bit-identical to the trained one (so it predicts the same): "
        f"{facts['reloaded_identical']}"
    )

    # 9. Plots.
    wrong_png, loss_png = out / "wrong_per_digit.png", out / "losses.png"
    start = time.perf_counter()
    plot_wrong_counts(wrong_before, wrong_lora, digit, wrong_png)
    plot_losses(pretrain_losses, finetune_losses, 100, loss_png)
    facts["seconds"]["plots"] = time.perf_counter() - start
    facts["plots"] = [str(wrong_png), str(loss_png)]
    facts["seconds"]["total"] = time.perf_counter() - started
    print(f"\n9. plots: {wrong_png}, {loss_png}")
    timings = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in facts["seconds"].items() if name != "total")
    print(f"\nthe whole story took {facts['seconds']['total']:.1f} s ({timings})")
    return facts


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        choices=("auto", "mnist", "digits"),
        default="auto",
        help="auto: MNIST when it can be had, otherwise scikit-learn's 8x8 digits (default: auto)",
    )
    data.add_argument("--data-dir", help="tfds data folder holding mnist/3.0.1 in array_record format")
    data.add_argument("--no-download", action="store_true", help="never download; use only MNIST already on disk")
    data.add_argument("--mnist-raw-dir", help="folder with the four raw MNIST .gz files to build the tfds copy from")
    data.add_argument(
        "--cache-dir", help="where decoded MNIST and the pretrained base are kept between runs (default: OUT/cache)"
    )
    data.add_argument("--no-cache", action="store_true", help="decode MNIST and pretrain the base on every run")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small and fast: hidden {QUICK.hidden}, the first {QUICK.train_examples:,} training images",
    )
    parser.add_argument("--hidden", type=_positive, nargs="+", help=f"hidden widths (default {FULL.hidden})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init, the shuffling and the LoRA init")
    parser.add_argument("--epochs", type=_positive, default=1, help="pretraining epochs")
    parser.add_argument("--batch-size", type=_positive, default=10, help="images per batch (both trainings)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (pretraining and LoRA)")
    parser.add_argument("--digit", type=int, default=9, choices=range(10), help="the digit the LoRA is trained on")
    parser.add_argument(
        "--pretrain-share",
        type=float,
        help="share of the taught digit's training images the base is pretrained on "
        f"(default: {DEFAULT_SHARE['mnist']:g} on MNIST, {DEFAULT_SHARE['digits']:g} on the 8x8 digits)",
    )
    parser.add_argument(
        "--finetune-steps",
        type=_positive,
        help=f"LoRA batches (default: {DEFAULT_FINETUNE_STEPS['mnist']} on MNIST, "
        f"{DEFAULT_FINETUNE_STEPS['digits']} on the 8x8 digits)",
    )
    parser.add_argument("--rank", type=_positive, default=1, help="LoRA rank r")
    parser.add_argument("--alpha", type=float, default=1.0, help="LoRA alpha (the update is scaled by alpha/r)")
    parser.add_argument("--init-std", type=float, default=1.0, help="std of the Gaussian init of A")
    parser.add_argument(
        "--chunk",
        type=_positive,
        default=100,
        help="most training steps per jit-compiled lax.scan call (a divisor of the step count is used)",
    )
    parser.add_argument("--out", default="runs/mnist", help="directory for plots, checkpoints and the cache")
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        run(parse_args())
    except mnist_data.DataUnavailable as err:  # only with --dataset mnist; "auto" falls back to the digits
        raise SystemExit(f"error: no MNIST: {err} Offline, --dataset digits runs the same story.") from None
