"""What the benchmark measures and how: shapes, the configuration list, timing, memory and FLOP counts.

Imported by the runner and by every worker, so it imports neither jax nor torch: a worker's peak RSS
holds only the framework it benchmarks.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import itertools
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

# --------------------------------------------------------------------------------------------------------------
# Shapes and schedules
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GPT2Shape:
    """The GPT-2 classifier benchmarked: random weights, `batch` sequences of `seq` tokens, 2-class head."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab: int = 50257
    batch: int = 8
    seq: int = 120
    classes: int = 2


@dataclasses.dataclass(frozen=True)
class Profile:
    """Sizes and repeat counts of one benchmark run ("full" or the seconds-long "smoke")."""

    name: str
    gpt2: GPT2Shape
    warmup: int  # untimed steps after compilation
    steps: int  # steps per timed repeat
    repeats: int  # timed repeats (median, min and max are reported)
    small_steps: int  # steps per repeat for the small models (MLP, regression), whose steps take milliseconds
    small_repeats: int
    matmul_repeats: int
    loss_batches: int = 1  # one fixed batch: a short run memorises it, so the loss curve descends smoothly


FULL = Profile("full", GPT2Shape(), warmup=1, steps=1, repeats=5, small_steps=20, small_repeats=7, matmul_repeats=7)
SMOKE = Profile(
    "smoke",
    GPT2Shape(n_layer=1, n_head=2, n_embd=64, vocab=512, batch=2, seq=16),
    warmup=0,
    steps=3,  # three losses per run: the paths are compared after two updates, not only at the shared start
    repeats=1,
    small_steps=3,
    small_repeats=1,
    matmul_repeats=1,
)
PROFILES = {p.name: p for p in (FULL, SMOKE)}
SCHEDULE_FIELDS = ("warmup", "steps", "repeats", "small_steps", "small_repeats")

MLP_LAYERS = (784, 1000, 2000, 10)  # MNIST MLP, with biases, ReLU between layers
REGRESSION_LAYERS = (1001, 1000, 1000)  # bias-free, ReLU between layers, mean squared error
MLP_BATCHES = (10, 256)
REGRESSION_BATCH = 128

GPT2_LR, GPT2_WEIGHT_DECAY = 5e-5, 0.1
SMALL_LR, SMALL_WEIGHT_DECAY = 1e-3, 0.1

# LoRA variants of the GPT-2 benchmark: rank, alpha, adapted layers (PEFT module names).
GPT2_LORA = {
    "r16": dict(rank=16, alpha=16.0, modules=("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")),
    "r8": dict(rank=8, alpha=8.0, modules=("attn/c_attn",)),
}

# bf16 runs: the per-step loss may differ from the fp32 run of the same data and init by at most this much.
BF16_LOSS_ATOL, BF16_LOSS_RTOL = 0.02, 0.02


def matmul_shapes(shape: GPT2Shape) -> list[tuple[int, int, int]]:
    """(m, k, n) of the float32 products in the GPT-2 step (forward, dX, dW, and the rank-16 LoRA products)
    and the MLPs' forward."""
    tokens, d, r = shape.batch * shape.seq, shape.n_embd, GPT2_LORA["r16"]["rank"]
    gpt2 = [(tokens, d, 3 * d), (tokens, d, d), (tokens, d, 4 * d), (tokens, 4 * d, d)]
    backward = [(tokens, 3 * d, d), (d, tokens, 3 * d), (4 * d, tokens, d)]
    # x A, (x A) B, g Bᵀ, dA = xᵀ (g Bᵀ), dB = (x A)ᵀ g, dx' = (g Bᵀ) Aᵀ for the widest layer (c_fc / mlp c_proj).
    lora = [(tokens, d, r), (tokens, r, 4 * d), (tokens, 4 * d, r), (d, tokens, r), (r, tokens, 4 * d), (tokens, r, d)]
    mlp = [(256, MLP_LAYERS[0], MLP_LAYERS[1]), (256, MLP_LAYERS[1], MLP_LAYERS[2])]
    return gpt2 + backward + lora + mlp


def matmul_calls(m: int, k: int, n: int) -> int:
    """Calls per timed block: enough for about 2 GFLOP, so small products are not timed one call at a time."""
    return max(3, min(200, int(2e9 / (2 * m * k * n))))


# --------------------------------------------------------------------------------------------------------------
# The configurations: each runs in its own worker process
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """One measured configuration: `name` (unique), the worker module that runs it, its table group and label."""

    name: str
    worker: str  # "jax", "torch", "lorax" or "qwix"
    group: str  # "gpt2_train", "gpt2_infer", "merge", "multi_adapter", "small", "matmul"
    label: str
    timeout_s: float | None = None  # full runs: stop the worker after this long (default: the runner's timeout)


def _configs() -> list[Config]:
    c: list[Config] = []
    add = lambda *args: c.append(Config(*args))
    add("jax_gpt2_full", "jax", "gpt2_train", "jax full fine-tuning (flax autodiff)")
    add("jax_gpt2_full_jaxlora", "jax", "gpt2_train", "jax full fine-tuning (through jaxlora.apply)")
    add("jax_gpt2_lora_r16", "jax", "gpt2_train", "jaxlora r16 factored")
    add("jax_gpt2_lora_r8", "jax", "gpt2_train", "jaxlora r8 c_attn factored")
    add("jax_gpt2_lora_r16_merged", "jax", "gpt2_train", "jaxlora r16 merged inside jit")
    add("jax_gpt2_lora_r16_scanned", "jax", "gpt2_train", "jaxlora r16, blocks stacked by nn.scan")
    add("jax_gpt2_lora_r16_dora", "jax", "gpt2_train", "jaxlora r16 DoRA")
    add("jax_gpt2_lora_r16_nf4", "jax", "gpt2_train", "jaxlora r16, NF4 frozen kernels (QLoRA)")
    add("jax_gpt2_lora_r16_bf16", "jax", "gpt2_train", "jaxlora r16, bf16 frozen base")
    add("torch_gpt2_full", "torch", "gpt2_train", "torch full fine-tuning (AdamW default)")
    add("torch_gpt2_peft_r16", "torch", "gpt2_train", "PEFT r16 (AdamW default)")
    add("torch_gpt2_peft_r16_fused", "torch", "gpt2_train", "PEFT r16 (AdamW fused)")
    add("torch_gpt2_peft_r8", "torch", "gpt2_train", "PEFT r8 c_attn (AdamW default)")
    add("torch_gpt2_peft_r8_fused", "torch", "gpt2_train", "PEFT r8 c_attn (AdamW fused)")
    # Without bf16 instructions (AVX2 only) one autocast step takes many minutes: capped so the run stays < 20 min.
    add("torch_gpt2_peft_r16_bf16", "torch", "gpt2_train", "PEFT r16, bf16 autocast (AdamW fused)", 240.0)
    add("lorax_gpt2_lora_r16", "lorax", "gpt2_train", "lorax r16")
    add("lorax_env_jaxlora_r16", "lorax", "gpt2_train", "jaxlora r16 factored, in lorax's environment")
    add("jax_gpt2_infer_base", "jax", "gpt2_infer", "jax base model")
    add("jax_gpt2_infer_unmerged", "jax", "gpt2_infer", "jaxlora r16 unmerged (factored)")
    add("jax_gpt2_infer_merged", "jax", "gpt2_infer", "jaxlora r16 merged weights")
    add("torch_gpt2_infer_base", "torch", "gpt2_infer", "torch base model")
    add("torch_gpt2_infer_peft", "torch", "gpt2_infer", "PEFT r16 unmerged")
    add("jax_gpt2_merge", "jax", "merge", "jaxlora.merge r16 + adapter files")
    add("jax_gpt2_multi_adapter", "jax", "multi_adapter", "4 r16 adapters in one batch vs one adapter (side by side)")
    # --- serving several adapters (issue 18): mixed-batch prefill and KV-cache decoding, jaxlora vs PEFT ---
    add("jax_gpt2_multi_adapter_prefill", "jax", "multi_adapter", "prefill, 4 r16 adapters in one batch (apply_bank)")
    add("torch_gpt2_multi_adapter_prefill_peft", "torch", "multi_adapter", "prefill, PEFT adapter_names= (4 r16)")
    add("jax_gpt2_multi_adapter_decode", "jax", "multi_adapter", "KV-cache decoding, bank vs groups in turn")
    add("torch_gpt2_multi_adapter_decode_peft", "torch", "multi_adapter", "PEFT generate(adapter_names=) (4 r16)")
    for model, batches in (("mnist", MLP_BATCHES), ("regression", (REGRESSION_BATCH,))):
        for batch in batches:
            tag = f"{model}_b{batch}"
            add(f"jax_{tag}_full", "jax", "small", f"jax {tag} full")
            add(f"jax_{tag}_lora", "jax", "small", f"jaxlora {tag} r1")
            add(f"torch_{tag}_full", "torch", "small", f"torch {tag} full (AdamW default)")
            add(f"torch_{tag}_peft", "torch", "small", f"PEFT {tag} r1 (AdamW default)")
            add(f"torch_{tag}_peft_fused", "torch", "small", f"PEFT {tag} r1 (AdamW fused)")
    # --- variants (issue 19) ---
    add("torch_gpt2_peft_r16_dora", "torch", "gpt2_train", "PEFT r16 DoRA (AdamW default)")
    # --- end variants ---
    # --- performance v2: the peers users pick today (qwix LoRA, PEFT under torch.compile) ---
    add("qwix_gpt2_lora_r16", "qwix", "gpt2_train", "qwix LoRA r16 (apply_lora_to_model)")
    add("torch_gpt2_peft_r16_compiled", "torch", "gpt2_train", "PEFT r16, torch.compile (AdamW default)")
    # --- end performance v2 ---
    add("jax_matmul", "jax", "matmul", "jnp.matmul float32")
    add("torch_matmul", "torch", "matmul", "torch.mm float32")
    return c


CONFIGS: list[Config] = _configs()
CONFIG_BY_NAME: dict[str, Config] = {c.name: c for c in CONFIGS}


# --------------------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------------------


def summarize(samples: list[float]) -> dict[str, Any]:
    """Median, min and max of timing samples (seconds), with the samples themselves."""
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "samples": samples,
    }


# A configuration whose timed blocks pass this many seconds stops after fewer repeats (at least MIN_REPEATS), so
# one very slow peer (e.g. bf16 autocast on a CPU without bf16 instructions) cannot stall the whole run.
TIME_BUDGET_S = 60.0
MIN_REPEATS = 2


def time_steps(
    step: Callable[[], Any],
    sync: Callable[[Any], Any],
    *,
    warmup: int,
    steps: int,
    repeats: int,
    budget_s: float = TIME_BUDGET_S,
) -> dict[str, Any]:
    """Seconds per call of `step` (which advances its own state): `repeats` timed blocks of `steps` calls.

    Each block waits for its last result with `sync` before the clock stops; asynchronous dispatch
    inside a block is part of what is measured. Past `budget_s` of timed work, stops after MIN_REPEATS blocks.
    """
    for _ in range(warmup):
        sync(step())
    samples: list[float] = []
    spent = 0.0
    for _ in range(repeats):
        if spent > budget_s and len(samples) >= MIN_REPEATS:
            break
        start = time.perf_counter()
        out = None
        for _ in range(steps):
            out = step()
        sync(out)
        elapsed = time.perf_counter() - start
        spent += elapsed
        samples.append(elapsed / steps)
    return summarize(samples)


def throughput(timing: dict[str, Any], model_flops: float) -> dict[str, Any]:
    """The timing with the model FLOPs it covers and the GFLOP/s they make at the median."""
    return {"step_s": timing, "model_gflop": model_flops / 1e9, "gflops": model_flops / timing["median"] / 1e9}


def finite_losses(losses: list[Any]) -> list[float]:
    """The losses as floats; a diverged run raises instead of being timed as if it were fine."""
    values = [float(v) for v in losses]
    if not all(math.isfinite(v) for v in values):
        raise FloatingPointError(f"non-finite training loss: {values}")
    return values


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports ru_maxrss in KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def current_rss_mb() -> float | None:
    """Resident set size of this process now, in MiB (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


# RSS once a runner has imported its framework and built its model and data, just before compiling / the first
# step (set by `mark_setup_done`); a runner that never calls it is measured from the RSS at its start.
_SETUP_RSS: dict[str, float | None] = {}


def mark_setup_done() -> None:
    """Records the current RSS as the runner's baseline: imports, model and data exist, nothing has run yet."""
    _SETUP_RSS["mb"] = current_rss_mb()


def memory_fields(rss_at_start_mb: float | None) -> dict[str, Any]:
    """Peak RSS, the baseline RSS (after imports and model creation) and peak minus baseline, in MiB."""
    baseline = _SETUP_RSS.get("mb", rss_at_start_mb)
    peak = peak_rss_mb()
    return {
        "peak_rss_mb": peak,
        "rss_after_setup_mb": baseline,
        "rss_baseline": "after model creation" if "mb" in _SETUP_RSS else "at runner start (after imports)",
        "peak_over_setup_mb": None if baseline is None else peak - baseline,
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD features that decide float32/bfloat16 matmul speed on x86."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    keep = ("avx", "fma", "amx", "bf16", "f16c")
                    return sorted(f for f in flags if f.startswith(keep) or "bf16" in f)
    except OSError:
        pass
    return []


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Exact versions, CPU and core count, read without importing any framework."""
    packages = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "torch", "transformers", "peft", "jax-lorax")
    packages += ("qwix",)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "versions": {p: _version(p) for p in packages},
    }


# --------------------------------------------------------------------------------------------------------------
# Model FLOPs: the matrix products an algorithm needs, 2·m·k·n each; element-wise work is not counted
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Linear:
    """One dense layer applied to `tokens` rows: its weight trains in full (`train_w`) and/or carries rank `rank`."""

    tokens: int
    fan_in: int
    fan_out: int
    train_w: bool = False
    rank: int = 0
    need_dx: bool = True  # is the gradient with respect to the layer's input needed?


def linear_flops(layer: Linear, train: bool) -> int:
    """Forward (and, with `train`, backward) matmul FLOPs of one layer, LoRA terms included."""
    n, i, o, r = layer.tokens, layer.fan_in, layer.fan_out, layer.rank
    flops = 2 * n * i * o + 2 * n * r * (i + o)
    if not train:
        return flops
    if layer.need_dx:
        flops += 2 * n * i * o
    if layer.train_w:
        flops += 2 * n * i * o
    if r:
        # g Bᵀ, then dA = x'ᵀ (g Bᵀ) and dB = (x A)ᵀ g; dx' = (g Bᵀ) Aᵀ only when the input needs a gradient.
        flops += 2 * n * o * r + 2 * n * i * r + 2 * n * r * o + (2 * n * r * i if layer.need_dx else 0)
    return flops


def gpt2_layers(shape: GPT2Shape, mode: str, lora: str | None = None) -> list[Linear]:
    """The dense layers of the classifier. mode: "full" (all weights train), "lora" (adapters + head), "infer"."""
    tokens, d = shape.batch * shape.seq, shape.n_embd
    adapted = GPT2_LORA[lora]["modules"] if lora else ()
    rank = GPT2_LORA[lora]["rank"] if lora else 0
    layers = []
    for block in range(shape.n_layer):
        for module, fan_in, fan_out in (
            ("attn/c_attn", d, 3 * d),
            ("attn/c_proj", d, d),
            ("mlp/c_fc", d, 4 * d),
            ("mlp/c_proj", 4 * d, d),
        ):
            # With frozen embeddings and LayerNorms, nothing below block 0's c_attn needs a gradient.
            first = block == 0 and module == "attn/c_attn"
            layers.append(
                Linear(
                    tokens,
                    fan_in,
                    fan_out,
                    train_w=mode == "full",
                    rank=rank if module in adapted else 0,
                    need_dx=mode == "full" or not first,
                )
            )
    layers.append(Linear(shape.batch, d, shape.classes, train_w=mode != "infer", need_dx=mode != "infer"))
    return layers


def gpt2_flops(shape: GPT2Shape, mode: str, lora: str | None = None) -> int:
    """Model FLOPs of one training step (mode "full"/"lora") or one forward pass (mode "infer")."""
    train = mode != "infer"
    dense = sum(linear_flops(layer, train) for layer in gpt2_layers(shape, mode, lora))
    # q kᵀ and weights·v over the full (masked) square; backward needs two products for each.
    attention = shape.n_layer * 2 * (2 * shape.batch * shape.seq * shape.seq * shape.n_embd)
    return dense + (3 * attention if train else attention)


def mlp_flops(widths: tuple[int, ...], batch: int, mode: str, rank: int = 1) -> int:
    """Model FLOPs of one training step of an MLP: mode "full" or "lora" (rank `rank` on every layer)."""
    layers = [
        Linear(batch, i, o, train_w=mode == "full", rank=rank if mode == "lora" else 0, need_dx=k > 0)
        for k, (i, o) in enumerate(itertools.pairwise(widths))
    ]
    return sum(linear_flops(layer, True) for layer in layers)


# --------------------------------------------------------------------------------------------------------------
# Worker plumbing
# --------------------------------------------------------------------------------------------------------------


def worker_args(argv: list[str] | None = None):
    """Worker command line: `--profile full|smoke --result FILE CONFIG [CONFIG ...]`."""
    import argparse

    parser = argparse.ArgumentParser(description="Run benchmark configurations and write their results as JSON.")
    parser.add_argument("configs", nargs="+", help="configuration names (see benchmarks.common.CONFIGS)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--result", required=True, help="JSON file to write {config: result}")
    for field in SCHEDULE_FIELDS:
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=None, help=f"override {field}")
    args = parser.parse_args(argv)
    unknown = [c for c in args.configs if c not in CONFIG_BY_NAME]
    if unknown:
        parser.error(f"unknown configurations {unknown}; choose from {sorted(CONFIG_BY_NAME)}")
    return args


def run_worker(runners: dict[str, Callable[[Profile], dict[str, Any]]], argv: list[str] | None = None) -> None:
    """Runs each named configuration in turn, catching failures, and writes `{name: result}` as JSON."""
    import json
    import traceback

    args = worker_args(argv)
    overrides = {f: getattr(args, f) for f in SCHEDULE_FIELDS if getattr(args, f) is not None}
    profile = dataclasses.replace(PROFILES[args.profile], **overrides)
    results: dict[str, Any] = {}
    for name in args.configs:
        if name not in runners:
            raise SystemExit(f"configuration {name!r} is not run by this worker")
        start = time.perf_counter()
        _SETUP_RSS.clear()
        rss_at_start = current_rss_mb()
        try:
            result = {"status": "ok", **runners[name](profile)}
        except Unavailable as err:
            result = {"status": "unavailable", "reason": str(err)}
        except Exception as err:
            result = {
                "status": "failed",
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(limit=-6),
            }
        result.update(memory_fields(rss_at_start))
        result["wall_s"] = time.perf_counter() - start
        results[name] = result
        print(f"[{name}] {result['status']} in {result['wall_s']:.1f}s", file=sys.stderr, flush=True)
        with open(args.result, "w") as f:
            json.dump(results, f, indent=1, default=float)


class Unavailable(RuntimeError):
    """A peer library that cannot run here (not installed, or incompatible); the reason is reported."""
