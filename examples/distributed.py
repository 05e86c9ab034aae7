"""LoRA training across processes on JAX's own runtime: a sharded base, adapters placed like it, data parallel.

The base of a small scanned model (a Dense input layer, 4 residual blocks stacked by nn.scan, a head) is
sharded FSDP-style over the mesh axis "data" and tensor-parallel over "model"; the adapters (one per stacked
layer) follow it through `jaxlora.adapter_shardings`; each process feeds its own rows of every batch
(`jax.make_array_from_process_local_data`). At the end every process takes part in writing an adapter
checkpoint, a training checkpoint and a PEFT export (gathered, written once by process 0).

    # N processes on this machine (CPU, for testing): this script starts them
    python examples/distributed.py --local-processes 2
    python examples/distributed.py --local-processes 2 --devices-per-process 2 --model-parallel 2

Output goes to runs/distributed/ (--out): adapter/, train/, peft/, summary.json, and with --local-processes each
process's own output in logs/process-N.log (--verbose shows it live, gloo's connection lines included).

    # a cluster: run the same command on every host. JAX finds the coordinator, process count and id on
    # SLURM, Open MPI, Cloud TPU and Kubernetes; elsewhere set them on every process:
    JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=<0..3> python examples/distributed.py
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxlora
from jaxlora import checkpoint as lora_checkpoint
from jaxlora import peft_format as lora_peft

FEATURES, WIDTH, HIDDEN, LAYERS, CLASSES = 16, 32, 64, 4, 4
CONFIG = jaxlora.LoraConfig(
    rank=4,
    alpha=8.0,
    targets=("inp/kernel", "layers/.*/kernel"),
    stacked_axes={"layers/.*": 1},
    modules_to_save=("head/.*",),
)
# Torch module names of the PEFT export (a torch twin would have inp, layers.0.up, ..., head).
PEFT_NAME_MAP = (
    ("inp", "inp", "linear"),
    ("layers/up", "layers.{layer}.up", "linear"),
    ("layers/down", "layers.{layer}.down", "linear"),
    ("head", "head", "linear"),
)
# How the base is laid out: FSDP shards one axis of every kernel over "data" (gathered where it is used),
# tensor parallelism splits the blocks Megatron-style over "model" (up by columns, down by rows).
PARAM_SPECS = {
    "inp": {"kernel": P("data", "model"), "bias": P("model")},
    "layers": {
        "up": {"kernel": P(None, "data", "model"), "bias": P(None, "model")},
        "down": {"kernel": P(None, "model", "data"), "bias": P(None, None)},
    },
    "head": {"kernel": P("data", None), "bias": P(None)},
}


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + nn.Dense(WIDTH, name="down")(jnp.tanh(nn.Dense(HIDDEN, name="up")(h))), None


class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(WIDTH, name="inp")(x)
        scanned = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
        h, _ = scanned(name="layers")(h, None)
        return nn.Dense(CLASSES, name="head")(h)


def start_distributed() -> None:
    """Joins the job's other processes, if there are any (a no-op for a single process started by hand)."""
    env = os.environ
    if "JAX_NUM_PROCESSES" in env:  # set by --local-processes, or by hand on a cluster JAX does not detect
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices talk over gloo (else unused)
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
    elif any(
        k in env for k in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "KUBERNETES_SERVICE_HOST")
    ):
        jax.distributed.initialize()  # JAX's cluster detection fills in the coordinator, count and id


def make_mesh(model_parallel: int = 1) -> Mesh:
    """A ("data", "model") mesh of every device of every process; a process's devices share "data" rows."""
    devices = np.array(jax.devices())
    if devices.size % model_parallel:
        raise ValueError(f"--model-parallel {model_parallel} does not divide the {devices.size} devices")
    return Mesh(devices.reshape(-1, model_parallel), ("data", "model"))


def batch_at(step: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """The `step`-th batch of synthetic features and labels from a fixed random teacher (the same everywhere)."""
    teacher = np.random.default_rng(0).normal(size=(FEATURES, CLASSES)).astype(np.float32)
    x = np.random.default_rng(1 + step).normal(size=(batch, FEATURES)).astype(np.float32)
    return x, np.argmax(np.tanh(x) @ teacher, axis=-1).astype(np.int32)


def local_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
    """The rows of a batch this process holds under `sharding` (a process loads only these)."""
    index = sharding.addressable_devices_indices_map(global_shape).values()
    return slice(min(i[0].start or 0 for i in index), max(i[0].stop or global_shape[0] for i in index))


def global_batch(mesh: Mesh, local: np.ndarray, global_shape: tuple[int, ...]) -> jax.Array:
    """One global batch, sharded over "data", from this process's rows."""
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local, global_shape)


def base_and_adapters(mesh: Mesh, seed: int = 0) -> tuple[Any, dict, jaxlora.Plan, Any]:
    """The base (as pretrained, here random) and fresh adapters, sharded on `mesh`, their plan and param shardings."""
    model = Model()
    params = model.init(jax.random.key(seed), jnp.zeros((1, FEATURES)))["params"]
    plan = jaxlora.plan(params, CONFIG)
    params, adapters = jaxlora.init(jax.random.key(seed + 1), params, plan)
    param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), PARAM_SPECS, is_leaf=lambda x: isinstance(x, P))
    params = jax.device_put(params, param_shardings)
    adapters = jax.device_put(adapters, jaxlora.adapter_shardings(plan, param_shardings))
    return params, adapters, plan, param_shardings


def optimizer(plan: jaxlora.Plan) -> optax.GradientTransformation:
    return jaxlora.optimizer(optax.adam(1e-2), plan)


def make_step(plan: jaxlora.Plan, tx: optax.GradientTransformation):
    model = Model()

    def loss_fn(trainable, frozen, x, y):
        params, adapters = jaxlora.combine(trainable, frozen)
        logits = jaxlora.apply(model, {"params": params}, adapters, plan, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(trainable, frozen, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, x, y)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return step


def train(mesh: Mesh, params, adapters, plan, steps: int, batch: int, first_step: int = 0, opt_state=None):
    """Runs steps `first_step` ... `steps - 1`; returns (trainable, frozen, opt_state, losses, seconds per step)."""
    tx = optimizer(plan)
    trainable, frozen = jaxlora.partition(params, adapters, plan)
    opt_state = tx.init(trainable) if opt_state is None else opt_state
    step = make_step(plan, tx)
    rows = local_rows(NamedSharding(mesh, P("data")), (batch,))
    losses, seconds = [], []
    for i in range(first_step, steps):
        xs, ys = batch_at(i, batch)  # a real loader would read only this process's rows
        x = global_batch(mesh, xs[rows], (batch, FEATURES))
        y = global_batch(mesh, ys[rows], (batch,))
        start = time.perf_counter()
        trainable, opt_state, loss = step(trainable, frozen, opt_state, x, y)
        losses.append(float(loss))  # waits for the step
        seconds.append(time.perf_counter() - start)
    return trainable, frozen, opt_state, losses, seconds


def run(out: Path, steps: int, batch: int, model_parallel: int) -> tuple[dict[str, Any], Any]:
    """Trains on every process, writes the adapter, a training checkpoint and a PEFT export under `out`.

    Returns the run's summary and the trained params (the base, with the head trained in full).
    """
    mesh = make_mesh(model_parallel)
    params, adapters, plan, _ = base_and_adapters(mesh)
    trainable, frozen, opt_state, losses, seconds = train(mesh, params, adapters, plan, steps, batch)
    params, adapters = jaxlora.combine(trainable, frozen)
    lora_checkpoint.save_adapter(out / "adapter", params, adapters, plan, overwrite=True)
    manager = lora_checkpoint.checkpoint_manager(out / "train")
    lora_checkpoint.save_training(manager, steps, params, adapters, opt_state, plan)
    manager.close()
    lora_peft.save_peft(out / "peft", params, adapters, plan, name_map=PEFT_NAME_MAP, overwrite=True)
    summary = {
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "mesh": dict(mesh.shape),
        "losses": losses,
        "seconds_per_step": float(np.median(seconds[1:])) if len(seconds) > 1 else None,
    }
    if jax.process_index() == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary, params


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(
    script: str,
    argv: list[str],
    processes: int,
    devices_per_process: int,
    timeout: float,
    logs: Path | None = None,
) -> int:
    """Runs `script` in `processes` processes on this machine, as one job (CPU devices, a free local port).

    Each process's output goes to `logs/process-N.log` when `logs` is given, else to this process's terminal.
    Returns their exit status (0 when all succeeded); if one fails or `timeout` seconds pass, all are killed.
    """
    port = free_port()
    children, files = [], []
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
    for i in range(processes):
        env = dict(
            os.environ,
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES=str(processes),
            JAX_PROCESS_ID=str(i),
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
        )
        output = None
        if logs is not None:
            output = (logs / f"process-{i}.log").open("w")
            files.append(output)
        children.append(
            subprocess.Popen(
                [sys.executable, script, *argv], env=env, stdout=output, stderr=subprocess.STDOUT if output else None
            )
        )
    deadline = time.monotonic() + timeout
    try:
        while any(c.poll() is None for c in children):
            if any(c.returncode not in (None, 0) for c in children) or time.monotonic() > deadline:
                return 1
            time.sleep(0.2)
        return max(c.returncode for c in children)
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()
        for f in files:
            f.close()


def log_lines(path: Path) -> list[str]:
    """A process's output without gloo's connection lines ("[Gloo] Rank 0 is connected to 1 peer ranks...")."""
    return [line for line in path.read_text(errors="replace").splitlines() if not line.startswith("[Gloo]")]


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def describe(summary: dict[str, Any], out: Path) -> str:
    """The run's summary in a few readable lines (the numbers are in summary.json too)."""
    losses = summary["losses"]
    k = max(1, min(5, len(losses) // 4))
    mesh = " x ".join(f"{name} {size}" for name, size in summary["mesh"].items())
    step = summary["seconds_per_step"]
    step = f"{1000 * step:.1f} ms a step (median after the first, which compiles)" if step else "one step"
    return "\n".join(
        [
            f"Trained {len(losses)} steps on {_count(summary['processes'], 'process', 'processes')}, "
            f"{_count(summary['devices'], 'device', 'devices')}, "
            f"mesh {mesh}: loss {np.mean(losses[:k]):.3f} -> {np.mean(losses[-k:]):.3f} "
            f"(mean of the first and last {k}); {step}.",
            f"Wrote {out}/: adapter/ (orbax adapter checkpoint), train/ (training checkpoint, resumable), "
            f"peft/ (Hugging Face PEFT files), summary.json.",
        ]
    )


def _without(argv: list[str], flag: str) -> list[str]:
    """`argv` less `flag` and its value (given as "--flag N" or "--flag=N")."""
    out, skip = [], False
    for arg in argv:
        if skip or arg.startswith(flag + "="):
            skip = False
        elif arg == flag:
            skip = True
        else:
            out.append(arg)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/distributed"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32, help="global batch (rows split over the data axis)")
    parser.add_argument("--model-parallel", type=int, default=1, help="devices on the mesh's model axis")
    parser.add_argument("--local-processes", type=int, default=0, help="start this many processes here")
    parser.add_argument("--devices-per-process", type=int, default=1, help="with --local-processes (CPU)")
    parser.add_argument("--timeout", type=float, default=600.0, help="with --local-processes: seconds")
    parser.add_argument(
        "--verbose", action="store_true", help="with --local-processes: every process's output live, gloo's too"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.local_processes:
        rest = _without(argv, "--local-processes")
        logs = None if args.verbose else args.out / "logs"
        print(f"Starting {args.local_processes} processes here (gloo over loopback); their output: {logs or 'below'}.")
        status = launch_local(__file__, rest, args.local_processes, args.devices_per_process, args.timeout, logs)
        if logs is not None:
            shown = log_lines(logs / "process-0.log") if status == 0 else []
            for i in range(args.local_processes) if status else ():
                shown += [f"process {i} (last lines of {logs / f'process-{i}.log'}):"]
                shown += [f"  {line}" for line in log_lines(logs / f"process-{i}.log")[-15:]]
            print("\n".join(shown))
        return status
    start_distributed()
    out = args.out.absolute()
    summary, _ = run(out, args.steps, args.batch, args.model_parallel)
    if jax.process_index() == 0:
        print(describe(summary, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
