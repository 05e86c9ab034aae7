"""The PyTorch peers: Hugging Face PEFT LoRA and full fine-tuning, inference, MLPs and the matmul ceiling.

Same shapes, loss and AdamW hyperparameters as the jax worker; torch uses as many threads as the CPU affinity
allows (`len(os.sched_getaffinity(0))`), as XLA does. Run by
`benchmarks/run.py`, one configuration per process:
`python -m benchmarks.torch_worker --profile full --result out.json torch_gpt2_peft_r16`.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import common
from benchmarks.common import GPT2_LORA, GPT2Shape, Profile, Unavailable

THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
torch.set_num_threads(THREADS)


def _no_sync(_: Any) -> None:
    return None


def _count(module: nn.Module, trainable_only: bool) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _adamw(params: list[torch.Tensor], lr: float, weight_decay: float, kind: str) -> tuple[Any, str]:
    """AdamW and the implementation it runs: "default" (torch's own choice) or "fused" (foreach if unsupported)."""
    if kind == "default":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        try:
            from torch.optim.optimizer import _default_to_fused_or_foreach

            fused, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
            impl = "fused" if fused else "foreach" if foreach else "for-loop (single tensor)"
        except Exception:  # private helper: the label is informative only
            impl = "torch default"
        return opt, f"default: {impl}"
    try:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
        probe = [torch.zeros(1, requires_grad=True)]
        probe[0].grad = torch.zeros(1)
        torch.optim.AdamW(probe, lr=lr, fused=True).step()
        return opt, "fused"
    except (RuntimeError, ValueError, TypeError) as err:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
        return opt, f"foreach (fused unsupported: {err})"


def _train_result(
    model: nn.Module,
    forward_loss: Callable[[Any, Any], torch.Tensor],
    opt: Any,
    batches: list,
    profile: Profile,
    model_flops: int,
    *,
    steps: int,
    repeats: int,
    compiled: bool = False,
) -> dict[str, Any]:
    """Times `zero_grad; loss = forward_loss(x, y); loss.backward(); opt.step()` and keeps every loss.

    With `compiled` (torch.compile) the first step is compilation: it is never taken as the measurement."""
    model.train()
    common.mark_setup_done()
    losses: list[torch.Tensor] = []

    def one() -> torch.Tensor:
        x, y = batches[len(losses) % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = forward_loss(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        return loss

    start = time.perf_counter()
    one()  # the first step allocates the optimizer state; reported as torch's "compile" analogue
    first_step_s = time.perf_counter() - start
    note = None
    if first_step_s > common.TIME_BUDGET_S and not compiled:
        # A step slower than the whole time budget (bf16 autocast on a CPU without bf16 instructions) is not
        # repeated, so that the run stays inside its time limit: the first step is the measurement.
        timing = common.summarize([first_step_s])
        note = "one step timed (the first): slower than the time budget"
    else:
        timing = common.time_steps(one, _no_sync, warmup=max(profile.warmup - 1, 0), steps=steps, repeats=repeats)
    return {
        **common.throughput(timing, model_flops),
        "first_step_s": first_step_s,
        "losses": common.finite_losses(losses),
        "threads": torch.get_num_threads(),
        "timing_note": note,
    }


# --------------------------------------------------------------------------------------------------------------
# GPT-2
# --------------------------------------------------------------------------------------------------------------


def _gpt2(shape: GPT2Shape) -> nn.Module:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(
        vocab_size=shape.vocab,
        n_positions=max(1024 if shape.n_embd >= 768 else 64, shape.seq),
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        num_labels=shape.classes,
        pad_token_id=shape.vocab - 1,  # never drawn below, so the last position is read, as in the jax model
        bos_token_id=shape.vocab - 1,
        eos_token_id=shape.vocab - 1,
    )
    torch.manual_seed(0)
    return GPT2ForSequenceClassification(config)


def _gpt2_batches(shape: GPT2Shape, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(0)
    return [
        (
            torch.as_tensor(rng.integers(0, shape.vocab - 1, (shape.batch, shape.seq))),
            torch.as_tensor(rng.integers(0, shape.classes, (shape.batch,))),
        )
        for _ in range(count)
    ]


def _peft_gpt2(shape: GPT2Shape, variant: str, dora: bool = False) -> nn.Module:
    """PEFT LoRA (DoRA with `dora`) on GPT-2's Conv1D layers (fan_in_fan_out=True), the new `score` head trained
    in full."""
    from peft import LoraConfig, get_peft_model

    spec = GPT2_LORA[variant]
    targets = sorted({m.split("/")[1] for m in spec["modules"]})  # "c_proj" names attn and mlp c_proj alike
    config = LoraConfig(
        r=spec["rank"],
        lora_alpha=spec["alpha"],
        target_modules=targets,
        fan_in_fan_out=True,
        lora_dropout=0.0,
        bias="none",
        modules_to_save=["score"],
        task_type="SEQ_CLS",
        **({"use_dora": True} if dora else {}),
    )
    return get_peft_model(_gpt2(shape), config)


def _gpt2_loss(model: nn.Module, autocast: bool) -> Callable[[Any, Any], torch.Tensor]:
    def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(input_ids=x).logits
        else:
            logits = model(input_ids=x).logits
        return F.cross_entropy(logits.float(), y)

    return forward_loss


def gpt2_train(
    variant: str | None, optimizer: str = "default", autocast: bool = False, dora: bool = False, compiled: bool = False
):
    def run(profile: Profile) -> dict[str, Any]:
        shape = profile.gpt2
        model = _gpt2(shape) if variant is None else _peft_gpt2(shape, variant, dora)
        params = [p for p in model.parameters() if p.requires_grad]
        opt, impl = _adamw(params, common.GPT2_LR, common.GPT2_WEIGHT_DECAY, optimizer)
        flops = common.gpt2_flops(shape, "full") if variant is None else common.gpt2_flops(shape, "lora", variant)
        forward_loss = _gpt2_loss(model, autocast)
        if compiled:  # forward + loss through torch.compile (inductor); AOTAutograd compiles the backward too
            forward_loss = torch.compile(forward_loss)
        result = _train_result(
            model,
            forward_loss,
            opt,
            _gpt2_batches(shape, profile.loss_batches),
            profile,
            flops,
            steps=profile.steps,
            repeats=profile.repeats,
            compiled=compiled,
        )
        return {
            **result,
            "optimizer": impl,
            "autocast": "bfloat16" if autocast else None,
            "torch_compile": compiled,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "trainable_params": _count(model, True),
            "total_params": _count(model, False),
        }

    return run


def gpt2_infer(kind: str) -> Callable[[Profile], dict[str, Any]]:
    def run(profile: Profile) -> dict[str, Any]:
        shape = profile.gpt2
        extra: dict[str, Any] = {}
        if kind == "base":
            model, flops = _gpt2(shape), common.gpt2_flops(shape, "infer")
        else:
            model, flops = _peft_gpt2(shape, "r16"), common.gpt2_flops(shape, "infer", "r16")
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0.0, 0.01)
            extra["adapter_file_bytes"] = _peft_adapter_bytes(model)
        model.eval()
        x = _gpt2_batches(shape, 1)[0][0]
        common.mark_setup_done()

        def forward() -> torch.Tensor:
            with torch.inference_mode():
                return model(input_ids=x).logits

        start = time.perf_counter()
        forward()
        first_s = time.perf_counter() - start
        timing = common.time_steps(
            forward, _no_sync, warmup=profile.warmup, steps=profile.steps, repeats=profile.repeats
        )
        return {
            **common.throughput(timing, flops),
            "first_step_s": first_s,
            "threads": torch.get_num_threads(),
            **extra,
        }

    return run


def _peft_adapter_bytes(model: nn.Module) -> int:
    """Bytes PEFT's `save_pretrained` writes for the adapter (LoRA weights + the score head + config)."""
    root = Path(tempfile.mkdtemp(prefix="peft_bench_"))
    try:
        model.save_pretrained(root)
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# MNIST MLP and the regression model
# --------------------------------------------------------------------------------------------------------------


def _small_model(model: str) -> tuple[nn.Sequential, tuple[int, ...]]:
    widths = common.MLP_LAYERS if model == "mnist" else common.REGRESSION_LAYERS
    layers: list[nn.Module] = []
    for k, (i, o) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(i, o, bias=model == "mnist"))
        if k < len(widths) - 2:
            layers.append(nn.ReLU())
    torch.manual_seed(0)
    return nn.Sequential(*layers), widths


def small(model: str, batch: int, mode: str, optimizer: str = "default") -> Callable[[Profile], dict[str, Any]]:
    def run(profile: Profile) -> dict[str, Any]:
        net, widths = _small_model(model)
        if mode == "lora":
            from peft import LoraConfig, get_peft_model

            linear = [name for name, m in net.named_modules() if isinstance(m, nn.Linear)]
            net = get_peft_model(net, LoraConfig(r=1, lora_alpha=1, target_modules=linear, lora_dropout=0.0))
        rng = np.random.default_rng(0)
        batches = []
        for _ in range(profile.loss_batches):
            x = torch.as_tensor(rng.standard_normal((batch, widths[0])), dtype=torch.float32)
            if model == "mnist":
                y = torch.as_tensor(rng.integers(0, widths[-1], (batch,)))
            else:
                y = torch.as_tensor(rng.standard_normal((batch, widths[-1])), dtype=torch.float32)
            batches.append((x, y))
        loss = F.cross_entropy if model == "mnist" else F.mse_loss
        params = [p for p in net.parameters() if p.requires_grad]
        opt, impl = _adamw(params, common.SMALL_LR, common.SMALL_WEIGHT_DECAY, optimizer)
        result = _train_result(
            net,
            lambda x, y: loss(net(x), y),
            opt,
            batches,
            profile,
            common.mlp_flops(widths, batch, mode),
            steps=profile.small_steps,
            repeats=profile.small_repeats,
        )
        return {**result, "optimizer": impl, "trainable_params": _count(net, True)}

    return run


# --------------------------------------------------------------------------------------------------------------
# The ceiling
# --------------------------------------------------------------------------------------------------------------


def matmul(profile: Profile) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    shapes = {}
    for m, k, n in common.matmul_shapes(profile.gpt2):
        a = torch.randn(m, k, generator=generator)
        b = torch.randn(k, n, generator=generator)
        timing = common.time_steps(
            lambda a=a, b=b: torch.mm(a, b),
            _no_sync,
            warmup=1,
            steps=common.matmul_calls(m, k, n),
            repeats=profile.matmul_repeats,
        )
        shapes[f"{m}x{k}x{n}"] = {"step_s": timing, "gflops": 2 * m * k * n / timing["median"] / 1e9}
    return {"shapes": shapes, "gflops": max(s["gflops"] for s in shapes.values()), "threads": torch.get_num_threads()}


RUNNERS: dict[str, Callable[[Profile], dict[str, Any]]] = {
    "torch_gpt2_full": gpt2_train(None),
    "torch_gpt2_peft_r16": gpt2_train("r16"),
    "torch_gpt2_peft_r16_fused": gpt2_train("r16", "fused"),
    "torch_gpt2_peft_r8": gpt2_train("r8"),
    "torch_gpt2_peft_r8_fused": gpt2_train("r8", "fused"),
    "torch_gpt2_peft_r16_bf16": gpt2_train("r16", "fused", autocast=True),
    "torch_gpt2_peft_r16_compiled": gpt2_train("r16", compiled=True),
    "torch_gpt2_infer_base": gpt2_infer("base"),
    "torch_gpt2_infer_peft": gpt2_infer("peft"),
    "torch_matmul": matmul,
}
for _model, _batches in (("mnist", common.MLP_BATCHES), ("regression", (common.REGRESSION_BATCH,))):
    for _batch in _batches:
        RUNNERS[f"torch_{_model}_b{_batch}_full"] = small(_model, _batch, "full")
        RUNNERS[f"torch_{_model}_b{_batch}_peft"] = small(_model, _batch, "lora")
        RUNNERS[f"torch_{_model}_b{_batch}_peft_fused"] = small(_model, _batch, "lora", "fused")

# --- serving several adapters (issue 18): benchmarks/multi_adapter_peft.py ---
from benchmarks import multi_adapter_peft  # noqa: E402

RUNNERS["torch_gpt2_multi_adapter_prefill_peft"] = multi_adapter_peft.prefill
RUNNERS["torch_gpt2_multi_adapter_decode_peft"] = multi_adapter_peft.decode

# --- variants (issue 19): PEFT DoRA beside jaxlora's -------------------------------------------------------------
RUNNERS["torch_gpt2_peft_r16_dora"] = gpt2_train("r16", dora=True)
# --- end variants ---------------------------------------------------------------------------------------------

__all__ = ["RUNNERS", "Unavailable"]

if __name__ == "__main__":
    common.run_worker(RUNNERS)
