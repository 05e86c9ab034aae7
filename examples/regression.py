"""Shifted linear regression: a rank-1 LoRA learns y = X(θ + 1) on top of a net pretrained on y = Xθ.

A two-layer linear network (two bias-free Dense layers, no activation) is pretrained with Adam on
y = Xθ. New data comes from θ + 1, which the base model misses by ~1000 MSE. Since
θ + 1 = θ + 1·1ᵀ is a rank-1 change, a rank-1 LoRA (alpha 1) on both layers recovers it while the base
stays frozen; merging folds it back into the weights. Finally the paper's analysis tools are applied:
the amplification factor of the learned update and the subspace similarity of two adapters of
different rank trained from different seeds (saved as a PNG).

    python examples/regression.py            # full size: X 10000x1001, θ 1001x1000
    python examples/regression.py --quick    # small and fast (used by the tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from progress import Progress

import jaxlora
from jaxlora import analysis

Params = Any


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Rows of X, input features, hidden width and outputs."""

    n: int
    d_in: int
    hidden: int
    d_out: int


FULL = Sizes(n=10_000, d_in=1001, hidden=1000, d_out=1000)
QUICK = Sizes(n=10_000, d_in=65, hidden=64, d_out=64)


class LinearNet(nn.Module):
    """Two bias-free Dense layers and no activation: a factorised linear map x ↦ x W0 W1."""

    hidden: int
    out: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.Dense(self.hidden, use_bias=False)(x)  # Dense_0: W0 (d_in, hidden)
        return nn.Dense(self.out, use_bias=False)(h)  # Dense_1: W1 (hidden, d_out)


def make_data(key: jax.Array, n: int, theta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """X of shape (n, d_in), standard normal, and y = X θ."""
    x = jax.random.normal(key, (n, theta.shape[0]))
    return x, x @ theta


def mse(pred: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(pred - y))


LossFn = Callable[[Params, Params, jax.Array, jax.Array], jax.Array]


def train(
    loss_fn: LossFn,
    trainable: Params,
    frozen: Params,
    tx: optax.GradientTransformation,
    x: jax.Array,
    y: jax.Array,
    *,
    key: jax.Array,
    batch_size: int,
    epochs: int,
    target: float,
    log_every: int,
    desc: str,
) -> tuple[Params, list[tuple[int, float]]]:
    """`tx` over reshuffled mini-batches; each epoch is one `lax.scan`, followed by a full-data MSE.

    The last partial batch of each epoch is dropped (it differs every epoch, as the data is
    reshuffled). Stops early once the full-data MSE falls below `target`. Returns the trained
    leaves and the (epoch, MSE) history.
    """
    steps = x.shape[0] // batch_size
    if steps == 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {x.shape[0]} rows of data; lower --batch-size")

    @jax.jit
    def run_epoch(trainable, opt_state, frozen, x, y, key):
        order = jax.random.permutation(key, x.shape[0])[: steps * batch_size].reshape(steps, batch_size)

        def step(carry, idx):
            trainable, opt_state = carry
            grads = jax.grad(loss_fn)(trainable, frozen, x[idx], y[idx])
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return (optax.apply_updates(trainable, updates), opt_state), None

        (trainable, opt_state), _ = jax.lax.scan(step, (trainable, opt_state), order)
        return trainable, opt_state, loss_fn(trainable, frozen, x, y)

    opt_state = tx.init(trainable)
    history = []
    with Progress(epochs, f"  {desc}", "epoch") as bar:  # a bar on a terminal, else a line every 5 s
        for epoch in range(1, epochs + 1):
            key, sub = jax.random.split(key)
            trainable, opt_state, loss = run_epoch(trainable, opt_state, frozen, x, y, sub)
            loss = float(loss)
            history.append((epoch, loss))
            bar.update(mse=f"{loss:.4g}")
            done = loss < target
            if epoch % log_every == 0 or done or epoch == epochs:
                bar.write(f"  {desc} epoch {epoch:3d}: full-data MSE {loss:.6g}")
            if done:
                break
    return trainable, history


def adam(lr: float, decay: float, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam whose learning rate shrinks by `decay` after every epoch (1.0: constant).

    A constant rate leaves Adam's steps at about lr even when the gradients vanish, so near zero
    loss it hovers and can spike; the decay lets the loss keep falling.
    """
    return optax.adam(optax.exponential_decay(lr, max(1, steps_per_epoch), decay, staircase=True))


def fit_lora(
    model: LinearNet,
    params: Params,
    cfg: jaxlora.LoraConfig,
    x: jax.Array,
    y: jax.Array,
    args: argparse.Namespace,
    seed: int,
    desc: str,
) -> tuple[dict, list[tuple[int, float]]]:
    """Trains adapters for `cfg` on (x, y) with the base `params` frozen; returns them and the history."""
    params, adapters = jaxlora.init(jax.random.key(seed), params, cfg)
    trainable, frozen = jaxlora.partition(params, adapters, cfg)

    def loss_fn(trainable, frozen, xb, yb):
        params, adapters = jaxlora.combine(trainable, frozen)
        return mse(jaxlora.apply(model, {"params": params}, adapters, cfg, xb), yb)

    tx = jaxlora.optimizer(adam(args.lora_lr, args.lora_decay, x.shape[0] // args.batch_size), cfg)
    trainable, history = train(
        loss_fn,
        trainable,
        frozen,
        tx,
        x,
        y,
        key=jax.random.key(seed + 1),
        batch_size=args.batch_size,
        epochs=args.lora_epochs,
        target=args.lora_target,
        log_every=args.log_every,
        desc=desc,
    )
    return trainable["lora"], history


def plot_similarity(phi: np.ndarray, ranks: tuple[int, int], ones_phi: np.ndarray, path: Path) -> None:
    """Heatmap of φ(A_r1, A_r2, i, j) and, beside it, how much of the all-ones direction each top-i subspace holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    im = ax.imshow(phi, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(ranks[1]), [str(j) for j in range(1, ranks[1] + 1)])
    ax.set_yticks(range(ranks[0]), [str(i) for i in range(1, ranks[0] + 1)])
    ax.set_xlabel(f"j (rank-{ranks[1]} adapter)")
    ax.set_ylabel(f"i (rank-{ranks[0]} adapter)")
    ax.set_title("φ(A_r1, A_r2, i, j), first layer")
    fig.colorbar(im, ax=ax)
    for label, values in ones_phi.items():
        bx.plot(range(1, len(values) + 1), values, marker="o", label=label)
    bx.set_ylim(-0.05, 1.05)
    bx.set_xlabel("i (top-i singular directions of A)")
    bx.set_ylabel("φ(A, 1, i, 1)")
    bx.set_title("overlap with the all-ones direction")
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole story; returns the measured facts the tests check."""
    started = time.perf_counter()
    sizes = QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key_theta, key_x, key_model, key_x_new, key_pre = jax.random.split(jax.random.key(args.seed), 5)
    theta = jax.random.normal(key_theta, (sizes.d_in, sizes.d_out))
    x, y = make_data(key_x, sizes.n, theta)
    model = LinearNet(sizes.hidden, sizes.d_out)
    params = model.init(key_model, x[:1])["params"]
    print(f"data: X {tuple(x.shape)}, θ {tuple(theta.shape)}, y = Xθ {tuple(y.shape)}")
    print(f"model: Dense {sizes.d_in}->{sizes.hidden} -> Dense {sizes.hidden}->{sizes.d_out}, no bias, no activation")
    print(f"parameters: {jaxlora.count_params(params):,}")
    facts: dict[str, Any] = {"sizes": dataclasses.asdict(sizes)}

    # 1. Pretraining on y = Xθ.
    def base_loss(params, _frozen, xb, yb):
        return mse(model.apply({"params": params}, xb), yb)

    print(
        f"\n1. pretraining: Adam lr {args.lr} (x{args.decay} per epoch), batch {args.batch_size}, "
        f"up to {args.epochs} epochs"
    )
    start = time.perf_counter()
    params, history = train(
        base_loss,
        params,
        None,
        adam(args.lr, args.decay, sizes.n // args.batch_size),
        x,
        y,
        key=key_pre,
        batch_size=args.batch_size,
        epochs=args.epochs,
        target=args.target,
        log_every=args.log_every,
        desc="pretrain",
    )
    facts["pretrain_seconds"] = time.perf_counter() - start
    facts["pretrain_epochs"] = history[-1][0]
    facts["pretrain_loss"] = history[-1][1]
    print(
        f"   pretrained in {facts['pretrain_epochs']} epochs, {facts['pretrain_seconds']:.1f} s: "
        f"MSE {facts['pretrain_loss']:.3g}"
    )

    # 2. New data from θ + 1.
    x_new, y_new = make_data(key_x_new, sizes.n, theta + 1.0)
    eval_base = jax.jit(lambda params, xb, yb: base_loss(params, None, xb, yb))
    facts["base_loss_new"] = float(eval_base(params, x_new, y_new))
    print(f"\n2. new data y = X(θ + 1): the base model's MSE is {facts['base_loss_new']:.1f}")
    print("   (the shift adds X·1·1ᵀ, whose entries have variance d_in, so the MSE is about d_in)")

    # 3. A rank-1 LoRA on both layers.
    cfg = jaxlora.LoraConfig(rank=1, alpha=1.0, targets=(jaxlora.ALL_KERNELS,))
    print(
        f"\n3. rank-1 LoRA (alpha 1) on both layers, Adam lr {args.lora_lr} (x{args.lora_decay} per epoch), "
        f"up to {args.lora_epochs} epochs"
    )
    print(jaxlora.plan(params, cfg))
    print(
        "   why rank 1 suffices: θ + 1 = θ + 1·1ᵀ differs from θ by a rank-1 matrix, which one rank-1 update\n"
        "   of the first layer represents exactly (A = 1, B = 1ᵀ W1⁻¹, with W1 the second layer's kernel)."
    )
    base_before = jax.tree.map(np.array, params)
    start = time.perf_counter()
    adapters, lora_history = fit_lora(model, params, cfg, x_new, y_new, args, args.seed + 10, "lora r=1")
    facts["lora_seconds"] = time.perf_counter() - start
    facts["lora_epochs"] = lora_history[-1][0]
    facts["lora_loss"] = lora_history[-1][1]
    facts["lora_history"] = lora_history
    facts["base_unchanged"] = all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(params), strict=True)
    )
    base_after = float(eval_base(params, x_new, y_new))
    facts["base_loss_new_after"] = base_after
    print(f"   trained in {facts['lora_epochs']} epochs, {facts['lora_seconds']:.1f} s: MSE {facts['lora_loss']:.4g}")
    print(
        f"   base weights bitwise unchanged: {facts['base_unchanged']}; base MSE on the new data still "
        f"{base_after:.6g} (identical: {base_after == facts['base_loss_new']})"
    )

    # 4. Merge.
    merged = jaxlora.merge(params, adapters, cfg)
    x_held, y_held = make_data(jax.random.fold_in(key_x_new, 1), sizes.n // 5, theta + 1.0)  # never trained on
    facts["merged_loss_heldout"] = float(eval_base(merged, x_held, y_held))
    facts["merged_loss"] = float(eval_base(merged, x_new, y_new))
    facts["merged_loss_old_data"] = float(eval_base(merged, x, x @ (theta + 1.0)))
    print(
        f"\n4. merged W + s·A·B: MSE on {sizes.n // 5:,} held-out samples of the new task "
        f"{facts['merged_loss_heldout']:.4g} (the published figure is 0.30)"
    )
    print(f"   on the LoRA training data: {facts['merged_loss']:.4g}")
    print(f"   on the pretraining inputs with the shifted targets: {facts['merged_loss_old_data']:.4g}")
    print(f"   merged model parameters: {jaxlora.count_params(merged):,} (no adapter left)")

    # 5. Analysis (the LoRA paper, section 7).
    amplification = {p: float(v) for p, v in analysis.amplification_factors(params, adapters, cfg).items()}
    facts["amplification"] = amplification
    ones = jnp.ones((sizes.d_in, 1))
    a_first = adapters["Dense_0"]["kernel"]["lora_a"]
    facts["a_ones_similarity"] = float(analysis.subspace_similarity(a_first, ones, 1, 1))
    print("\n5. analysis")
    for path, value in amplification.items():
        print(f"   amplification factor ||ΔW||_F / ||Uᵀ W V||_F of {path}: {value:.3g}")
    print(f"   first-layer A vs the all-ones direction: φ = {facts['a_ones_similarity']:.3f}")

    r1, r2 = args.sim_ranks
    print(f"   two more adapters on the same task, rank {r1} and rank {r2}, different seeds:")
    runs = {}
    for rank, seed in ((r1, args.seed + 20), (r2, args.seed + 30)):
        cfg_r = jaxlora.LoraConfig(rank=rank, alpha=float(rank), targets=(jaxlora.ALL_KERNELS,))
        runs[rank], hist = fit_lora(model, params, cfg_r, x_new, y_new, args, seed, f"lora r={rank}")
        print(f"   rank {rank}: MSE {hist[-1][1]:.4g} after {hist[-1][0]} epochs")
    phi = np.asarray(
        analysis.subspace_similarity(runs[r1]["Dense_0"]["kernel"]["lora_a"], runs[r2]["Dense_0"]["kernel"]["lora_a"])
    )
    ones_phi = {
        f"rank {rank}": np.asarray(analysis.subspace_similarity(runs[rank]["Dense_0"]["kernel"]["lora_a"], ones))[:, 0]
        for rank in (r1, r2)
    }
    facts["similarity"] = phi
    facts["ones_similarity"] = ones_phi
    print(f"   φ(A_{r1}, A_{r2}, 1, 1) = {phi[0, 0]:.3f}; φ(A_{r1}, A_{r2}, {r1}, {r2}) = {phi[-1, -1]:.3f}")
    plot_path = out / "subspace_similarity.png"
    plot_similarity(phi, (r1, r2), ones_phi, plot_path)
    facts["plot"] = str(plot_path)
    print(f"   saved {plot_path}")
    facts["total_seconds"] = time.perf_counter() - started
    print(f"\ndone in {facts['total_seconds']:.0f} s")
    return facts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"small sizes for a fast run ({QUICK})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=100, help="most pretraining epochs")
    parser.add_argument("--lr", type=float, default=3e-3, help="pretraining Adam learning rate")
    parser.add_argument("--decay", type=float, default=0.95, help="pretraining learning-rate decay per epoch")
    parser.add_argument("--target", type=float, default=1e-3, help="stop pretraining below this MSE")
    parser.add_argument("--lora-epochs", type=int, default=100, help="most LoRA epochs")
    parser.add_argument("--lora-lr", type=float, default=1e-2, help="LoRA Adam learning rate")
    parser.add_argument("--lora-decay", type=float, default=0.95, help="LoRA learning-rate decay per epoch")
    parser.add_argument(
        "--lora-target", type=float, default=0.0, help="stop LoRA training below this MSE (default 0: all epochs)"
    )
    parser.add_argument(
        "--sim-ranks", type=int, nargs=2, default=(4, 8), metavar=("R1", "R2"), help="ranks compared in the plot"
    )
    parser.add_argument("--log-every", type=int, default=10, help="print the full-data MSE every this many epochs")
    parser.add_argument("--out", default="runs/regression", help="directory for the plot")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
