"""Instruction-style LoRA fine-tuning of a small Llama-family causal LM, exported as a PEFT adapter.

Every SMS of the spam collection becomes two instructions, answered by the model as text:

    Instruction: Is this text message spam or ham?        Instruction: What is the first word of this text message?
    Message: <sms>                                        Message: <sms>
    Answer: spam<eos>                                     Answer: Free<eos>

The loss is the cross-entropy of the answer tokens only (the prompt is masked out). Before and after training
the example reports the validation answer loss and the exact-match accuracy of greedy answers (KV-cache
generation, left-padded prompts), per instruction. LoRA (rank 8, alpha 16) sits on PEFT's usual targets
(q/k/v/o_proj, gate/up/down_proj) of the unrolled layout; the adapter is written as a PEFT directory that
``peft.PeftModel.from_pretrained`` loads onto the transformers model.

Where the base comes from:

    python examples/llama_sft.py --model Qwen/Qwen2.5-0.5B   # any small HF Llama/Qwen2 repo id or local dir
    python examples/llama_sft.py                             # offline: pretrain a tiny Llama on the SMS texts
    python examples/llama_sft.py --quick                     # tiny model, few steps; offline: byte tokens and
                                                             # synthetic SMS unless --bpe-dir / --data-dir

Offline, a tiny Llama (4 layers, width 128, 4 query / 2 key-value heads, untied head) is pretrained here as a
causal LM on the training messages only, with GPT-2's BPE restricted to the token ids those texts and the
instruction templates use (others map to one unknown id). It is pretrained in the scanned layout, converted to
the unrolled one for LoRA, and saved as a Hugging Face checkpoint (``<out>/base``) so that PyTorch can load it
as the adapter's base. Data: ``--data-dir`` (the UCI ``SMSSpamCollection``), ``--bpe-dir`` (GPT-2's BPE files).
"""

from __future__ import annotations

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
from flax import nnx

import jaxlora
from jaxlora.models import llama
from jaxlora.peft_format import save_peft

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spam_data

TASKS = {
    "spam": "Instruction: Is this text message spam or ham?\nMessage: {text}\nAnswer:",
    "first_word": "Instruction: What is the first word of this text message?\nMessage: {text}\nAnswer:",
}
OFFLINE_MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4)
QUICK_MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
GPT2_EOS = 50256


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF repo id or local checkpoint of a Llama/Qwen2 model (default: offline)")
    parser.add_argument("--data-dir", type=Path, help="SMSSpamCollection file or folder (default: download)")
    parser.add_argument("--bpe-dir", type=Path, help="GPT-2's encoder.json + vocab.bpe (offline tokenizer)")
    parser.add_argument("--max-message-tokens", type=int, default=40, help="messages are cut to this many tokens")
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--pretrain-lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lr", type=float, help="LoRA learning rate (default 2e-3 offline, 2e-4 with --model)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-examples", type=int, default=200, help="validation prompts answered by generation")
    parser.add_argument("--quick", action="store_true", help="tiny model, data subset, few steps (for tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/llama_sft"))
    args = parser.parse_args(argv)
    if args.quick:
        args.pretrain_epochs = min(args.pretrain_epochs, 3)
        args.epochs = min(args.epochs, 3)
        args.eval_examples = min(args.eval_examples, 16)
        args.max_message_tokens = min(args.max_message_tokens, 16)
    if args.lr is None:
        args.lr = 2e-4 if args.model else 2e-3
    return args


# --------------------------------------------------------------------------------------------------------------
# Tokenizers: GPT-2's BPE on a compact vocabulary (offline), or the model's own (--model)
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompactBPE:
    """GPT-2's BPE (or `spam_data.ByteEncoding`) restricted to `vocab` (sorted ids); others map to one unknown id."""

    encoding: Any
    vocab: np.ndarray

    @classmethod
    def from_texts(cls, encoding, texts: list[str]) -> CompactBPE:
        ids = {getattr(encoding, "eot_token", GPT2_EOS)} | {t for text in texts for t in encoding.encode_ordinary(text)}
        return cls(encoding, np.array(sorted(ids)))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 1

    @property
    def eos_id(self) -> int:
        return int(np.searchsorted(self.vocab, getattr(self.encoding, "eot_token", GPT2_EOS)))

    pad_id = eos_id

    def encode(self, text: str) -> list[int]:
        ids = np.array(self.encoding.encode_ordinary(text), np.int64)
        index = np.searchsorted(self.vocab, ids).clip(0, len(self.vocab) - 1)
        return np.where(self.vocab[index] == ids, index, len(self.vocab)).tolist()

    def decode(self, ids: list[int]) -> str:
        return "".join("\ufffd" if i >= len(self.vocab) else self.encoding.decode([int(self.vocab[i])]) for i in ids)


@dataclasses.dataclass(frozen=True)
class HFTokenizer:
    """A transformers tokenizer behind the same four members."""

    tokenizer: Any

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


# --------------------------------------------------------------------------------------------------------------
# Instruction data
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SFTData:
    """Right-padded sequences (prompt + answer + eos), the answer mask over them, and the parts for generation."""

    ids: np.ndarray  # (n, length)
    answer_mask: np.ndarray  # (n, length) bool: answer and eos tokens
    prompts: list[list[int]]
    answers: list[list[int]]  # answer tokens + eos
    tasks: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


def short_text(tokenizer, text: str, max_tokens: int) -> str:
    """The message cut to `max_tokens` tokens (re-decoded, so it is plain text in the prompt)."""
    return tokenizer.decode(tokenizer.encode(text)[:max_tokens]).strip()


def instructions(examples: list[spam_data.Example], tokenizer, max_tokens: int) -> list[tuple[str, str, str]]:
    """(task, prompt, answer) for every message and instruction; messages with no word are skipped."""
    rows = []
    for label, text in examples:
        text = short_text(tokenizer, text, max_tokens)
        if not text.split():
            continue
        rows.append(("spam", TASKS["spam"].format(text=text), " spam" if label else " ham"))
        rows.append(("first_word", TASKS["first_word"].format(text=text), " " + text.split()[0]))
    return rows


def encode_sft(rows: list[tuple[str, str, str]], tokenizer) -> SFTData:
    prompts = [tokenizer.encode(prompt) for _, prompt, _ in rows]
    answers = [[*tokenizer.encode(answer), tokenizer.eos_id] for _, _, answer in rows]
    length = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
    ids = np.full((len(rows), length), tokenizer.pad_id, np.int32)
    mask = np.zeros((len(rows), length), bool)
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        ids[i, : len(p) + len(a)] = p + a
        mask[i, len(p) : len(p) + len(a)] = True
    return SFTData(ids, mask, prompts, answers, [task for task, _, _ in rows])


# --------------------------------------------------------------------------------------------------------------
# Base model
# --------------------------------------------------------------------------------------------------------------


def pretrain(config: llama.LlamaConfig, stream: np.ndarray, args: argparse.Namespace) -> llama.Llama:
    """Causal-LM pretraining of a fresh scanned model on `stream` (64-token windows, AdamW, cosine decay)."""
    block, batch = 64 if not args.quick else 32, 16
    steps_per_epoch = max(1, (len(stream) - 1) // block // batch)
    total = steps_per_epoch * args.pretrain_epochs
    model = llama.Llama(config, scan_layers=True, rngs=nnx.Rngs(args.seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.pretrain_lr, min(100, total // 10 + 1), total)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, windows):
        def loss_fn(model):
            logits = model(windows[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(args.seed)
    losses = []
    for _ in range(args.pretrain_epochs):
        starts = rng.permutation(len(stream) - block - 1)[: steps_per_epoch * batch].reshape(steps_per_epoch, batch)
        for rows in starts:
            losses.append(float(step(model, optimizer, np.stack([stream[s : s + block + 1] for s in rows]))))
    print(f"  pretrained {total} steps: loss {np.mean(losses[:5]):.3f} -> {np.mean(losses[-5:]):.3f}")
    return model


def offline_base(args, train: list[spam_data.Example]) -> tuple[llama.Llama, CompactBPE, Path]:
    """A tiny Llama pretrained on the training messages, unrolled, saved as an HF checkpoint for torch."""
    encoding = spam_data.ByteEncoding() if offline_quick(args)[0] else spam_data.gpt2_encoding(args.bpe_dir)
    templates = [t.format(text="") + " spam ham" for t in TASKS.values()]
    tokenizer = CompactBPE.from_texts(encoding, [text for _, text in train] + templates)
    shape = QUICK_MODEL if args.quick else OFFLINE_MODEL
    config = llama.LlamaConfig(
        vocab_size=tokenizer.vocab_size, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, **shape,
    )  # fmt: skip
    stream = np.concatenate([[*tokenizer.encode(text), tokenizer.eos_id] for _, text in train]).astype(np.int32)
    print(f"Offline: pretraining a tiny Llama ({shape}) on {len(stream):,} tokens of training messages.")
    model = llama.convert_layout(pretrain(config, stream, args), scan_layers=False)
    return model, tokenizer, llama.save_hf_weights(model, args.out / "base")


def hub_base(args) -> tuple[llama.Llama, HFTokenizer, str]:
    import transformers

    model = llama.load_hf_weights(args.model, scan_layers=False, dtype=jnp.float32)  # names the offline fix
    tokenizer = HFTokenizer(transformers.AutoTokenizer.from_pretrained(args.model))
    print(f"Loaded {args.model}: {model.config.num_hidden_layers} layers, width {model.config.hidden_size}.")
    return model, tokenizer, args.model


# --------------------------------------------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------------------------------------------


def answer_loss(logits: jax.Array, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of answer-token cross-entropies, number of answer tokens): position t predicts token t + 1."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:])
    weights = mask[:, 1:].astype(jnp.float32)
    return (losses * weights).sum(), weights.sum()


def make_steps(graphdef, frozen, config: jaxlora.LoraConfig, tx):
    def logits_fn(trainable, ids):
        state, adapters = jaxlora.combine(trainable, frozen)
        return nnx.merge(graphdef, jaxlora.merge(state, adapters, config))(ids)

    @jax.jit
    def train_step(trainable, opt_state, ids, mask):
        def loss_fn(trainable):
            total, count = answer_loss(logits_fn(trainable, ids), ids, mask)
            return total / jnp.maximum(count, 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    @jax.jit
    def eval_step(trainable, ids, mask):
        return answer_loss(logits_fn(trainable, ids), ids, mask)

    return train_step, eval_step


def evaluate(model: llama.Llama, data: SFTData, eval_step, trainable, tokenizer, n_generate: int) -> dict:
    """Answer loss on all of `data`, exact-match accuracy of greedy answers on its first `n_generate` rows."""
    total = count = 0.0
    for start in range(0, len(data), 64):
        s, c = eval_step(trainable, data.ids[start : start + 64], data.answer_mask[start : start + 64])
        total, count = total + float(s), count + float(c)
    rows = list(range(min(n_generate, len(data))))
    width = max(len(data.prompts[i]) for i in rows)
    prompts = np.full((len(rows), width), tokenizer.pad_id, np.int32)
    mask = np.zeros_like(prompts)
    for j, i in enumerate(rows):
        prompts[j, width - len(data.prompts[i]) :], mask[j, width - len(data.prompts[i]) :] = data.prompts[i], 1
    steps = max(len(data.answers[i]) for i in rows)
    out = np.asarray(
        llama.generate(model, prompts, steps, attention_mask=mask, eos_token_id=tokenizer.eos_id,
                       pad_token_id=tokenizer.pad_id)
    )[:, width:]  # fmt: skip
    correct: dict[str, list[bool]] = {task: [] for task in TASKS}
    for j, i in enumerate(rows):
        want = data.answers[i]
        correct[data.tasks[i]].append(out[j, : len(want)].tolist() == want)
    accuracy = {task: float(np.mean(hits)) if hits else float("nan") for task, hits in correct.items()}
    return {"answer_loss": total / count, "exact_match": accuracy, "sample": tokenizer.decode(out[0].tolist())}


def fine_tune(args, model, data: dict[str, SFTData], tokenizer) -> tuple[Any, Any, jaxlora.LoraConfig, dict]:
    graphdef, state = nnx.split(model)
    config = jaxlora.LoraConfig(rank=args.rank, alpha=args.alpha, targets=(llama.PEFT_TARGETS,))
    state, adapters = jaxlora.init(jax.random.key(args.seed + 1), state, config)
    trainable, frozen = jaxlora.partition(state, adapters, config)
    train = data["train"]
    steps = args.epochs * (len(train) // args.batch_size)
    tx = jaxlora.optimizer(optax.adamw(optax.cosine_decay_schedule(args.lr, steps), weight_decay=0.0), config)
    opt_state = tx.init(trainable)
    train_step, eval_step = make_steps(graphdef, frozen, config, tx)
    plan = jaxlora.plan(state, config)
    print(f"LoRA r={args.rank} alpha={args.alpha:g} on {len(plan.leaves)} linears: {plan.num_lora:,} parameters "
          f"({100 * plan.num_lora / plan.num_original:.2f}% of {plan.num_original:,}).")  # fmt: skip

    def merged(trainable):
        s, a = jaxlora.combine(trainable, frozen)
        return nnx.merge(graphdef, jaxlora.merge(s, a, config))

    report = {"before": evaluate(model, data["validation"], eval_step, trainable, tokenizer, args.eval_examples)}
    print(f"Before: {report['before']}")
    rng = np.random.default_rng(args.seed)
    t, losses = time.perf_counter(), []
    for _ in range(args.epochs):
        order = rng.permutation(len(train))
        for start in range(0, len(train) - args.batch_size + 1, args.batch_size):
            rows = order[start : start + args.batch_size]
            trainable, opt_state, loss = train_step(trainable, opt_state, train.ids[rows], train.answer_mask[rows])
            losses.append(float(loss))
    report["train_s"], report["steps"] = time.perf_counter() - t, len(losses)
    report["train_loss"] = [float(np.mean(losses[:5])), float(np.mean(losses[-5:]))]
    val = data["validation"]
    report["after"] = evaluate(merged(trainable), val, eval_step, trainable, tokenizer, args.eval_examples)
    print(f"After {len(losses)} steps ({report['train_s']:.0f} s): {report['after']}")
    state, adapters = jaxlora.combine(trainable, frozen)
    return state, adapters, config, report


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def offline_quick(args: argparse.Namespace) -> tuple[bool, bool]:
    """(byte tokens, synthetic messages): --quick reads no file and downloads nothing it was not pointed at."""
    if not args.quick:
        return False, False
    return not args.model and args.bpe_dir is None, args.data_dir is None


def inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The SMS splits, after checking that everything the run needs can be had (SystemExit naming each missing
    thing, one line each, otherwise)."""
    problems, splits = [], {}
    byte_tokens, synthetic = offline_quick(args)
    if byte_tokens or synthetic:
        used = [
            what for what, on in (("byte tokens (not GPT-2's BPE)", byte_tokens), ("synthetic SMS", synthetic)) if on
        ]
        print(f"--quick runs offline: {' and '.join(used)}; pass --bpe-dir and --data-dir for the real ones.")
    if not args.model and not byte_tokens:
        try:
            spam_data.gpt2_encoding(args.bpe_dir)
        except spam_data.Unavailable as err:
            problems.append(str(err))
    try:
        splits = (
            spam_data.synthetic_splits(seed=args.seed)
            if synthetic
            else spam_data.load_splits(args.data_dir, seed=args.seed)
        )
    except spam_data.Unavailable as err:
        problems.append(str(err))
    if problems:
        raise SystemExit("\n".join(f"error: {' '.join(problem.split())}" for problem in problems))
    return splits


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    splits = inputs(args)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        splits = {"train": splits["train"][:96], "validation": splits["validation"][:16]}
    model, tokenizer, base_path = hub_base(args) if args.model else offline_base(args, splits["train"])
    data = {
        name: encode_sft(instructions(splits[name], tokenizer, args.max_message_tokens), tokenizer)
        for name in ("train", "validation")
    }
    print(f"Instructions: {len(data['train'])} training, {len(data['validation'])} validation "
          f"(sequences up to {data['train'].ids.shape[1]} tokens).")  # fmt: skip
    state, adapters, config, report = fine_tune(args, model, data, tokenizer)

    directory = save_peft(
        args.out / "adapter", state, adapters, config, name_map=llama.peft_name_map(model.config),
        base_model_name_or_path=str(base_path), task_type="CAUSAL_LM", overwrite=True,
    )  # fmt: skip
    graphdef = nnx.graphdef(model)
    probe = data["validation"].ids[:4]
    logits = nnx.merge(graphdef, jaxlora.merge(state, adapters, config))(jnp.asarray(probe))
    np.savez(args.out / "probe.npz", ids=probe, logits=np.asarray(logits, np.float32))
    print(f"PEFT adapter: {directory} (base {base_path}); probe logits in {args.out / 'probe.npz'}.")
    metrics = {**report, "base": str(base_path), "adapter": str(directory), "args": vars(args)}
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


if __name__ == "__main__":
    main()
