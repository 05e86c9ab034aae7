"""Serving several adapters at once, PEFT side: the mixed-adapter batch (`adapter_names=`) of Hugging Face PEFT.

The peers of benchmarks/multi_adapter_serving.py: a random-weight `GPT2LMHeadModel` of the same shape (no
pretrained weights are needed), 4 LoRA r16 adapters (`add_adapter`) on every block linear, row b using adapter
b % 4. Runners (registered in torch_worker.RUNNERS):

* `torch_gpt2_multi_adapter_prefill_peft`: `model(input_ids, adapter_names=[...])` under inference_mode (logits
  and past_key_values, transformers' default);
* `torch_gpt2_multi_adapter_decode_peft`: `model.generate(input_ids, attention_mask, adapter_names=[...])`, greedy,
  exactly `new` tokens (min_new_tokens = max_new_tokens), left-padded prompts of the same lengths as the jax side.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from benchmarks import common
from benchmarks.common import GPT2_LORA, GPT2Shape, Profile, Unavailable
from benchmarks.multi_adapter_shapes import SLOTS, decode_sizes, prompt_lengths


def _peft_lm(shape: GPT2Shape, slots: int):
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as err:
        raise Unavailable(f"PEFT / transformers not importable: {err}") from err
    config = GPT2Config(
        vocab_size=shape.vocab, n_positions=1024 if shape.n_embd >= 768 else 128, n_embd=shape.n_embd,
        n_layer=shape.n_layer, n_head=shape.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        pad_token_id=shape.vocab - 1, bos_token_id=shape.vocab - 1, eos_token_id=shape.vocab - 1,
    )  # fmt: skip
    torch.manual_seed(0)
    spec = GPT2_LORA["r16"]
    targets = sorted({m.split("/")[1] for m in spec["modules"]})

    def lora():
        return LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], target_modules=targets, fan_in_fan_out=True,
                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")  # fmt: skip

    model = get_peft_model(GPT2LMHeadModel(config), lora(), adapter_name="a0")
    for i in range(1, slots):
        model.add_adapter(f"a{i}", lora())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01)
    return model.eval()


def prefill(profile: Profile) -> dict[str, Any]:
    shape = profile.gpt2
    slots = min(SLOTS, shape.batch)
    model = _peft_lm(shape, slots)
    names = [f"a{row % slots}" for row in range(shape.batch)]
    x = torch.as_tensor(np.random.default_rng(0).integers(0, shape.vocab - 1, (shape.batch, shape.seq)))

    def forward():
        with torch.inference_mode():
            return model(input_ids=x, adapter_names=names).logits

    timing = common.time_steps(forward, lambda _: None, warmup=max(profile.warmup, 1), steps=1,
                               repeats=max(profile.repeats, 3))  # fmt: skip
    return {
        "step_s": timing,
        "tokens_per_s": shape.batch * shape.seq / timing["median"],
        "slots": slots,
        "threads": torch.get_num_threads(),
    }


def decode(profile: Profile) -> dict[str, Any]:
    shape = profile.gpt2
    slots = min(SLOTS, shape.batch)
    prompt, new = decode_sizes(profile)
    model = _peft_lm(shape, slots)
    names = [f"a{row % slots}" for row in range(shape.batch)]
    rng = np.random.default_rng(1)
    lengths = prompt_lengths(shape.batch, prompt)
    ids = np.full((shape.batch, prompt), shape.vocab - 1, np.int64)
    mask = np.zeros((shape.batch, prompt), np.int64)
    for row, n in enumerate(lengths):
        ids[row, prompt - n :], mask[row, prompt - n :] = rng.integers(0, shape.vocab - 1, n), 1
    ids, mask = torch.as_tensor(ids), torch.as_tensor(mask)

    def run():
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=new,
                                  min_new_tokens=new, do_sample=False, pad_token_id=shape.vocab - 1)  # fmt: skip

    out = run()
    if out.shape != (shape.batch, prompt + new):
        raise RuntimeError(f"PEFT generate returned {tuple(out.shape)}, expected {(shape.batch, prompt + new)}")
    timing = common.time_steps(run, lambda _: None, warmup=0, steps=1, repeats=max(profile.repeats, 3))
    return {
        "step_s": timing,
        "tokens_per_s": shape.batch * new / timing["median"],
        "rows": shape.batch,
        "slots": slots,
        "new_tokens": new,
        "prompt_lengths": lengths,
        "threads": torch.get_num_threads(),
    }
