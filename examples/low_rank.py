"""Why low rank saves parameters: a 10x10 matrix of rank 2 is exactly B·A with B 10x2 and A 2x10.

LoRA bets that the change a fine-tuning makes to a weight matrix W (d x k) has low rank r, so it
can be stored as B (d x r) times A (r x k): r·(d + k) numbers instead of d·k. This example builds a
matrix of rank 2, recovers B and A from its SVD (B = U_r·S_r, A = V_rᵀ), checks B·A·x == W·x, and
counts the numbers. (jaxlora stores kernels as (in, out) and the update as A (in, r) @ B (r, out),
the transpose of this paper notation; the arithmetic is the same.)

    python examples/low_rank.py
    python examples/low_rank.py --d 1000 --k 2000 --rank 1    # the savings grow with the matrix
    python examples/low_rank.py --quick                       # the same checks without the plot (for the tests)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora import analysis


def low_rank_matrix(rng: np.random.Generator, d: int, k: int, rank: int) -> np.ndarray:
    """A (d, k) matrix of the given rank: the product of Gaussian (d, rank) and (rank, k) factors."""
    return rng.standard_normal((d, rank)) @ rng.standard_normal((rank, k))


def svd_factors(w: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """B = U_r·S_r (d, r) and A = V_rᵀ (r, k) from the SVD of `w`, and all singular values."""
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    return u[:, :rank] * s[:rank], vt[:rank], s


def plot_factors(w: np.ndarray, b: np.ndarray, a: np.ndarray, path: Path) -> None:
    """Heatmaps of W, B and A side by side: W (d x k) is all the information B and A hold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, 3, figsize=(10, 3.6), gridspec_kw={"width_ratios": [w.shape[1], b.shape[1], a.shape[1]]}
    )
    limit = max(np.abs(m).max() for m in (w, b, a))
    for ax, matrix, title in (
        (axes[0], w, f"W {w.shape[0]}x{w.shape[1]} (rank {np.linalg.matrix_rank(w)})"),
        (axes[1], b, f"B = U_r S_r\n{b.shape[0]}x{b.shape[1]}"),
        (axes[2], a, f"A = V_rᵀ {a.shape[0]}x{a.shape[1]}"),
    ):
        ax.imshow(matrix, cmap="RdBu", vmin=-limit, vmax=limit)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"W = B·A: {w.size} numbers stored as {b.size + a.size}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Prints the story and returns its facts (for the tests)."""
    if args.rank < 1 or args.rank > min(args.d, args.k):
        raise ValueError(f"--rank must be in 1..min(d, k) = {min(args.d, args.k)}, got {args.rank}")
    rng = np.random.default_rng(args.seed)
    d, k, r = args.d, args.k, args.rank
    w = low_rank_matrix(rng, d, k, r)
    facts: dict[str, Any] = {"shape": w.shape, "rank": int(np.linalg.matrix_rank(w))}
    np.set_printoptions(precision=3, suppress=True, linewidth=120)
    print(f"1. W = (Gaussian {d}x{r}) @ (Gaussian {r}x{k}), seed {args.seed}: shape {w.shape}, rank {facts['rank']}")
    if d * k <= 100:
        print(w)

    b, a, s = svd_factors(w, r)
    facts["singular_values"] = s
    tolerance = s[0] * max(d, k) * np.finfo(s.dtype).eps  # numpy's matrix_rank threshold
    facts["nonzero_singular_values"] = int((s > tolerance).sum())
    shown = s if len(s) <= 10 else s[: r + 3]
    print(f"\n2. its {'' if len(s) <= 10 else 'largest '}singular values: {shown}")
    print(
        f"   {facts['nonzero_singular_values']} of {len(s)} are above rounding level ({tolerance:.1e}): "
        f"W has rank {facts['nonzero_singular_values']}"
    )
    print(f"   B = U_r·S_r has shape {b.shape}, A = V_rᵀ has shape {a.shape}")
    if b.size + a.size <= 100:
        print(f"   B =\n{b}\n   A =\n{a}")

    x = rng.standard_normal(k)
    y, y_factored = w @ x, b @ (a @ x)
    facts["factored_equal"] = bool(np.allclose(y, y_factored))
    facts["max_abs_difference"] = float(np.abs(y - y_factored).max())
    print(f"\n3. for a random x of length {k}: W·x == B·(A·x)? {facts['factored_equal']}")
    print(f"   largest difference {facts['max_abs_difference']:.2e} (float rounding); W·x = {y[:5]}...")

    a_balanced, b_balanced = analysis.low_rank_approximation(w, r)
    facts["jaxlora_equal"] = bool(np.allclose(np.asarray(a_balanced) @ np.asarray(b_balanced), w, atol=1e-4))
    print(
        f"   jaxlora.analysis.low_rank_approximation(W, {r}) splits S evenly (U_r·√S_r, √S_r·V_rᵀ): "
        f"its product equals W too: {facts['jaxlora_equal']}"
    )

    facts["full_params"] = d * k
    facts["factored_params"] = r * (d + k)
    print(
        f"\n4. numbers to store: W has d·k = {d}·{k} = {d * k:,}; B and A have r·(d + k) = {r}·({d} + {k}) = "
        f"{r * (d + k):,}, {100 * r * (d + k) / (d * k):.3g}% of W"
    )
    big_d, big_k = 1000, 2000
    print(
        f"   for a {big_d}x{big_k} layer and rank 1 that is {big_d + big_k:,} instead of {big_d * big_k:,} numbers "
        f"({100 * (big_d + big_k) / (big_d * big_k):.2f}%): what a rank-1 LoRA trains"
    )

    if args.quick:  # matplotlib's import and the drawing take most of this example's own time
        facts["plot"] = None
        print("\n5. plot: skipped (--quick)")
        return facts
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot = out / "low_rank.png"
    plot_factors(w, b, a, plot)
    facts["plot"] = str(plot)
    print(f"\n5. plot: {plot}")
    return facts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=10, help="rows of W")
    parser.add_argument("--k", type=int, default=10, help="columns of W")
    parser.add_argument("--rank", type=int, default=2, help="rank of W")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/low_rank", help="directory for the plot")
    parser.add_argument("--quick", action="store_true", help="every check, but no plot (matplotlib is the slow part)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
