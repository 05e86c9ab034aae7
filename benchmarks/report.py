"""Turning a benchmark run into the targets verdict, a Markdown report and a bar chart."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks import common

README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"

# --------------------------------------------------------------------------------------------------------------
# Reading results
# --------------------------------------------------------------------------------------------------------------


def _ok(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    r = results.get(name)
    return r if r is not None and r.get("status") == "ok" else None


def step(results: dict[str, Any], name: str, key: str = "step_s") -> float | None:
    """Median seconds of `key` for a configuration that ran, else None."""
    r = _ok(results, name)
    return r[key]["median"] if r is not None and key in r else None


def _best(results: dict[str, Any], names: list[str], key: str = "step_s") -> tuple[float | None, str | None]:
    """The smallest median among `names` (the strictest peer), with its name."""
    found = [(v, n) for n in names if (v := step(results, n, key)) is not None]
    return min(found) if found else (None, None)


def one_line(result: dict[str, Any]) -> str:
    """A result as the runner prints it while running."""
    status = result.get("status")
    if status == "unavailable":
        return f"unavailable: {result.get('reason', '')[:150]}"
    if status != "ok":
        return f"FAILED: {result.get('error', '')[:300]}"
    parts = []
    if "step_s" in result:
        parts.append(_fmt_time(result["step_s"]["median"]))
    if result.get("compile_s") is not None:
        parts.append(f"compile {result['compile_s']:.2f}s")
    if result.get("gflops") is not None:
        parts.append(f"{result['gflops']:.1f} GFLOP/s")
    if result.get("peak_rss_mb") is not None:
        parts.append(f"peak RSS {result['peak_rss_mb']:.0f} MiB")
    return ", ".join(parts)


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.2f} ms" if seconds < 0.1 else f"{seconds:.3f} s"


def _fmt_range(timing: dict[str, Any] | None) -> str:
    if not timing:
        return "-"
    return f"{_fmt_time(timing['median'])} ({_fmt_time(timing['min'])}–{_fmt_time(timing['max'])})"


# --------------------------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------------------------


def _target(title: str, value: float | None, limit: float, unit: str, detail: str) -> dict[str, Any]:
    met = None if value is None else bool(value <= limit)
    return {"target": title, "value": value, "limit": limit, "unit": unit, "met": met, "detail": detail}


def _ratio(
    results: dict[str, Any], title: str, num: str, dens: list[str], limit: float, key: str = "step_s"
) -> dict[str, Any]:
    value = step(results, num, key)
    best, best_name = _best(results, dens, key)
    ratio = None if value is None or best is None else value / best
    others = ", ".join(
        f"{n}: {value / d:.3f}x" for n in dens if (d := step(results, n, key)) is not None and value is not None
    )
    detail = f"{num} / {best_name} (strictest of {', '.join(dens)})" + (f"; {others}" if others else "")
    missing = [f"{n}: {results[n].get('error', '')}" for n in (num, *dens) if n in results and not _ok(results, n)]
    if missing:
        detail += "; not measured: " + "; ".join(missing)
    return _target(title, ratio, limit, "x", detail)


def loss_agreement(results: dict[str, Any], name: str, reference: str) -> dict[str, Any] | None:
    """Worst step of |loss - reference loss| against the tolerance atol + rtol·|reference| (same data and init)."""
    a, b = _ok(results, name), _ok(results, reference)
    if a is None or b is None or not a.get("losses") or len(a["losses"]) != len(b.get("losses", [])):
        return None
    diffs = [abs(x - y) for x, y in zip(a["losses"], b["losses"], strict=True)]
    allowed = [common.BF16_LOSS_ATOL + common.BF16_LOSS_RTOL * abs(y) for y in b["losses"]]
    return {
        "max_abs_diff": max(diffs),
        "worst_fraction_of_tolerance": max(d / t for d, t in zip(diffs, allowed, strict=True)),
        "steps": len(diffs),
        "first_loss": b["losses"][0],
        "last_loss": b["losses"][-1],
    }


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of the issue, met / missed / not measured, with the ratio it was judged on."""
    peft16 = ["torch_gpt2_peft_r16", "torch_gpt2_peft_r16_fused"]
    out = [
        _ratio(results, "fp32 GPT-2 LoRA r16 step vs PEFT r16", "jax_gpt2_lora_r16", peft16, 0.85),
        _ratio(
            results,
            "fp32 GPT-2 LoRA r16 step vs jax full fine-tuning",
            "jax_gpt2_lora_r16",
            ["jax_gpt2_full", "jax_gpt2_full_jaxlora"],
            0.72,
        ),
        _ratio(results, "bf16-base LoRA r16 step vs PEFT fp32 r16", "jax_gpt2_lora_r16_bf16", peft16, 0.6),
        _ratio(
            results,
            "bf16-base LoRA r16 step vs PEFT bf16 autocast",
            "jax_gpt2_lora_r16_bf16",
            ["torch_gpt2_peft_r16_bf16"],
            0.6,
        ),
    ]
    out.append(_ratio(results, "DoRA r16 step vs LoRA r16 step", "jax_gpt2_lora_r16_dora", ["jax_gpt2_lora_r16"], 1.3))
    nf4, fp32 = _ok(results, "jax_gpt2_lora_r16_nf4"), _ok(results, "jax_gpt2_lora_r16")
    base_bytes = None if nf4 is None or fp32 is None else nf4["frozen_bytes"] / fp32["frozen_bytes"]
    detail = (
        "frozen_bytes of jax_gpt2_lora_r16_nf4 / jax_gpt2_lora_r16 "
        "(the whole frozen tree: kernels and embedding tables NF4, LayerNorms and biases float32)"
    )
    out.append(_target("NF4 frozen base bytes vs float32", base_bytes, 0.3, "x", detail))
    # --- variants (issue 19): the step's compiled peak must fall by >= 75% of the bytes the quantization saves ---
    peaks = None if nf4 is None or fp32 is None else (fp32.get("step_peak_bytes"), nf4.get("step_peak_bytes"))
    missed = None
    if peaks is not None and None not in peaks and fp32["frozen_bytes"] > nf4["frozen_bytes"]:
        missed = 1.0 - (peaks[0] - peaks[1]) / (fp32["frozen_bytes"] - nf4["frozen_bytes"])
    detail = "1 - (step_peak_bytes fp32 - nf4) / (frozen_bytes fp32 - nf4): the share of the saving the step keeps"
    out.append(_target("NF4 saving not reflected in the step's compiled peak", missed, 0.25, "", detail))
    # --- end variants ---
    multi = _ok(results, "jax_gpt2_multi_adapter")
    for key, what in (("forward", "forward"), ("train", "training step")):
        value = None if multi is None else multi.get(f"{key}_ratio_mixed_vs_single")
        detail = "jax_gpt2_multi_adapter: 4 r16 adapters in one batch (apply_bank) / one adapter (apply), same run"
        out.append(_target(f"mixed-adapter batch {what} vs one adapter", value, 1.15, "x", detail))
    agreement = loss_agreement(results, "jax_gpt2_lora_r16_bf16", "jax_gpt2_lora_r16")
    out.append(
        _target(
            "bf16-base loss curve within tolerance of fp32",
            None if agreement is None else agreement["worst_fraction_of_tolerance"],
            1.0,
            "of tol",
            f"|loss_bf16 - loss_fp32| <= {common.BF16_LOSS_ATOL} + {common.BF16_LOSS_RTOL}·|loss_fp32| at every step"
            + (
                ""
                if agreement is None
                else f"; {agreement['steps']} steps, max |diff| {agreement['max_abs_diff']:.4g}, fp32 loss "
                f"{agreement['first_loss']:.4f} -> {agreement['last_loss']:.4f}"
            ),
        )
    )
    rss = {n: r["peak_rss_mb"] for n in [*peft16, "jax_gpt2_lora_r16"] if (r := _ok(results, n))}
    if "jax_gpt2_lora_r16" in rss and any(n in rss for n in peft16):
        peer = min((rss[n], n) for n in peft16 if n in rss)
        out.append(
            _target(
                "peak RSS fp32 LoRA r16 vs PEFT r16",
                rss["jax_gpt2_lora_r16"] / peer[0],
                0.7,
                "x",
                f"{rss['jax_gpt2_lora_r16']:.0f} MiB / {peer[0]:.0f} MiB ({peer[1]})",
            )
        )
    else:
        out.append(_target("peak RSS fp32 LoRA r16 vs PEFT r16", None, 0.7, "x", "not measured"))
    out.append(
        _ratio(
            results, "unmerged (factored) inference vs base", "jax_gpt2_infer_unmerged", ["jax_gpt2_infer_base"], 1.03
        )
    )
    out.append(
        _target("merge r16 (jitted)", step(results, "jax_gpt2_merge"), 0.1, "s", "jax.jit(jaxlora.merge), fresh output")
    )
    out += _perf_v2_targets(results)
    for model, batches in (("mnist", common.MLP_BATCHES), ("regression", (common.REGRESSION_BATCH,))):
        for batch in batches:
            tag = f"{model}_b{batch}"
            out.append(
                _ratio(
                    results,
                    f"{tag} LoRA r1 step vs PEFT",
                    f"jax_{tag}_lora",
                    [f"torch_{tag}_peft", f"torch_{tag}_peft_fused"],
                    0.5,
                )
            )
    compile_s = (_ok(results, "jax_gpt2_lora_r16") or {}).get("compile_s")
    out.append(_target("compile of the GPT-2 LoRA r16 step", compile_s, 5.0, "s", "trace + lower + XLA compile"))
    merged = loss_agreement(results, "jax_gpt2_lora_r16_merged", "jax_gpt2_lora_r16")
    out.append(
        _target(
            "check: merged-inside-jit loss curve = factored",
            None if merged is None else merged["worst_fraction_of_tolerance"],
            1.0,
            "of tol",
            "same tolerance as bf16" + ("" if merged is None else f"; max |diff| {merged['max_abs_diff']:.3g}"),
        )
    )
    out.extend(multi_adapter_serving_targets(results))
    return out


# --- serving several adapters (issue 18): prefill vs PEFT, KV-cache decoding, bank memory ----------------------


def multi_adapter_serving_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Mixed-batch prefill and decoding against PEFT's `adapter_names=` and against serving the groups in turn.

    Speed-ups ">= k x tokens/s" are judged as time ratios "<= 1/k x" (the same rows and tokens on both sides)."""
    out = [
        _ratio(
            results,
            "mixed-adapter prefill (8 rows, 4 r16 adapters) vs PEFT adapter_names=",
            "jax_gpt2_multi_adapter_prefill",
            ["torch_gpt2_multi_adapter_prefill_peft"],
            0.8,
        ),
        _ratio(
            results,
            "KV-cache decoding time, mixed batch vs PEFT generate(adapter_names=) (>= 2x tokens/s)",
            "jax_gpt2_multi_adapter_decode",
            ["torch_gpt2_multi_adapter_decode_peft"],
            0.5,
        ),
    ]
    decode = _ok(results, "jax_gpt2_multi_adapter_decode")
    speedup = None if decode is None else decode.get("speedup_vs_one_after_another")
    detail = (
        "jax_gpt2_multi_adapter_decode: bank generate of all rows / jaxlora.apply generate of the 4 groups in turn, "
        "alternating in one process" + ("" if speedup is None else f"; {speedup:.2f}x tokens/s")
    )
    out.append(
        _target(
            "KV-cache decoding time, mixed batch vs 4 groups one after another (>= 3x tokens/s)",
            None if not speedup else 1.0 / speedup,
            round(1 / 3, 3),
            "x",
            detail,
        )
    )
    memory = None if decode is None else decode["bank_bytes"] / (decode["slots"] * decode["one_adapter_bytes"])
    detail = (
        "not measured"
        if decode is None
        else f"bank {decode['bank_bytes']:,} B / ({decode['slots']} x {decode['one_adapter_bytes']:,} B); padding "
        f"{decode['bank_padding_bytes']:,} B (the per-slot scales)"
    )
    out.append(_target("adapter bank bytes vs N x one adapter", memory, 1.01, "x", detail))
    return out


# --- performance v2 (issue 17): the qwix and compiled-PEFT peers, scanned compile, donated merge -------------------


def _perf_v2_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of issue 17 that the older list lacks."""
    mine = "jax_gpt2_lora_r16"
    out = [
        _ratio(
            results, "fp32 GPT-2 LoRA r16 step vs PEFT r16 torch.compile", mine, ["torch_gpt2_peft_r16_compiled"], 1.0
        ),
        _ratio(results, "fp32 GPT-2 LoRA r16 step vs qwix LoRA r16", mine, ["qwix_gpt2_lora_r16"], 0.8),
    ]
    a, b = _ok(results, mine), _ok(results, "qwix_gpt2_lora_r16")
    value = None if a is None or b is None else a["peak_rss_mb"] / b["peak_rss_mb"]
    detail = "peak RSS jax_gpt2_lora_r16 / qwix_gpt2_lora_r16"
    if value is not None:
        detail += f": {a['peak_rss_mb']:.0f} / {b['peak_rss_mb']:.0f} MiB"
        if a.get("peak_over_setup_mb") is not None and b.get("peak_over_setup_mb") is not None:
            detail += f" (above setup: {a['peak_over_setup_mb']:.0f} / {b['peak_over_setup_mb']:.0f} MiB)"
    out.append(_target("peak RSS fp32 LoRA r16 vs qwix LoRA r16", value, 0.9, "x", detail))
    scanned = (_ok(results, "jax_gpt2_lora_r16_scanned") or {}).get("compile_s")
    out.append(_target("compile of the scanned GPT-2 LoRA r16 step", scanned, 3.0, "s", "trace + lower + XLA compile"))
    merge = _ok(results, "jax_gpt2_merge")
    donated = None if merge is None else merge["donated_s"]["median"]
    out.append(_target("merge r16 (jitted, donated in place)", donated, 0.04, "s", "jax.jit(merge, donate_argnums=0)"))
    return out


def _verdict(t: dict[str, Any]) -> str:
    if t.get("verdict"):
        return t["verdict"] if t["verdict"] != "missed" else "**missed**"
    return "not measured" if t["met"] is None else "met" if t["met"] else "**missed**"


def _measured(t: dict[str, Any]) -> str:
    if t["value"] is None:
        return "-"
    spread = t.get("spread")
    if spread and len(t.get("round_values", [])) > 1:
        return f"{t['value']:.3g} {t['unit']} ({spread[0]:.3g}–{spread[1]:.3g})"
    return f"{t['value']:.3g} {t['unit']}"


def targets_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| target | limit | measured | verdict | judged on |", "|---|---|---|---|---|"]
    for t in rows:
        lines.append(
            f"| {t['target']} | <= {t['limit']:g} {t['unit']} | {_measured(t)} | {_verdict(t)} | {t['detail']} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Interleaved rounds: each configuration ran once per round, in alternating order
# --------------------------------------------------------------------------------------------------------------


def _median_index(values: list[float]) -> int:
    """Index of the median value (the lower of the middle two for an even count)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    return order[(len(order) - 1) // 2]


def combine_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One result per configuration for the tables: the round whose median step time is the median one, with
    `round_step_medians` (every round's median, in round order) added; else the first round that ran."""
    combined: dict[str, Any] = {}
    for name in dict.fromkeys(n for r in rounds for n in r):
        runs = [r[name] for r in rounds if name in r]
        timed = [x for x in runs if x.get("status") == "ok" and "step_s" in x]
        if not timed:
            combined[name] = next((x for x in runs if x.get("status") == "ok"), runs[-1])
            continue
        medians = [x["step_s"]["median"] for x in timed]
        combined[name] = {**timed[_median_index(medians)], "round_step_medians": medians, "rounds_ok": len(timed)}
    return combined


def targets_over_rounds(rounds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every target judged per round, then combined: the median of the per-round values with their min–max.

    A target whose limit lies inside the spread (some rounds meet it, some do not) is "within noise", not met.
    """
    per_round = [targets(r) for r in rounds]
    out = []
    for first in per_round[0]:
        same = [t for ts in per_round for t in ts if t["target"] == first["target"]]
        measured = [t for t in same if t["value"] is not None]
        if not measured:
            out.append({**first, "verdict": "not measured", "round_values": []})
            continue
        values = [t["value"] for t in measured]
        middle = measured[_median_index(values)]
        low, high = min(values), max(values)
        if high <= first["limit"]:
            verdict = "met"
        elif low > first["limit"]:
            verdict = "missed"
        else:
            verdict = "within noise"
        detail = middle["detail"]
        if len(values) > 1:
            detail += f"; per round: {', '.join(f'{v:.3g}' for v in values)}"
        out.append(
            {
                **middle,
                "value": statistics.median(values),
                "spread": [low, high],
                "round_values": values,
                "met": verdict == "met",
                "verdict": verdict,
                "detail": detail,
            }
        )
    return out


# --------------------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------------------


def _status_cell(r: dict[str, Any] | None) -> str | None:
    if r is None:
        return "not run"
    if r.get("status") == "unavailable":
        return "unavailable (see below)"
    if r.get("status") != "ok":
        return "failed (see below)"
    return None


def _ceiling(results: dict[str, Any], worker: str) -> float | None:
    r = _ok(results, f"{worker}_matmul")
    return r["gflops"] if r else None


def _train_rows(results: dict[str, Any]) -> list[str]:
    lines = [
        "| configuration | step (median, min–max) | compile / first step | peak RSS (+ above setup) | GFLOP/step "
        "| GFLOP/s | % of matmul ceiling | trainable params | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in common.CONFIGS:
        if c.group != "gpt2_train":
            continue
        r = results.get(c.name)
        bad = _status_cell(r)
        if bad:
            lines.append(f"| {c.label} | {bad} | | | | | | | |")
            continue
        ceiling = _ceiling(results, "torch" if c.worker == "torch" else "jax")
        first = (
            f"{r['compile_s']:.2f} s compile" if r.get("compile_s") is not None else f"{r['first_step_s']:.2f} s first"
        )
        notes = []
        if r.get("optimizer"):
            notes.append(f"AdamW {r['optimizer']}")
        if r.get("attn_implementation"):
            notes.append(f"attn {r['attn_implementation']}")
        if r.get("lorax_note"):
            notes.append(r["lorax_note"])
        if r.get("torch_compile"):
            notes.append("torch.compile: the first step includes compilation")
        if r.get("timing_note"):
            notes.append(r["timing_note"])
        share = "-" if not ceiling else f"{100 * r['gflops'] / ceiling:.0f}%"
        lines.append(
            f"| {c.label} | {_fmt_range(r['step_s'])} | {first} | {_fmt_rss(r)} | {r['model_gflop']:.3g} "
            f"| {r['gflops']:.1f} | {share} | {r.get('trainable_params', 0):,} | {'; '.join(notes)} |"
        )
    return lines


def _fmt_rss(r: dict[str, Any]) -> str:
    """Peak RSS, and in brackets the part above the RSS after imports and model creation."""
    above = r.get("peak_over_setup_mb")
    return f"{r['peak_rss_mb']:.0f} MiB" + ("" if above is None else f" (+{above:.0f})")


def _infer_rows(results: dict[str, Any]) -> list[str]:
    lines = ["| configuration | forward (median, min–max) | vs base | GFLOP/s | notes |", "|---|---|---|---|---|"]
    for c in common.CONFIGS:
        if c.group != "gpt2_infer":
            continue
        r = results.get(c.name)
        bad = _status_cell(r)
        if bad:
            lines.append(f"| {c.label} | {bad} | | | |")
            continue
        base = step(results, f"{c.worker}_gpt2_infer_base")
        ratio = "-" if base is None else f"{r['step_s']['median'] / base:.3f}x"
        notes = []
        if r.get("max_abs_diff_vs_merged") is not None:
            notes.append(f"max |logit diff| vs merged {r['max_abs_diff_vs_merged']:.2g}")
        if r.get("adapter_file_bytes"):
            notes.append(f"PEFT save_pretrained: {r['adapter_file_bytes'] / 1e6:.2f} MB")
        if r.get("peak_rss_mb") is not None:
            notes.append(f"peak RSS {_fmt_rss(r)}")
        lines.append(f"| {c.label} | {_fmt_range(r['step_s'])} | {ratio} | {r['gflops']:.1f} | {'; '.join(notes)} |")
    return lines


def _merge_rows(results: dict[str, Any]) -> list[str]:
    r = results.get("jax_gpt2_merge")
    bad = _status_cell(r)
    if bad:
        return [f"jaxlora.merge: {bad}"]
    lines = [
        f"jaxlora.merge of the r16 adapter ({r['lora_params']:,} LoRA parameters into "
        f"{r['adapted_weight_bytes'] / 1e6:.1f} MB of adapted float32 weights):",
        "",
        "| variant | time (median, min–max) |",
        "|---|---|",
        f"| jax.jit(merge) | {_fmt_range(r['step_s'])} |",
        f"| jax.jit(merge, donate_argnums=0) | {_fmt_range(r['donated_s'])} |",
        f"| eager merge (checks finiteness) | {_fmt_time(r['eager_s'])} |",
        f"| compile of jax.jit(merge) | {_fmt_time(r['compile_s'])} |",
        "",
        "Adapter (r16 LoRA + the trained 2-class head) on disk:",
        "",
        "| format | bytes |",
        "|---|---|",
    ]
    for key, label in (
        ("tensor_bytes", "raw float32 tensors"),
        ("jaxlora_checkpoint_bytes", "jaxlora.checkpoint.save_adapter (orbax + metadata)"),
        ("jaxlora_peft_bytes", "jaxlora.peft_format.save_peft (PEFT directory)"),
        ("orbax_standard_bytes", "orbax StandardCheckpointer"),
        ("safetensors_bytes", "safetensors"),
    ):
        value = r["files"].get(key)
        lines.append(f"| {label} | {value:,} |" if isinstance(value, int) else f"| {label} | {value} |")
    peft = _ok(results, "torch_gpt2_infer_peft")
    if peft and peft.get("adapter_file_bytes"):
        lines.append(f"| PEFT save_pretrained (torch peer) | {peft['adapter_file_bytes']:,} |")
    return lines


def _small_rows(results: dict[str, Any]) -> list[str]:
    lines = [
        "| model | jax full | jaxlora r1 | torch full | PEFT r1 (AdamW default) | PEFT r1 (AdamW fused) "
        "| jaxlora / best PEFT |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, batches in (("mnist", common.MLP_BATCHES), ("regression", (common.REGRESSION_BATCH,))):
        for batch in batches:
            tag = f"{model}_b{batch}"
            names = [f"jax_{tag}_full", f"jax_{tag}_lora", f"torch_{tag}_full", f"torch_{tag}_peft"]
            names.append(f"torch_{tag}_peft_fused")
            cells = [_status_cell(results.get(n)) or _fmt_range(results[n]["step_s"]) for n in names]
            best, _ = _best(results, names[3:])
            mine = step(results, names[1])
            ratio = "-" if best is None or mine is None else f"{mine / best:.3f}x"
            lines.append(f"| {tag} | {' | '.join(cells)} | {ratio} |")
    return lines


def _matmul_rows(results: dict[str, Any]) -> list[str]:
    jax_r, torch_r = _ok(results, "jax_matmul"), _ok(results, "torch_matmul")
    shapes = list(((jax_r or torch_r) or {}).get("shapes", {}))
    lines = ["| m×k×n | jnp.matmul GFLOP/s | torch.mm GFLOP/s |", "|---|---|---|"]
    for s in shapes:
        cells = [f"{r['shapes'][s]['gflops']:.1f}" if r and s in r["shapes"] else "-" for r in (jax_r, torch_r)]
        lines.append(f"| {s} | {' | '.join(cells)} |")
    return lines


def markdown(run: dict[str, Any]) -> str:
    env, results = run["environment"], run["results"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    shape = run["shapes"]["gpt2"]
    load = run.get("load_average_before")
    lines = [
        f"Run of {run['date']} ({run['profile']} profile, {run['duration_s'] / 60:.1f} min, jaxlora "
        f"{(run.get('git') or '?')[:12]}{'+dirty' if str(run.get('git')).endswith('+dirty') else ''}): "
        f"`{run['command']}`",
        "",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores ({env['affinity']} usable), "
        f"SIMD {' '.join(env['cpu_flags']) or '?'}; load average before "
        f"{'-' if not load else ' '.join(f'{x:.2f}' for x in load)}. Python {env['python']}; {versions}.",
        "",
        f"GPT-2 classifier: {shape['n_layer']} layers, {shape['n_head']} heads, d {shape['n_embd']}, "
        f"vocab {shape['vocab']}, batch {shape['batch']} × seq {shape['seq']}, float32, random weights, "
        f"AdamW lr {common.GPT2_LR:g} wd {common.GPT2_WEIGHT_DECAY:g}. Times are medians over "
        f"{run['schedule']['repeats']} repeats of {run['schedule']['steps']} steps (min–max in brackets).",
        *_rounds_note(run),
        "",
        "### Targets",
        "",
        targets_table(run["targets"]),
        "",
        "### GPT-2 training step",
        "",
        *_train_rows(results),
        "",
        "### GPT-2 inference (one forward pass)",
        "",
        *_infer_rows(results),
        "",
        "### Merge and adapter size",
        "",
        *_merge_rows(results),
        "",
        f"### MNIST MLP {'-'.join(map(str, common.MLP_LAYERS))} and regression "
        f"{'-'.join(map(str, common.REGRESSION_LAYERS))} (step time)",
        "",
        *_small_rows(results),
        "",
        "### The ceiling: float32 matmul of the shapes involved",
        "",
        *_matmul_rows(results),
    ]
    problems = [(n, r) for n, r in results.items() if r.get("status") != "ok"]
    if problems:
        lines += ["", "### Not measured", ""]
        for name, r in problems:
            reason = r.get("reason") or r.get("error") or ""
            lines.append(f"- `{name}` ({r.get('status')}): {reason.strip().splitlines()[-1] if reason else ''}")
    return "\n".join(lines) + "\n"


def _rounds_note(run: dict[str, Any]) -> list[str]:
    n = run.get("schedule", {}).get("rounds", 1)
    if n <= 1:
        return []
    return [
        "",
        f"{n} interleaved rounds (the configurations in alternating order, a fresh process each): every table row "
        "is the configuration's median round; every target is the median of its per-round values, min–max in "
        "brackets, and a limit inside that spread is reported as within noise. Peak RSS (+ above setup): the "
        "worker's peak, and in brackets its rise above the RSS after imports and model creation.",
    ]


def replace_marked(readme: Path, start: str, end: str, body: str) -> None:
    """Replaces the text between the markers `start` and `end` of `readme` with `body` (which ends in a newline)."""
    text = readme.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{readme} lacks the {start} / {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{body}{end}{tail}")


def update_readme(readme: Path, table: str) -> None:
    """Replaces the text between the results markers of the README with `table`."""
    replace_marked(readme, README_START, README_END, f"{table}\n")


# --------------------------------------------------------------------------------------------------------------
# Chart
# --------------------------------------------------------------------------------------------------------------

_COLORS = {"jax": "#1f77b4", "torch": "#ff7f0e", "lorax": "#2ca02c"}


def _color(config: common.Config) -> str:
    """jaxlora blue (also when run in lorax's environment), PyTorch orange, lorax green."""
    if config.worker == "lorax" and "jaxlora" not in config.label:
        return _COLORS["lorax"]
    return _COLORS["torch" if config.worker == "torch" else "jax"]


def chart(run: dict[str, Any], path: Path) -> None:
    """Horizontal bars (median, min–max whiskers): GPT-2 training, GPT-2 inference, the small models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = run["results"]
    panels = [
        ("GPT-2 training step (s)", "gpt2_train", 1.0),
        ("GPT-2 forward (ms)", "gpt2_infer", 1e3),
        ("MNIST / regression step (ms)", "small", 1e3),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 6.5))
    for ax, (title, group, scale) in zip(axes, panels, strict=True):
        configs = [c for c in common.CONFIGS if c.group == group and _ok(results, c.name)]
        labels = [c.label if group != "small" else c.name.split("_", 1)[1] + f" ({c.worker})" for c in configs]
        medians = [results[c.name]["step_s"]["median"] * scale for c in configs]
        low = [m - results[c.name]["step_s"]["min"] * scale for m, c in zip(medians, configs, strict=True)]
        high = [results[c.name]["step_s"]["max"] * scale - m for m, c in zip(medians, configs, strict=True)]
        y = list(range(len(configs)))[::-1]
        ax.barh(y, medians, xerr=[low, high], color=[_color(c) for c in configs], capsize=2)
        ax.set_yticks(y, labels, fontsize=7)
        ax.set_title(title, fontsize=10)
        if group == "small" and medians and max(medians) / max(min(medians), 1e-9) > 30:
            ax.set_xscale("log")
        elif len(medians) > 1 and max(medians) > 4 * (second := sorted(medians)[-2]):
            cap = 1.4 * second
            # one far slower peer (bf16 autocast without bf16 instructions) would squash the rest: cut its bar
            ax.set_xlim(0, cap)
            for yi, m in zip(y, medians, strict=True):
                if m > cap:
                    ax.text(0.98 * cap, yi, f"{m:.0f} →", va="center", ha="right", fontsize=7, color="white")
        ax.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLORS.values()]
    fig.legend(handles, ["jax / jaxlora", "torch / PEFT", "lorax"], loc="lower center", ncol=3, fontsize=8)
    fig.suptitle(f"jaxlora benchmarks ({run['profile']}, {run['environment']['cpu']}, {run['date']})", fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.96))
    fig.savefig(path, dpi=70)
    plt.close(fig)
