"""Serving several LoRA adapters of one GPT-2 in ONE mixed batch, decoding incrementally with a KV cache.

One frozen GPT-2 base and three adapters trained here for different tasks:

* ``spam``    reads ``SMS: <message>\\nVerdict:`` and answers `` spam`` or `` ham`` (classification as next tokens,
              no classifier head), trained on the SMS Spam Collection;
* ``weather`` writes weather reports (``Weather in Oslo: light rain, 12 C, wind from the west.``);
* ``shout``   writes shouted exclamations (``HEY SAM! THE PIZZA IS AMAZING!!!``).

The three go into one ``jaxlora.adapter_bank``; a batch of prompts of different lengths, each row naming its
adapter (or the base model), is left-padded and decoded in one compiled program by
``jaxlora.models.gpt2.generate`` with ``jaxlora.apply_bank`` as the forward: prefill once, then one token per
step for every row at once. Each row's output is then checked against running that row ALONE with its adapter
merged into the weights (``jaxlora.merge``): the tokens must be equal.

Where things come from (all optional, the example runs offline without any of them):

    python examples/multi_adapter.py                 # small GPT-2 pretrained here, three adapters: ~6 min
    python examples/multi_adapter.py --quick         # tiny model, few steps: about a minute on a laptop CPU
    python examples/multi_adapter.py --weights gpt2  # Hugging Face GPT-2 weights (a path or a hub id)

* Tokenizer: for the base pretrained here, UTF-8 bytes (ids 0..255, <|endoftext|> 256: a 257-token softmax, so the
  default run takes minutes on a CPU); with ``--weights`` (or ``--tokenizer bpe``) GPT-2's BPE through tiktoken
  (``--bpe-dir``, tiktoken's cache or a download, as in gpt2_spam.py).
* Spam data: ``--data-dir`` (the UCI ``SMSSpamCollection``), ``../shared/data`` beside the checkout, the cache or a
  download (sha256 pinned, as in gpt2_spam.py); when none works, synthetic messages that ship with this file.
* Weather and shout texts are generated from templates in this file.
* Base model: without ``--weights`` a small GPT-2 is pretrained here as a language model on all the training
  texts (gpt2_spam.py's ``pretrain``), as gpt2_spam.py's ``--offline-pretrain`` does.

Outputs in ``--out``: ``metrics.json`` (rows, equality with the merged rows, spam accuracy, timings).
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

import jaxlora
from jaxlora.models.gpt2 import GPT2, GPT2Config, generate, left_pad

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpt2_spam
import spam_data
from progress import Progress

EOT = 50256  # <|endoftext|>
OFFLINE_MODEL = GPT2Config(n_positions=256, n_embd=128, n_layer=2, n_head=4, dropout=0.0)
QUICK_MODEL = GPT2Config(n_positions=256, n_embd=48, n_layer=2, n_head=2, dropout=0.0)
ADAPTERS = ("spam", "weather", "shout")

# --------------------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 and <|endoftext|> 256: a GPT-2 with a 257-token vocabulary (cheap softmax)."""

    name = "bytes"
    eot = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """GPT-2's BPE (tiktoken)."""

    name = "gpt2-bpe"
    eot = EOT
    vocab_size = 50257

    def __init__(self, encoding):
        self.encoding = encoding

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.encoding.decode([int(i) for i in ids if int(i) != EOT])


def tokenizer(args: argparse.Namespace):
    """Bytes for the small base pretrained here (a 257-token softmax, minutes instead of hours on a CPU); GPT-2's
    BPE with --weights (which needs it) or --tokenizer bpe."""
    if args.tokenizer == "bytes" or (args.tokenizer == "auto" and not args.weights):
        return ByteTokenizer()
    try:
        return BPETokenizer(spam_data.gpt2_encoding(args.bpe_dir))
    except spam_data.Unavailable as err:
        raise SystemExit(f"Unavailable: {err}") from None


# --------------------------------------------------------------------------------------------------------------
# Data: SMS spam (real when available), two text styles from templates
# --------------------------------------------------------------------------------------------------------------

_CITIES = ["Oslo", "Lima", "Cairo", "Perth", "Quito", "Delhi", "Boston", "Seoul", "Nairobi", "Madrid"]
_SKIES = ["light rain", "sunny", "cloudy", "heavy snow", "fog", "thunderstorms", "clear skies", "drizzle"]
_WINDS = ["north", "south", "east", "west"]
_NAMES = ["SAM", "ALEX", "MIA", "JO", "KAI", "LEE", "ANA", "MAX"]
_THINGS = ["PIZZA", "CONCERT", "GAME", "MOVIE", "PARTY", "BEACH", "CAKE", "SHOW"]
_ADJS = ["AMAZING", "HUGE", "SO LOUD", "INCREDIBLE", "THE BEST", "ON FIRE"]


def weather_text(rng: np.random.Generator) -> str:
    return (
        f"Weather in {rng.choice(_CITIES)}: {rng.choice(_SKIES)}, {int(rng.integers(-5, 35))} C, "
        f"wind from the {rng.choice(_WINDS)}."
    )


def shout_text(rng: np.random.Generator) -> str:
    return f"HEY {rng.choice(_NAMES)}! THE {rng.choice(_THINGS)} IS {rng.choice(_ADJS)}!!!"


def sms_messages(args: argparse.Namespace, rng: np.random.Generator) -> tuple[list[tuple[int, str]], str]:
    """Balanced (label, text) SMS messages: the SMS Spam Collection when it can be had, else synthetic ones."""
    try:
        path = spam_data.sms_spam_file(args.data_dir, download=not args.no_download)
    except spam_data.Unavailable as err:
        if args.data_dir is not None:  # asked for a file that is not there: say so rather than fall back
            raise SystemExit(f"Unavailable: {err}") from None
        print(f"SMS data: synthetic messages ({err}).")
        return [(label, text[: args.sms_chars]) for label, text in spam_data.synthetic_sms(args.sms, rng)], "synthetic"
    examples = spam_data.balance(spam_data.read_sms_spam(path), seed=args.seed)
    spam = [e for e in examples if e[0] == 1][: args.sms // 2]
    ham = [e for e in examples if e[0] == 0][: args.sms // 2]
    mixed = [pair for both in zip(spam, ham, strict=False) for pair in both]
    return [(label, text[: args.sms_chars]) for label, text in mixed], str(path)


def sms_prompt(text: str) -> str:
    return f"SMS: {text}\nVerdict:"


VERDICTS = {0: " ham\n", 1: " spam\n"}


# --------------------------------------------------------------------------------------------------------------
# Training: the base (pretrained here unless --weights) and one adapter per task
# --------------------------------------------------------------------------------------------------------------


def pack(pieces: list[tuple[list[int], list[int]]], width: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt tokens, target tokens) pairs as right-padded rows; the loss mask is 1 on the target tokens."""
    ids = np.full((len(pieces), width), pad, np.int32)
    mask = np.zeros((len(pieces), width), np.float32)
    for row, (prompt, target) in enumerate(pieces):
        seq = (prompt + target)[:width]
        ids[row, : len(seq)] = seq
        mask[row, len(prompt) : len(seq)] = 1.0
    return ids, mask


def task_data(name: str, tok, sms: list[tuple[int, str]], n: int, rng: np.random.Generator):
    """Training pairs of one task: the verdict after an SMS, or a whole styled text after <|endoftext|>."""
    if name == "spam":
        return [(tok.encode(sms_prompt(text)), tok.encode(VERDICTS[label])) for label, text in sms]
    make = weather_text if name == "weather" else shout_text
    return [([tok.eot], [*tok.encode(make(rng)), tok.eot]) for _ in range(n)]


def lora_config(rank: int) -> jaxlora.LoraConfig:
    return jaxlora.LoraConfig(rank=rank, alpha=2.0 * rank, targets=r"h_\d+/(attn|mlp)/(c_attn|c_proj|c_fc)/kernel")


def train_adapter(model, params, plan, ids, mask, args, name: str):
    """LoRA on one task: next-token cross-entropy on the masked tokens, AdamW, `args.steps` steps."""
    _, adapters = jaxlora.init(jax.random.key(args.seed + ADAPTERS.index(name) + 1), params, plan)
    tx = optax.adamw(args.lr, weight_decay=0.0)
    opt_state = tx.init(adapters)
    step = _train_step(model, plan, tx)
    rng = np.random.default_rng(args.seed)
    with Progress(args.steps, f"adapter {name}", "step") as bar:
        for _ in range(args.steps):
            rows = rng.choice(len(ids), size=min(args.batch, len(ids)), replace=False)
            adapters, opt_state, loss = step(adapters, opt_state, params, ids[rows], mask[rows])
            bar.update(loss=f"{float(loss):.3f}")
    return adapters, float(loss)


_STEPS: dict = {}


def _train_step(model, plan, tx):
    """One compiled step per (model, plan): the three adapters share shapes, so it compiles once."""
    key = (model, plan)
    if key not in _STEPS:

        @jax.jit
        def step(adapters, opt_state, params, ids, mask):
            def loss_fn(adapters):
                logits = jaxlora.apply(model, {"params": params}, adapters, plan, ids[:, :-1])
                losses = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
                return (losses * mask[:, 1:]).sum() / jnp.maximum(mask[:, 1:].sum(), 1.0)

            loss, grads = jax.value_and_grad(loss_fn)(adapters)
            updates, opt_state = tx.update(grads, opt_state, adapters)
            return optax.apply_updates(adapters, updates), opt_state, loss

        _STEPS.clear()
        _STEPS[key] = step
    return _STEPS[key]


def base_model(args: argparse.Namespace, corpus: np.ndarray, vocab_size: int) -> tuple[GPT2Config, Any]:
    """Hugging Face weights (--weights), or a small GPT-2 pretrained here on the training texts."""
    if args.weights:
        config, params = gpt2_spam.load_pretrained_weights(args.weights)
        print(f"Loaded GPT-2 weights from {args.weights} ({config.n_layer} layers, width {config.n_embd}).")
        return config, params
    config = dataclasses.replace(QUICK_MODEL if args.quick else OFFLINE_MODEL, vocab_size=vocab_size)
    print(
        f"Pretraining a small GPT-2 ({config.n_layer} layers, width {config.n_embd}) on {len(corpus):,} tokens of "
        f"the training texts, {args.pretrain_epochs} epochs."
    )
    pretrain_args = argparse.Namespace(
        pretrain_block=args.block, pretrain_epochs=args.pretrain_epochs, pretrain_lr=5e-3, seed=args.seed
    )
    params, losses = gpt2_spam.pretrain(config, corpus, pretrain_args)
    print(f"Pretrained: final loss {np.mean(losses[-10:]):.3f}.")
    return config, params


# --------------------------------------------------------------------------------------------------------------
# Serving: one mixed batch through the bank, checked row by row against the merged adapter alone
# --------------------------------------------------------------------------------------------------------------


def bank_forward(model, state, ids, cache):
    """generate's forward for a mixed batch: each row through its own adapter of the bank (-1: the base)."""
    params, bank, adapter_ids = state
    return jaxlora.apply_bank(model, {"params": params}, bank, adapter_ids, ids, kv_cache=cache)


def serve(model, params, bank, rows: list[tuple[str | None, list[int]]], max_new_tokens: int, **sampling):
    """The generated tokens of every row, all rows in one batch (left-padded prompts, one adapter per row)."""
    ids, mask = left_pad([prompt for _, prompt in rows])
    adapter_ids = bank.ids([slot for slot, _ in rows])
    out = generate(model, (params, bank, adapter_ids), ids, max_new_tokens, attention_mask=mask,
                   forward=bank_forward, **sampling)  # fmt: skip
    return np.asarray(out[:, ids.shape[1] :])


def alone_merged(model, params, sets, slot: str | None, prompt: list[int], max_new_tokens: int) -> np.ndarray:
    """One row on its own, its adapter merged into the weights (the base model for None)."""
    merged = params if slot is None else jaxlora.merge(params, *sets[slot])
    return np.asarray(generate(model, merged, np.asarray(prompt), max_new_tokens)[len(prompt) :])


def spam_accuracy(model, params, bank, tok, messages) -> float:
    """Share of messages whose greedy verdict (through the bank's spam slot) names the right label."""
    rows = [("spam", tok.encode(sms_prompt(text))) for _, text in messages]
    out = serve(model, params, bank, rows, max(len(tok.encode(verdict)) for verdict in VERDICTS.values()))
    said = [tok.decode(tokens).strip().split("\n")[0] for tokens in out]
    return float(np.mean([s == VERDICTS[label].strip() for s, (label, _) in zip(said, messages, strict=True)]))


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="GPT-2 model.safetensors (file or folder) or a hub id; default: pretrain")
    parser.add_argument("--tokenizer", choices=("auto", "bpe", "bytes"), default="auto")
    parser.add_argument("--bpe-dir", type=Path, help="folder with GPT-2's encoder.json and vocab.bpe")
    parser.add_argument("--data-dir", type=Path, help="SMSSpamCollection file or folder")
    parser.add_argument("--no-download", action="store_true", help="never download; fall back to synthetic SMS")
    parser.add_argument("--sms", type=int, default=600, help="SMS messages to train on (half spam)")
    parser.add_argument("--sms-chars", type=int, default=100, help="messages are cut to this many characters")
    parser.add_argument("--texts", type=int, default=400, help="texts per style")
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--block", type=int, default=64, help="tokens per pretraining window")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300, help="training steps per adapter")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--new-tokens", type=int, default=40, help="tokens generated per row")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps (about a minute; for tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/multi_adapter"))
    args = parser.parse_args(argv)
    if args.quick:
        args.sms, args.texts, args.sms_chars = min(args.sms, 160), min(args.texts, 120), min(args.sms_chars, 60)
        args.pretrain_epochs, args.block = min(args.pretrain_epochs, 3), min(args.block, 32)
        args.steps, args.rank, args.new_tokens = min(args.steps, 60), min(args.rank, 4), min(args.new_tokens, 16)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    tok = tokenizer(args)
    sms, sms_source = sms_messages(args, rng)
    held_out = sms[-max(16, len(sms) // 5) :]
    sms = sms[: len(sms) - len(held_out)]
    pairs = {name: task_data(name, tok, sms, args.texts, rng) for name in ADAPTERS}
    print(f"Tokenizer {tok.name}; SMS from {sms_source}: {len(sms)} to train, {len(held_out)} held out.")

    corpus = np.concatenate([np.asarray([*p, *t, tok.eot], np.int32) for name in ADAPTERS for p, t in pairs[name]])
    config, params = base_model(args, corpus, tok.vocab_size)
    model = GPT2(config)
    plan = jaxlora.plan(params, lora_config(args.rank))
    width = min(config.n_positions, max(len(p) + len(t) for name in ADAPTERS for p, t in pairs[name]))
    sets, losses = {}, {}
    for name in ADAPTERS:
        ids, mask = pack(pairs[name], width, tok.eot)
        adapters, losses[name] = train_adapter(model, params, plan, ids, mask, args, name)
        sets[name] = (adapters, plan)
    bank = jaxlora.adapter_bank(sets)
    one = sum(x.nbytes for x in jax.tree.leaves(sets["spam"][0]))
    print(f"Adapter bank: {bank.num_slots} slots, {bank.num_bytes:,} bytes ({one:,} per adapter); final losses "
          + ", ".join(f"{k} {v:.3f}" for k, v in losses.items()))  # fmt: skip

    spam_msg = next(text for label, text in held_out if label == 1)
    ham_msg = next(text for label, text in held_out if label == 0)
    rows = [
        ("spam", tok.encode(sms_prompt(spam_msg))),
        ("weather", tok.encode("Weather in Lima:")),
        ("shout", tok.encode("HEY")),
        ("spam", tok.encode(sms_prompt(ham_msg))),
        (None, tok.encode("Weather in Oslo:")),
        ("shout", tok.encode("HEY MIA! THE")),
        ("weather", [tok.eot]),
        ("spam", tok.encode(sms_prompt(held_out[2][1]))),
    ]
    t = time.perf_counter()
    greedy = serve(model, params, bank, rows, args.new_tokens)
    serve_s = time.perf_counter() - t
    sampling = dict(rng=jax.random.key(args.seed), temperature=0.8, top_k=20)
    sampled = serve(model, params, bank, rows, args.new_tokens, **sampling)
    report = []
    print(f"\nOne mixed batch of {len(rows)} rows, {args.new_tokens} new tokens each (greedy, then top-20 sampled):")
    for row, (slot, prompt) in enumerate(rows):
        alone = alone_merged(model, params, sets, slot, prompt, args.new_tokens)
        equal = bool(np.array_equal(alone, greedy[row]))
        report.append({"adapter": slot or "base", "prompt": tok.decode(prompt), "greedy": tok.decode(greedy[row]),
                       "sampled": tok.decode(sampled[row]), "equals_merged_alone": equal})  # fmt: skip
        same = "same" if equal else "DIFFERENT"
        print(f"[{slot or 'base':7s}] {tok.decode(prompt)!r} -> {tok.decode(greedy[row])!r}  (merged alone: {same})"
              f" | sampled {tok.decode(sampled[row])!r}")  # fmt: skip
    accuracy = spam_accuracy(model, params, bank, tok, held_out)
    all_equal = all(r["equals_merged_alone"] for r in report)
    print(f"\nEvery row equals its adapter merged and run alone: {all_equal}. Spam verdicts on {len(held_out)} "
          f"held-out messages: {accuracy:.0%} right. Total {time.perf_counter() - t0:.0f} s.")  # fmt: skip
    metrics = {
        "tokenizer": tok.name,
        "sms_source": sms_source,
        "model": config.to_dict(),
        "rows": report,
        "all_rows_equal_merged_alone": all_equal,
        "spam_accuracy_held_out": accuracy,
        "held_out": len(held_out),
        "final_losses": losses,
        "bank_bytes": bank.num_bytes,
        "one_adapter_bytes": one,
        "serve_s_with_compile": serve_s,
        "total_s": time.perf_counter() - t0,
    }
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if not all_equal:
        raise SystemExit("Some rows of the mixed batch differ from their adapter merged and run alone.")
    return metrics


if __name__ == "__main__":
    main()
