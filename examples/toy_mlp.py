"""The PEFT custom-model walkthrough with jaxlora: LoRA on a small MLP, from pretraining to a reloaded adapter.

A 20-2000-200-2 MLP is pretrained to tell whether sin(row sum) > 0 for rows of 20 uniform numbers.
Rank-3 adapters on its first two Dense layers hold 12,660 parameters (2.78% of the adapted model);
with B = 0 they start as an exact no-op. They then learn a downstream task (is the row sum > 10?)
while every base weight stays bitwise frozen, once with the head frozen and once with the head trained
in full ("modules to save", 13,062 trainable). The adapters merge back into a plain 442,602-parameter
model with the same outputs, and are saved as an orbax checkpoint (jaxlora.checkpoint) and as a PEFT
safetensors file (jaxlora.peft_format), each reloaded into a fresh model in a new Python process.

    python examples/toy_mlp.py            # the walkthrough's sizes
    python examples/toy_mlp.py --quick    # smaller hidden layers, fewer epochs (used by the tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from progress import track

import jaxlora
from jaxlora import analysis
from jaxlora import checkpoint as lora_checkpoint
from jaxlora import peft_format as lora_peft

Params = Any

# Our Dense_0 / Dense_1 / Dense_2 are the torch walkthrough's nn.Sequential layers seq.0 / seq.2 / seq.4
# (ReLUs at seq.1 and seq.3), so the PEFT file uses the same module names as the torch model's.
PEFT_NAME_MAP = (
    ("Dense_0", "seq.0", "linear"),
    ("Dense_1", "seq.2", "linear"),
    ("Dense_2", "seq.4", "linear"),
)


@dataclasses.dataclass(frozen=True)
class Sizes:
    rows: int
    features: int
    hidden: tuple[int, int]
    epochs: int
    downstream_epochs: int


FULL = Sizes(rows=1000, features=20, hidden=(2000, 200), epochs=20, downstream_epochs=10)
QUICK = Sizes(rows=1000, features=20, hidden=(64, 32), epochs=20, downstream_epochs=10)


class MLP(nn.Module):
    """Dense-ReLU-Dense-ReLU-Dense with log-softmax outputs, as the walkthrough's torch nn.Sequential."""

    hidden: tuple[int, int] = (2000, 200)
    classes: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Dense(self.hidden[0])(x))
        x = nn.relu(nn.Dense(self.hidden[1])(x))
        return jax.nn.log_softmax(nn.Dense(self.classes)(x))


def make_data(key: jax.Array, rows: int, features: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """X uniform in [0, 1), the pretraining labels sin(row sum) > 0 and the downstream labels row sum > 10."""
    x = jax.random.uniform(key, (rows, features))
    total = x.sum(axis=1)
    return x, (jnp.sin(total) > 0).astype(jnp.int32), (total > features / 2).astype(jnp.int32)


def nll(log_probs: jax.Array, labels: jax.Array) -> jax.Array:
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))


def accuracy(log_probs: jax.Array, labels: jax.Array) -> float:
    return float(jnp.mean(jnp.argmax(log_probs, axis=1) == labels))


def fit(loss_fn, trainable, frozen, tx, x, y, *, key, batch_size, epochs, desc) -> tuple[Params, list[float]]:
    """Adam over reshuffled mini-batches (one jitted `lax.scan` per epoch); returns the mean loss per epoch."""
    steps = max(1, x.shape[0] // batch_size)

    @jax.jit
    def run_epoch(trainable, opt_state, frozen, key):
        order = jax.random.permutation(key, x.shape[0])[: steps * batch_size].reshape(steps, -1)

        def step(carry, idx):
            trainable, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x[idx], y[idx])
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return (optax.apply_updates(trainable, updates), opt_state), loss

        (trainable, opt_state), losses = jax.lax.scan(step, (trainable, opt_state), order)
        return trainable, opt_state, losses.mean()

    opt_state = tx.init(trainable)
    history = []
    for _ in track(range(epochs), desc=desc, unit="epoch"):  # a bar on a terminal, else a line every 5 s
        key, sub = jax.random.split(key)
        trainable, opt_state, loss = run_epoch(trainable, opt_state, frozen, sub)
        history.append(float(loss))
    return trainable, history


def lora_loss(model: MLP, cfg: jaxlora.LoraConfig):
    def loss_fn(trainable, frozen, xb, yb):
        params, adapters = jaxlora.combine(trainable, frozen)
        return nll(jaxlora.apply(model, {"params": params}, adapters, cfg, xb), yb)

    return loss_fn


def train_lora(model, params, cfg, x, y, args, *, seed, epochs, desc):
    """Fresh adapters for `cfg`, trained on (x, y); returns (params with trained saved leaves, adapters, history)."""
    params, adapters = jaxlora.init(jax.random.key(seed), params, cfg)
    trainable, frozen = jaxlora.partition(params, adapters, cfg)
    tx = jaxlora.optimizer(optax.adam(args.lora_lr), cfg)
    trainable, history = fit(
        lora_loss(model, cfg),
        trainable,
        frozen,
        tx,
        x,
        y,
        key=jax.random.key(seed + 1),
        batch_size=args.batch_size,
        epochs=epochs,
        desc=desc,
    )
    params, adapters = jaxlora.combine(trainable, frozen)
    return params, adapters, history


def _count(n: int, of: int) -> str:
    return f"{n:,} of {of:,} ({100 * n / of:.2f}%)"


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The walkthrough; returns the measured facts the tests check."""
    sizes = QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key_data, key_model, key_train = jax.random.split(jax.random.key(args.seed), 3)
    x, y_sin, y_sum = make_data(key_data, sizes.rows, sizes.features)
    # Held-out rows from the same distribution, never trained on: the downstream figures are measured on them.
    x_held, _, y_sum_held = make_data(jax.random.fold_in(key_data, 1), sizes.rows // 2, sizes.features)
    model = MLP(sizes.hidden)
    base = model.init(key_model, x[:1])["params"]
    facts: dict[str, Any] = {"sizes": dataclasses.asdict(sizes)}

    # 1. Pretraining: every parameter trains.
    n_base = jaxlora.count_params(base)
    facts["base_params"] = n_base
    print(
        f"data: X {tuple(x.shape)} uniform in [0, 1); label sin(row sum) > 0 (share of 1s: {float(y_sin.mean()):.2f})"
    )
    print(f"model: MLP {sizes.features}-{sizes.hidden[0]}-{sizes.hidden[1]}-2, log-softmax")
    print(f"\n1. pretraining {sizes.epochs} epochs: trainable {_count(n_base, n_base)}")
    full_loss = lambda params, _frozen, xb, yb: nll(model.apply({"params": params}, xb), yb)
    base, history = fit(
        full_loss,
        base,
        None,
        optax.adam(args.lr),
        x,
        y_sin,
        key=key_train,
        batch_size=args.batch_size,
        epochs=sizes.epochs,
        desc="pretrain",
    )
    eval_base = jax.jit(lambda params, xb: model.apply({"params": params}, xb))
    facts["pretrain_history"] = history
    facts["pretrained_loss"] = float(nll(eval_base(base, x), y_sin))
    print(f"   loss per epoch: {' '.join(f'{v:.3f}' for v in history)}")
    print(f"   pretrained loss {facts['pretrained_loss']:.4f}, accuracy {accuracy(eval_base(base, x), y_sin):.3f}")
    frozen_copy = jax.tree.map(np.array, base)

    # 2. Rank-3 adapters on the first two layers.
    cfg = jaxlora.LoraConfig(rank=args.rank, alpha=args.alpha, targets=(r"Dense_[01]/kernel",))
    plan = jaxlora.plan(base, cfg)
    facts["lora_params"] = plan.num_lora
    facts["lora_all_params"] = plan.num_original + plan.num_lora
    print(f"\n2. LoRA r={args.rank}, alpha {args.alpha} on Dense_0 and Dense_1 (Adam lr {args.lora_lr})")
    print(plan)
    print(f"   trainable {_count(plan.num_lora, plan.num_original + plan.num_lora)}")
    _, adapters0 = jaxlora.init(jax.random.key(args.seed + 1), base, cfg)
    facts["update_zero_at_init"] = all(
        bool(jnp.all(pair["lora_a"] @ pair["lora_b"] == 0)) for pair in jax.tree.leaves(adapters0, is_leaf=_is_pair)
    )
    eval_lora = jax.jit(lambda params, adapters, xb: jaxlora.apply(model, {"params": params}, adapters, cfg, xb))
    facts["adapted_loss_at_init"] = float(nll(eval_lora(base, adapters0, x), y_sin))
    print(f"   A·B == 0 at init (B starts at zero): {facts['update_zero_at_init']}")
    print(f"   adapted loss at init {facts['adapted_loss_at_init']:.6f} = pretrained {facts['pretrained_loss']:.6f}")

    # 3. One epoch of LoRA on the pretraining task: the adapters start as a no-op, so it carries on from there.
    _, same_adapters, _ = train_lora(model, base, cfg, x, y_sin, args, seed=args.seed + 1, epochs=1, desc="same task")
    facts["same_task_loss"] = float(nll(eval_lora(base, same_adapters, x), y_sin))
    print(
        f"\n3. one LoRA epoch on the same task: loss {facts['same_task_loss']:.4f} "
        f"(pretrained {facts['pretrained_loss']:.4f})"
    )

    # 4. The downstream task: is the row sum above 10? Head frozen, then head trained in full.
    facts["downstream_base_loss"] = float(nll(eval_base(base, x), y_sum))
    print(f"\n4. downstream task: row sum > 10 (share of 1s: {float(y_sum.mean()):.2f})")
    print(f"   base model loss on it: {facts['downstream_base_loss']:.4f}")
    epochs = sizes.downstream_epochs
    _, lora_only, hist_lora = train_lora(
        model, base, cfg, x, y_sum, args, seed=args.seed + 2, epochs=epochs, desc="r=3"
    )
    facts["downstream_lora_history"] = hist_lora
    facts["lora_only_live_units"] = live_units(jaxlora.merge(base, lora_only, cfg), x)
    print(f"   LoRA only, {epochs} epochs: loss per epoch {' '.join(f'{v:.3f}' for v in hist_lora)}")
    print(f"   ReLU units active on some row (of {sizes.hidden}): {facts['lora_only_live_units']}")
    if facts["lora_only_live_units"][1] == 0:
        print("   every second-layer ReLU died, so the frozen head sees zeros and the loss sticks at chance")
    cfg_head = dataclasses.replace(cfg, modules_to_save=(r"Dense_2/.*",))
    plan_head = jaxlora.plan(base, cfg_head)
    facts["head_trainable"] = plan_head.num_trainable
    print(f"   with Dense_2 trained in full (modules_to_save): trainable {plan_head.num_trainable:,}")
    params, adapters, hist_head = train_lora(
        model, base, cfg_head, x, y_sum, args, seed=args.seed + 3, epochs=epochs, desc="r=3 + head"
    )
    facts["downstream_head_history"] = hist_head
    print(f"   LoRA + head, {epochs} epochs: loss per epoch {' '.join(f'{v:.3f}' for v in hist_head)}")
    eval_head = jax.jit(lambda params, adapters, xb: jaxlora.apply(model, {"params": params}, adapters, cfg_head, xb))
    adapted = eval_head(params, adapters, x)
    facts["downstream_loss"] = float(nll(adapted, y_sum))
    held = eval_head(params, adapters, x_held)
    facts["downstream_heldout_base_loss"] = float(nll(eval_base(base, x_held), y_sum_held))
    facts["downstream_heldout_loss"] = float(nll(held, y_sum_held))
    facts["downstream_heldout_accuracy"] = accuracy(held, y_sum_held)
    print(
        f"   downstream training loss {facts['downstream_loss']:.4f}; on {len(y_sum_held)} held-out rows: loss "
        f"{facts['downstream_heldout_loss']:.4f} (base {facts['downstream_heldout_base_loss']:.4f}), accuracy "
        f"{facts['downstream_heldout_accuracy']:.3f}"
    )
    facts["base_unchanged"] = all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(frozen_copy), jax.tree.leaves(base), strict=True)
    )
    frozen_paths = [p for p in plan_head.shapes if p not in plan_head.saved]
    facts["frozen_unchanged"] = all(np.array_equal(_leaf(frozen_copy, p), _leaf(params, p)) for p in frozen_paths)
    print(f"   every frozen base leaf bitwise unchanged: {facts['frozen_unchanged'] and facts['base_unchanged']}")

    # 5. Merge back into a plain model.
    merged = jaxlora.merge(params, adapters, cfg_head)
    merged_out = eval_base(merged, x)
    facts["merged_params"] = jaxlora.count_params(merged)
    facts["merged_same_structure"] = jax.tree.structure(merged) == jax.tree.structure(base)
    facts["merged_max_diff"] = float(jnp.max(jnp.abs(merged_out - adapted)))
    print(f"\n5. merged: {facts['merged_params']:,} parameters, none trainable (a plain params tree, no adapters)")
    print(f"   max |merged - adapted| log-prob: {facts['merged_max_diff']:.2e}")

    # 6. Save the adapter, reload it into a fresh model in a new process.
    base_dir, ckpt_dir, peft_dir = out / "base", out / "adapter", out / "adapter_peft"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(base_dir.absolute(), base, force=True)
    lora_checkpoint.save_adapter(ckpt_dir, params, adapters, cfg_head, overwrite=True)
    lora_peft.save_peft(peft_dir, params, adapters, cfg_head, name_map=PEFT_NAME_MAP, overwrite=True)
    np.savez(out / "expected.npz", x=np.asarray(x), adapted=np.asarray(adapted))
    facts["checkpoint_bytes"] = directory_size(ckpt_dir)
    facts["peft_file_bytes"] = (peft_dir / lora_peft.WEIGHTS_NAME).stat().st_size
    print(f"\n6. saved the base to {base_dir}")
    print(f"   orbax adapter checkpoint {ckpt_dir}: {facts['checkpoint_bytes'] / 1024:.1f} KiB in all")
    print(
        f"   PEFT adapter {peft_dir}/{lora_peft.WEIGHTS_NAME}: {facts['peft_file_bytes']:,} bytes "
        "(PEFT's own file for this walkthrough is ~51 KB)"
    )
    command = [sys.executable, __file__, "--reload", str(out), *(["--quick"] if args.quick else [])]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"reloading in a new process failed:\n{done.stdout}\n{done.stderr}")
    facts["reload"] = json.loads(done.stdout.strip().splitlines()[-1])
    for name, diff in facts["reload"].items():
        print(f"   reloaded from the {name} in a new process: max |reloaded - adapted| = {diff:.2e}")

    # 7. The paper's analysis tools on the downstream adapters.
    amplification = {p: float(v) for p, v in analysis.amplification_factors(params, adapters, cfg_head).items()}
    similarity = {p: np.asarray(v) for p, v in analysis.subspace_similarities(lora_only, adapters).items()}
    facts["amplification"], facts["similarity"] = amplification, similarity
    print("\n7. analysis of the downstream adapters (LoRA paper, section 7)")
    for path, value in amplification.items():
        print(f"   amplification factor of {path}: {value:.3g}")
    for path, phi in similarity.items():
        rows = "; ".join(" ".join(f"{v:.2f}" for v in row) for row in phi)
        print(f"   φ(A head-frozen run, A head-trained run) for {path}: [{rows}]")
    facts["plot"] = str(plot(facts, out / "toy_mlp.png"))
    print(f"   saved {facts['plot']}")
    return facts


def live_units(params: Params, x: jax.Array) -> tuple[int, int]:
    """How many units of each hidden ReLU layer are positive on at least one row of `x`."""
    counts, h = [], x
    for layer in ("Dense_0", "Dense_1"):
        h = jax.nn.relu(h @ params[layer]["kernel"] + params[layer]["bias"])
        counts.append(int(jnp.sum(jnp.any(h > 0, axis=0))))
    return tuple(counts)


def _is_pair(node: Any) -> bool:
    return isinstance(node, dict) and set(node) == {"lora_a", "lora_b"}


def _leaf(tree: Params, path: str) -> Any:
    for name in path.split("/"):
        tree = tree[name]
    return tree


def plot(facts: dict[str, Any], path: Path) -> Path:
    """Loss curves of the three trainings and the φ heatmaps of the two downstream runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phis = facts["similarity"]
    fig, axes = plt.subplots(1, 1 + len(phis), figsize=(4.2 * (1 + len(phis)), 3.6))
    ax = axes[0]
    ax.plot(range(1, len(facts["pretrain_history"]) + 1), facts["pretrain_history"], label="pretrain (sin task)")
    ax.plot(range(1, len(facts["downstream_lora_history"]) + 1), facts["downstream_lora_history"], label="LoRA")
    ax.plot(range(1, len(facts["downstream_head_history"]) + 1), facts["downstream_head_history"], label="LoRA + head")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean training loss")
    ax.set_title("training")
    ax.legend()
    for ax, (name, phi) in zip(axes[1:], phis.items(), strict=True):
        im = ax.imshow(phi, vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(phi.shape[1]), [str(j + 1) for j in range(phi.shape[1])])
        ax.set_yticks(range(phi.shape[0]), [str(i + 1) for i in range(phi.shape[0])])
        ax.set_xlabel("j (LoRA + head run)")
        ax.set_ylabel("i (LoRA run)")
        ax.set_title(f"φ(i, j), {name}")
    fig.colorbar(im, ax=list(axes[1:]))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def reload(out: Path, quick: bool) -> dict[str, float]:
    """In a fresh process: rebuild the model, restore the base, load each saved adapter, compare outputs."""
    sizes = QUICK if quick else FULL
    expected = np.load(out / "expected.npz")
    model = MLP(sizes.hidden)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), expected["x"][:1])["params"])
    with ocp.StandardCheckpointer() as ckptr:
        base = ckptr.restore((out / "base").absolute(), abstract)
    diffs = {}
    for name, load in (
        ("orbax checkpoint", lambda: lora_checkpoint.load_adapter(out / "adapter", base)),
        ("PEFT file", lambda: lora_peft.load_peft(out / "adapter_peft", base, name_map=PEFT_NAME_MAP)),
    ):
        params, adapters, cfg = load()
        forward = jax.jit(
            lambda params, adapters, xb, cfg=cfg: jaxlora.apply(model, {"params": params}, adapters, cfg, xb)
        )
        got = forward(params, adapters, expected["x"])
        diffs[name] = float(np.max(np.abs(np.asarray(got) - expected["adapted"])))
    return diffs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller hidden layers and fewer epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3, help="pretraining Adam learning rate (the walkthrough's)")
    parser.add_argument("--lora-lr", type=float, default=1e-2, help="Adam learning rate for the adapters (and head)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rank", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=8.0, help="LoRA alpha (PEFT's default 8)")
    parser.add_argument("--out", default="runs/toy_mlp", help="directory for checkpoints and the plot")
    parser.add_argument("--reload", metavar="DIR", help=argparse.SUPPRESS)  # the new-process half of step 6
    return parser.parse_args(argv)


if __name__ == "__main__":
    cli_args = parse_args()
    if cli_args.reload:
        print(json.dumps(reload(Path(cli_args.reload), cli_args.quick)))
    else:
        run(cli_args)
