"""A GPT-2 spam classifier fine-tuned with LoRA (the recipe of Raschka's "LLMs from scratch", appendix E).

GPT-2 reads an SMS; a new linear ``head`` maps the hidden state of its last real token to ham / spam. The base
stays frozen: LoRA adapters of rank 16, alpha 16, sit on every linear layer of the transformer blocks (c_attn,
c_proj, c_fc, mlp c_proj) and the head is trained in full. AdamW (lr 5e-5, weight decay 0.1), batch 8,
5 epochs, loss on 5 batches every 50 steps, accuracy after every epoch, then train / validation / test accuracy.
The adapter (plus the head) is saved with ``jaxlora.checkpoint`` and reloaded to check it reproduces the logits.

Where the base comes from:

    python examples/gpt2_spam.py --weights gpt2        # openai-community/gpt2 from the Hugging Face Hub (default)
    python examples/gpt2_spam.py --weights PATH        # a local model.safetensors (file or directory)
    python examples/gpt2_spam.py --offline-pretrain    # no pretrained weights: pretrain a small GPT-2 first
    python examples/gpt2_spam.py --quick ...           # tiny model and a few steps (used by the tests)

What it needs is fetched once when online: tiktoken's GPT-2 BPE, the SMS Spam Collection (sha256 pinned) and,
unless --offline-pretrain, the GPT-2 weights (huggingface_hub). Whatever cannot be had is named in one line each,
with where to get it.

``--offline-pretrain`` pretrains a small GPT-2 (2 layers, width 128, 4 heads, dropout 0.1; GPT-2's vocabulary,
256 positions) as a causal language model on the texts of the *training split only* (about 33 k tokens): the
messages joined by <|endoftext|> into one stream, cut at a fresh random offset every epoch into 64-token windows,
16 windows a step, 40 epochs, AdamW 5e-3 with warmup and cosine decay. To keep it cheap, only the ~4.8 k token
ids that occur in those texts get embedding rows while pretraining (the tied softmax over them is exact for every
target); they are placed into GPT-2's 50257-row table afterwards. The base is saved with orbax (``--pretrained``
reuses it) and fine-tuned exactly as above, except that such a small model wants a larger learning rate: lr 2e-3
decayed to 0 by a cosine (``--lr``, ``--schedule`` override).

Offline data: ``--data-dir`` (the UCI ``SMSSpamCollection`` file or folder) or ``--reference-split`` (the
published split's CSVs), and ``--bpe-dir`` (GPT-2's ``encoder.json`` + ``vocab.bpe``) or ``TIKTOKEN_CACHE_DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxlora
import jaxlora.checkpoint
from jaxlora.models.gpt2 import (
    GPT2,
    PRESETS,
    GPT2Classifier,
    GPT2Config,
    config_from_hf,
    generate_greedy,
    load_hf_weights,
    stack_layers,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spam_data
from progress import Progress, on_terminal

HUB_ID = "openai-community/gpt2"
HUB_ALIASES = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
HUB_FILES = ("config.json", "model.safetensors")
PUBLISHED_TRAINABLE = 2_666_528  # the recipe's count: LoRA r=16 on GPT-2 124M with separate q/k/v and the head
BLOCK_LINEARS = r"h_\d+/(attn|mlp)/(c_attn|c_proj|c_fc)/kernel"
SCANNED_BLOCK_LINEARS = r"h/(attn|mlp)/(c_attn|c_proj|c_fc)/kernel"  # --scan-layers: kernels (n_layer, in, out)
OFFLINE_MODEL = GPT2Config(n_positions=256, n_embd=128, n_layer=2, n_head=4, dropout=0.1)
QUICK_MODEL = GPT2Config(n_positions=256, n_embd=32, n_layer=2, n_head=2, dropout=0.0)
PRETRAIN_BATCH = 16
WIDTH_BUCKET = 32  # batches are cut to their longest message, rounded up to this (few shapes, few compiles)

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Batch:
    ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    base = parser.add_argument_group("base model")
    base.add_argument(
        "--weights",
        help="GPT-2 model.safetensors file or directory, a Hugging Face Hub id, or gpt2 / gpt2-medium / gpt2-large / "
        f"gpt2-xl (default: {HUB_ID})",
    )
    base.add_argument(
        "--offline-pretrain",
        action="store_true",
        help="no pretrained weights: pretrain a small GPT-2 on the training texts first",
    )
    base.add_argument("--pretrained", type=Path, help="reuse a checkpoint written by an earlier --offline-pretrain")
    base.add_argument("--pretrain-epochs", type=int, default=40)
    base.add_argument("--pretrain-lr", type=float, default=5e-3)
    base.add_argument("--pretrain-block", type=int, default=64, help="tokens per pretraining sequence")
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", type=Path, help="SMSSpamCollection file or folder (default: download to cache)")
    data.add_argument("--reference-split", type=Path, help="folder of the published train/validation/test.csv")
    data.add_argument("--bpe-dir", type=Path, help="folder with GPT-2's encoder.json and vocab.bpe")
    train = parser.add_argument_group("LoRA fine-tuning")
    train.add_argument("--rank", type=int, default=16)
    train.add_argument("--alpha", type=float, default=16.0)
    train.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input (recipe: none)")
    train.add_argument("--lr", type=float, help="default 5e-5 (recipe); 2e-3 with --offline-pretrain")
    train.add_argument(
        "--schedule",
        choices=("constant", "cosine"),
        help="learning-rate schedule; default constant (recipe), cosine decay to 0 with --offline-pretrain",
    )
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--epochs", type=int, default=5)
    train.add_argument("--eval-freq", type=int, default=50, help="steps between loss evaluations")
    train.add_argument("--eval-iter", type=int, default=5, help="batches per loss evaluation")
    parser.add_argument(
        "--scan-layers", action="store_true", help="stack the blocks with nn.scan (one adapter per layer, factored)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, data subset, few steps (for tests)")
    parser.add_argument("--seed", type=int, default=123, help="initialisation and shuffling")
    parser.add_argument("--split-seed", type=int, default=123, help="ham subsampling and the 70/10/20 split")
    parser.add_argument("--out", type=Path, default=Path("runs/gpt2_spam"))
    args = parser.parse_args(argv)
    if args.quick:
        args.offline_pretrain = args.weights is None
        args.epochs = min(args.epochs, 1)
        args.pretrain_epochs = min(args.pretrain_epochs, 2)
        args.pretrain_block = min(args.pretrain_block, 32)
        args.rank = min(args.rank, 4)
        args.eval_freq = min(args.eval_freq, 4)
        args.eval_iter = min(args.eval_iter, 2)
    small_base = args.offline_pretrain or args.pretrained is not None
    if args.lr is None:
        args.lr = 2e-3 if small_base else 5e-5
    if args.schedule is None:
        args.schedule = "cosine" if small_base else "constant"
    args.weights = args.weights or HUB_ID
    return args


# --------------------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------------------


def _cut(split: spam_data.EncodedSplit, rows: np.ndarray) -> Batch:
    """Rows of a split, cut to their longest message (rounded up to WIDTH_BUCKET) to skip all-padding columns.

    The classifier reads each row's last real token under causal attention, so the dropped padding could not
    change any prediction.
    """
    width = min(split.ids.shape[1], WIDTH_BUCKET * math.ceil(int(split.lengths[rows].max()) / WIDTH_BUCKET))
    return Batch(split.ids[rows, :width], split.lengths[rows], split.labels[rows])


def batches(split: spam_data.EncodedSplit, size: int, rng: np.random.Generator | None = None) -> Iterator[Batch]:
    """Shuffled full batches (dropping the rest, as the recipe) with `rng`; all rows in order without."""
    if rng is None:
        for start in range(0, len(split), size):
            yield _cut(split, np.arange(start, min(start + size, len(split))))
        return
    order = rng.permutation(len(split))
    for start in range(0, len(split) - size + 1, size):
        yield _cut(split, order[start : start + size])


def subset(split: spam_data.EncodedSplit, n: int) -> spam_data.EncodedSplit:
    return spam_data.EncodedSplit(split.ids[:n], split.lengths[:n], split.labels[:n])


# --------------------------------------------------------------------------------------------------------------
# Base model: Hugging Face weights, or a small GPT-2 pretrained here
# --------------------------------------------------------------------------------------------------------------


def init_params(model: GPT2 | GPT2Classifier, seed: int) -> Params:
    """Freshly initialised params, in one compiled call (eager init would compile every op on its own)."""
    return jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))["params"]


def load_pretrained_weights(weights: str) -> tuple[GPT2Config, Params]:
    """Config and params of a published GPT-2; without a config.json the size is matched to the four presets."""
    try:
        params = load_hf_weights(weights)
    except FileNotFoundError as err:  # the library names no command line: the example adds its own flags
        raise FileNotFoundError(
            f"{err} Pass --weights PATH with a GPT-2 model.safetensors file (or a directory holding one), or use "
            "--offline-pretrain, which pretrains a small GPT-2 here."
        ) from None
    try:
        return config_from_hf(weights), params
    except FileNotFoundError:
        width, layers = params["wte"]["embedding"].shape[1], sum(name.startswith("h_") for name in params)
        for name, preset in PRESETS.items():
            if (preset.n_embd, preset.n_layer) == (width, layers):
                print(f"No config.json beside {weights}; its shapes are those of {name}.")
                return preset, params
        raise ValueError(
            f"No config.json beside {weights} and its size (width {width}, {layers} layers) is none of "
            f"{sorted(PRESETS)}: put the model's config.json next to it."
        ) from None


def lm_corpus(split: spam_data.EncodedSplit, eot: int = spam_data.PAD_TOKEN_ID) -> np.ndarray:
    """The training texts as one token stream, each message followed by <|endoftext|> (`eot`)."""
    rows = [np.append(split.ids[i, : split.lengths[i]], eot) for i in range(len(split))]
    return np.concatenate(rows).astype(np.int32)


def pretrain(config: GPT2Config, corpus: np.ndarray, args: argparse.Namespace) -> tuple[Params, list[float]]:
    """Causal-LM pretraining on `corpus` in its own compact vocabulary, then placed into GPT-2's 50257-row table.

    Only the tokens that occur in `corpus` get embedding rows during training (so the tied softmax runs over
    them alone, exactly as the full softmax would if the other rows were absent); afterwards those rows go to
    their GPT-2 ids and every other row keeps its initial value. The result is a plain GPT-2 parameter tree.
    """
    vocab = np.unique(corpus)  # sorted: searchsorted maps a GPT-2 id to its compact id
    compact = GPT2(dataclasses.replace(config, vocab_size=len(vocab)))
    stream = np.searchsorted(vocab, corpus).astype(np.int32)
    block = args.pretrain_block
    steps_per_epoch = (len(stream) - block - 1) // block // PRETRAIN_BATCH  # holds for every offset below
    if steps_per_epoch < 1:
        raise ValueError(f"{len(stream)} tokens are too few for batches of {PRETRAIN_BATCH} x {block}-token blocks.")
    total = steps_per_epoch * args.pretrain_epochs
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.pretrain_lr, min(100, total // 10 + 1), total)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.1))
    params = init_params(compact, args.seed)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, windows, key):
        def loss_fn(params):
            logits = compact.apply({"params": params}, windows[:, :-1], deterministic=False, rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(args.seed)
    key = jax.random.key(args.seed + 1)
    losses = []
    with Progress(total, "pretrain", "step") as bar:  # a bar on a terminal, else a line every 5 s
        for epoch in range(args.pretrain_epochs):
            offset = int(rng.integers(block))  # a new cut of the stream every epoch
            n = (len(stream) - offset - 1) // block
            starts = offset + block * rng.permutation(n)[: steps_per_epoch * PRETRAIN_BATCH]
            for rows in starts.reshape(steps_per_epoch, PRETRAIN_BATCH):
                windows = np.stack([stream[s : s + block + 1] for s in rows])
                key, sub = jax.random.split(key)
                params, opt_state, loss = step(params, opt_state, windows, sub)
                losses.append(float(loss))
                bar.update(epoch=epoch + 1, loss=f"{losses[-1]:.3f}")

    table = jax.random.normal(jax.random.key(args.seed + 2), (config.vocab_size, config.n_embd))
    table = (config.initializer_range * table).at[vocab].set(params["wte"]["embedding"])  # GPT-2's init elsewhere
    return {**params, "wte": {"embedding": table}}, losses


def save_pretrained(directory: Path, config: GPT2Config, params: Params) -> None:
    import orbax.checkpoint as ocp

    directory = directory.absolute()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "params", params, force=True)
    (directory / "config.json").write_text(json.dumps(config.to_dict(), indent=2))


def restore_pretrained(directory: Path) -> tuple[GPT2Config, Params]:
    import orbax.checkpoint as ocp

    directory = directory.absolute()
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} holds no pretrained checkpoint (config.json + params/).")
    config = GPT2Config(**json.loads((directory / "config.json").read_text()))
    template = jax.eval_shape(lambda: GPT2(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(directory / "params", template)
    return config, params


# --------------------------------------------------------------------------------------------------------------
# LoRA fine-tuning
# --------------------------------------------------------------------------------------------------------------


def lora_config(rank: int, alpha: float, dropout: float = 0.0, scanned: bool = False) -> jaxlora.LoraConfig:
    """LoRA on every linear layer of the blocks; the new head is trained in full.

    The recipe puts a rank-16 LoRA on the 768x2 head too, but jaxlora refuses a rank above min(fan_in, fan_out)
    = 2, and a rank-16 update of a 768x2 matrix can be any 768x2 matrix anyway: training the head in full is
    the same function class with fewer parameters, and it lands in the adapter checkpoint, so nothing depends
    on re-creating a frozen random head.
    """
    if scanned:  # one adapter per stacked block: A (n_layer, in, r), B (n_layer, r, out)
        return jaxlora.LoraConfig(
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            targets=(SCANNED_BLOCK_LINEARS,),
            stacked_axes={SCANNED_BLOCK_LINEARS: 1},
            modules_to_save=(r"head/kernel",),
        )
    return jaxlora.LoraConfig(
        rank=rank, alpha=alpha, dropout=dropout, targets=(BLOCK_LINEARS,), modules_to_save=(r"head/kernel",)
    )


def explain_trainable_count(rank: int = 16) -> str:
    """Our trainable count on GPT-2 124M with the recipe's rank next to the published one, from shapes only."""
    config = GPT2Config.from_name("gpt2")
    shapes = jax.eval_shape(
        lambda: GPT2Classifier(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    )
    ours = jaxlora.plan(shapes, lora_config(rank, rank))
    d, blocks = config.n_embd, config.n_layer
    fused = blocks * rank * (d + 3 * d)  # c_attn: one (d, 3d) layer
    separate = blocks * 3 * rank * (d + d)  # the recipe: W_query, W_key, W_value, each (d, d)
    head_lora = rank * (d + 2)
    head_full = d * 2
    derived = ours.num_trainable - fused + separate - head_full + head_lora
    return (
        f"Trainable parameters on GPT-2 124M: {ours.num_trainable:,} (LoRA {ours.num_lora:,} + head {ours.num_saved:,})"
        f" vs the published {PUBLISHED_TRAINABLE:,}.\n"
        f"  GPT-2's fused c_attn (768->2304) takes r*(768+2304) = {fused // blocks:,} per block where separate q/k/v"
        f" take 3*r*(768+768) = {separate // blocks:,}: {separate - fused:,} fewer over 12 blocks;\n"
        f"  the head trained in full has {head_full:,} parameters where LoRA on it has r*(768+2) = {head_lora:,}.\n"
        f"  Undoing both differences gives {derived:,}"
        f" ({'equal to' if derived == PUBLISHED_TRAINABLE else 'NOT equal to'} the published count)."
    )


def make_steps(model: GPT2Classifier, plan: jaxlora.Plan, tx: optax.GradientTransformation):
    """Jitted train step and evaluation (loss sum, correct count) over the LoRA-adapted classifier."""
    forward = jaxlora.apply_fn(model, plan, strict=True)  # every adapter served factored, or an error

    def logits_fn(trainable, frozen, ids, lengths, dropout_rng=None):
        params, adapters = jaxlora.combine(trainable, frozen)
        rngs = None if dropout_rng is None else {jaxlora.DROPOUT_RNG: dropout_rng}
        return forward({"params": params}, adapters, ids, lengths, rngs=rngs)

    @jax.jit
    def train_step(trainable, frozen, opt_state, ids, lengths, labels, key):
        def loss_fn(trainable):
            logits = logits_fn(trainable, frozen, ids, lengths, key if plan.config.dropout > 0 else None)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    @jax.jit
    def eval_step(trainable, frozen, ids, lengths, labels):
        logits = logits_fn(trainable, frozen, ids, lengths)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
        return loss, (jnp.argmax(logits, -1) == labels).sum()

    return train_step, eval_step


def evaluate(eval_step, trainable, frozen, batch_iter: Iterator[Batch], max_batches: int | None = None):
    """(mean loss, accuracy) over the batches (the first `max_batches` of them when given)."""
    loss = correct = count = 0.0
    for i, batch in enumerate(batch_iter):
        if max_batches is not None and i >= max_batches:
            break
        batch_loss, batch_correct = eval_step(trainable, frozen, batch.ids, batch.lengths, batch.labels)
        loss, correct, count = loss + float(batch_loss), correct + int(batch_correct), count + len(batch.labels)
    return loss / count, correct / count


def by_length(split: spam_data.EncodedSplit) -> spam_data.EncodedSplit:
    """The split sorted by message length: evaluation batches then carry little padding."""
    order = np.argsort(split.lengths, kind="stable")
    return spam_data.EncodedSplit(split.ids[order], split.lengths[order], split.labels[order])


# --------------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------------


def plot(out: Path, history: dict[str, list], pretrain_losses: list[float]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["examples_seen"], history["train_loss"], label="train (5 batches)")
    ax.plot(history["examples_seen"], history["val_loss"], linestyle="-.", label="validation (5 batches)")
    ax.set(xlabel="examples seen", ylabel="cross-entropy", title="LoRA fine-tuning loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    written.append(out / "loss.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = range(1, len(history["train_acc"]) + 1)
    ax.plot(epochs, history["train_acc"], marker="o", label="train")
    ax.plot(epochs, history["val_acc"], marker="o", linestyle="-.", label="validation")
    ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy after each epoch", ylim=(0, 1.02), xticks=list(epochs))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    written.append(out / "accuracy.png")
    plt.close(fig)

    if pretrain_losses:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(pretrain_losses)
        ax.set(xlabel="step", ylabel="next-token cross-entropy", title="Offline GPT-2 pretraining")
        fig.tight_layout()
        fig.savefig(out / "pretrain_loss.png", dpi=120)
        written.append(out / "pretrain_loss.png")
        plt.close(fig)
    return written


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def encode_data(args: argparse.Namespace, encoding, splits) -> dict[str, spam_data.EncodedSplit]:
    data = spam_data.encode_splits(encoding, splits)
    if args.quick:
        data = {name: subset(split, 96 if name == "train" else 32) for name, split in data.items()}
    source = f"reference split {args.reference_split}" if args.reference_split else "balanced UCI collection"
    source = "synthetic messages" if offline_quick(args)[1] else source
    counts = ", ".join(f"{name} {len(s)} ({int(s.labels.sum())} spam)" for name, s in data.items())
    print(f"SMS spam ({source}): {counts}; padded to {data['train'].ids.shape[1]} tokens (longest training message).")
    return data


def base_model(
    args: argparse.Namespace, train: spam_data.EncodedSplit, timings: dict, encoding=None
) -> tuple[GPT2Config, Params, list]:
    """The frozen GPT-2: restored, pretrained here (--offline-pretrain), or Hugging Face weights."""
    if args.pretrained is not None:
        config, params = restore_pretrained(args.pretrained)
        print(f"Restored the pretrained GPT-2 from {args.pretrained}.")
        return config, params, []
    if not args.offline_pretrain:
        config, params = load_pretrained_weights(args.weights)
        print(f"Loaded GPT-2 weights from {args.weights} ({config.n_layer} layers, width {config.n_embd}).")
        return config, params, []
    config = QUICK_MODEL if args.quick else OFFLINE_MODEL
    if isinstance(encoding, spam_data.ByteEncoding):  # --quick offline: a 257-token vocabulary
        config = dataclasses.replace(config, vocab_size=encoding.n_vocab)
    corpus = lm_corpus(train, getattr(encoding, "eot_token", spam_data.PAD_TOKEN_ID))
    print(
        f"Offline: pretraining GPT-2 ({config.n_layer} layers, width {config.n_embd}, {config.n_head} heads) as a "
        f"language model on the {len(corpus):,} tokens of the training texts ({len(np.unique(corpus)):,} distinct), "
        f"{args.pretrain_epochs} epochs."
    )
    t = time.perf_counter()
    params, losses = pretrain(config, corpus, args)
    timings["pretrain_s"] = time.perf_counter() - t
    save_pretrained(args.out / "pretrained", config, params)
    print(
        f"Pretrained in {timings['pretrain_s']:.0f} s, final loss {np.mean(losses[-20:]):.3f}; saved with orbax to "
        f"{args.out / 'pretrained'} (reuse it with --pretrained)."
    )
    return config, params, losses


def fine_tune(args, model, plan, trainable, frozen, data, timings) -> tuple[Params, dict[str, list], Any]:
    """The recipe's loop: loss on `eval_iter` batches every `eval_freq` steps, accuracy after every epoch."""
    steps_per_epoch = len(data["train"]) // args.batch_size
    cosine = args.schedule == "cosine"
    lr = optax.cosine_decay_schedule(args.lr, steps_per_epoch * args.epochs) if cosine else args.lr
    tx = jaxlora.optimizer(optax.adamw(lr, weight_decay=args.weight_decay), plan)
    opt_state = tx.init(trainable)
    train_step, eval_step = make_steps(model, plan, tx)
    first = next(batches(data["train"], args.batch_size, np.random.default_rng(0)))
    t = time.perf_counter()
    train_step.lower(trainable, frozen, opt_state, first.ids, first.lengths, first.labels, jax.random.key(0)).compile()
    timings["compile_s"] = time.perf_counter() - t
    layout = "scanned blocks" if args.scan_layers else "unrolled blocks"
    print(f"Compiled the training step in {timings['compile_s']:.1f} s ({layout}).")
    rng, eval_rng = np.random.default_rng(args.seed), np.random.default_rng(args.seed + 1)
    key = jax.random.key(args.seed + 3)
    train_sorted, val_sorted = by_length(data["train"]), by_length(data["validation"])
    history: dict[str, list] = {k: [] for k in ("examples_seen", "train_loss", "val_loss", "train_acc", "val_acc")}
    print(
        f"Fine-tuning: AdamW lr {args.lr:g}{' (cosine decay)' if cosine else ''}, weight decay "
        f"{args.weight_decay:g}, batch {args.batch_size}, {args.epochs} epochs of {steps_per_epoch} steps."
    )
    step = examples_seen = 0
    with Progress(steps_per_epoch * args.epochs, "fine-tune", "step") as bar:
        for epoch in range(1, args.epochs + 1):
            for batch in batches(data["train"], args.batch_size, rng):
                key, sub = jax.random.split(key)
                trainable, opt_state, loss = train_step(
                    trainable, frozen, opt_state, batch.ids, batch.lengths, batch.labels, sub
                )
                examples_seen += len(batch.labels)
                if step % args.eval_freq == 0:
                    shuffled = batches(data["train"], args.batch_size, eval_rng)
                    train_loss, _ = evaluate(eval_step, trainable, frozen, shuffled, args.eval_iter)
                    in_order = batches(data["validation"], args.batch_size)
                    val_loss, _ = evaluate(eval_step, trainable, frozen, in_order, args.eval_iter)
                    for k, v in (("examples_seen", examples_seen), ("train_loss", train_loss), ("val_loss", val_loss)):
                        history[k].append(v)
                    bar.write(f"Ep {epoch} (step {step:06d}): train loss {train_loss:.3f}, val loss {val_loss:.3f}")
                step += 1
                bar.update(epoch=epoch, loss=f"{float(loss):.3f}")
            history["train_acc"].append(evaluate(eval_step, trainable, frozen, batches(train_sorted, 64))[1])
            history["val_acc"].append(evaluate(eval_step, trainable, frozen, batches(val_sorted, 64))[1])
            bar.write(
                f"Epoch {epoch}: training accuracy {100 * history['train_acc'][-1]:.2f}% | "
                f"validation accuracy {100 * history['val_acc'][-1]:.2f}%"
            )
    return trainable, history, eval_step


def save_and_check(args, model, params, adapters, plan, head, test: spam_data.EncodedSplit) -> bool:
    """Save adapter + head with jaxlora.checkpoint, reload onto the base, and compare logits."""
    directory = jaxlora.checkpoint.save_adapter(args.out / "adapter", params, adapters, plan, overwrite=True)
    base = {**params, "head": head}  # the base as a user re-creates it: the trained head comes from the checkpoint
    restored_params, restored_adapters, restored_plan = jaxlora.checkpoint.load_adapter(directory, base)
    probe = _cut(test, np.arange(min(16, len(test))))

    def logits(plan):
        return jax.jit(lambda p, a: jaxlora.apply(model, {"params": p}, a, plan, probe.ids, probe.lengths))

    before = logits(plan)(params, adapters)
    after = logits(restored_plan)(restored_params, restored_adapters)
    same = bool(np.allclose(np.asarray(before), np.asarray(after), atol=1e-6))
    print(f"Saved the adapter and head to {directory}; reloading it reproduces the logits: {same}.")
    return same


class MissingInputs(Exception):
    """What the run needs and cannot have, one line each (what, why, where to get it)."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def fetch_hub_weights(repo_id: str) -> Path:
    """The folder holding config.json and model.safetensors of a Hugging Face Hub repo, downloaded once.

    huggingface_hub keeps them in its cache; its retry warnings are silenced (an offline failure becomes one
    line), and its progress bars show on a terminal only.
    """
    import huggingface_hub
    from huggingface_hub.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bars = on_terminal()
    if not bars:
        huggingface_hub.utils.disable_progress_bars()
    print(f"Fetching {', '.join(HUB_FILES)} of {repo_id} from the Hugging Face Hub (cached after the first time)...")
    try:
        folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=list(HUB_FILES))
    except Exception as err:
        raise spam_data.Unavailable(
            f"GPT-2 weights: could not get {repo_id} from the Hugging Face Hub or its cache ({spam_data._short(err)}); "
            "run once "
            "with internet, pass --weights PATH to a local model.safetensors, or use --offline-pretrain"
        ) from err
    finally:
        hf_logging.set_verbosity(verbosity)
        if not bars:
            huggingface_hub.utils.enable_progress_bars()
    return Path(folder)


def resolve_weights(weights: str) -> str:
    """A local path as given; a hub id (or gpt2 / gpt2-medium / ... for openai-community's) downloaded first."""
    if Path(weights).expanduser().exists():
        return weights
    repo_id = HUB_ALIASES.get(weights, weights)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")) or repo_id.endswith(".safetensors"):
        raise spam_data.Unavailable(
            f"GPT-2 weights: {weights} does not exist; pass --weights PATH to a model.safetensors file or its "
            "folder, a Hugging Face Hub id such as gpt2, or use --offline-pretrain"
        )
    return str(fetch_hub_weights(repo_id))


def offline_quick(args: argparse.Namespace) -> tuple[bool, bool]:
    """(byte tokens, synthetic messages): what a --quick run uses for what it was not pointed at.

    --quick reads no file and downloads nothing unless asked: without --bpe-dir (and with a base pretrained here)
    it tokenizes UTF-8 bytes, without --data-dir / --reference-split it trains on synthetic messages.
    """
    if not args.quick:
        return False, False
    own_base = args.offline_pretrain or args.pretrained is not None
    return own_base and args.bpe_dir is None, args.data_dir is None and args.reference_split is None


def gather_inputs(args: argparse.Namespace):
    """The tokenizer, the encoded data and the weights' local path, or MissingInputs naming each that failed."""
    problems, encoding, data = [], None, None
    byte_tokens, synthetic = offline_quick(args)
    if byte_tokens or synthetic:
        print(
            "--quick runs offline: "
            + " and ".join(
                what
                for what, used in (("byte tokens (not GPT-2's BPE)", byte_tokens), ("synthetic SMS", synthetic))
                if used
            )
            + "; pass --bpe-dir and --data-dir for the real ones."
        )
    try:
        encoding = spam_data.ByteEncoding() if byte_tokens else spam_data.gpt2_encoding(args.bpe_dir)
    except spam_data.Unavailable as err:
        problems.append(str(err))
    try:
        if synthetic:
            splits = spam_data.synthetic_splits(seed=args.split_seed)
        else:
            splits = spam_data.load_splits(args.data_dir, args.reference_split, seed=args.split_seed)
    except (spam_data.Unavailable, FileNotFoundError) as err:
        problems.append(str(err) if isinstance(err, spam_data.Unavailable) else f"the SMS spam split: {err}")
    else:
        if encoding is not None:
            data = encode_data(args, encoding, splits)
    if not (args.offline_pretrain or args.pretrained is not None):
        try:
            args.weights = resolve_weights(args.weights)
        except spam_data.Unavailable as err:
            problems.append(str(err))
    if problems:
        raise MissingInputs(problems)
    return encoding, data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    timings: dict[str, float] = {}

    encoding, data = gather_inputs(args)  # all that can be missing is checked before any work
    args.out.mkdir(parents=True, exist_ok=True)
    gpt_config, params, pretrain_losses = base_model(args, data["train"], timings, encoding)
    gpt_config = dataclasses.replace(gpt_config, dropout=0.0)  # the recipe fine-tunes without dropout
    if args.scan_layers and not gpt_config.scan_layers:
        gpt_config = dataclasses.replace(gpt_config, scan_layers=True)
        params = stack_layers(params, gpt_config.n_layer)
    if data["train"].ids.shape[1] > gpt_config.n_positions:
        raise ValueError(
            f"Messages of {data['train'].ids.shape[1]} tokens exceed n_positions={gpt_config.n_positions}."
        )
    prompt = encoding.encode_ordinary("Congratulations! You have won")
    sample = generate_greedy(GPT2(gpt_config), params, prompt, max_new_tokens=12)
    print(f"  greedy sample from the base: {encoding.decode(np.asarray(sample).tolist())!r}")

    model = GPT2Classifier(gpt_config, num_classes=2)
    head = init_params(model, args.seed)["head"]
    params = {**params, "head": head}
    config = lora_config(args.rank, args.alpha, args.lora_dropout, scanned=gpt_config.scan_layers)
    plan = jaxlora.plan(params, config)  # resolved once, handed to everything below
    (args.out / "lora_plan.txt").write_text(str(plan) + "\n")
    params, adapters = jaxlora.init(jax.random.key(args.seed + 2), params, plan)
    trainable, frozen = jaxlora.partition(params, adapters, plan)
    num_trainable = jaxlora.count_params(trainable)
    print(
        f"LoRA rank {args.rank}, alpha {args.alpha:g} on {len(plan.leaves)} block linears, head trained in full: "
        f"{num_trainable:,} trainable of {plan.num_original:,} ({100 * num_trainable / plan.num_original:.2f}%); "
        f"table in {args.out / 'lora_plan.txt'}."
    )
    print(explain_trainable_count())

    t = time.perf_counter()
    trainable, history, eval_step = fine_tune(args, model, plan, trainable, frozen, data, timings)
    timings["finetune_s"] = time.perf_counter() - t
    accuracy = {
        name: evaluate(eval_step, trainable, frozen, batches(by_length(split), 64))[1] for name, split in data.items()
    }
    print(
        f"Fine-tuned in {timings['finetune_s']:.0f} s. Accuracy: "
        + " | ".join(f"{name} {100 * acc:.2f}%" for name, acc in accuracy.items())
    )

    params, adapters = jaxlora.combine(trainable, frozen)
    reload_ok = save_and_check(args, model, params, adapters, plan, head, data["test"])
    figures = plot(args.out, history, pretrain_losses)
    timings["total_s"] = time.perf_counter() - start
    metrics = {
        "accuracy": accuracy,
        "history": history,
        "trainable_params": num_trainable,
        "published_trainable_params": PUBLISHED_TRAINABLE,
        "timings": timings,
        "reload_ok": reload_ok,
        "model": gpt_config.to_dict(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"Plots: {', '.join(str(f) for f in figures)}; metrics: {args.out / 'metrics.json'}.")
    print(f"Total {timings['total_s']:.0f} s.")
    return metrics


def cli(argv: list[str] | None = None) -> int:
    """`main` for the command line: what cannot be had is one `error:` line each on stderr, not a traceback."""
    try:
        main(argv)
    except MissingInputs as err:
        for problem in err.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as err:  # a bad --weights / --pretrained / data file: named inside
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
