"""One process of the multi-process tests (tests/test_multiprocess.py), built on examples/distributed.py.

    python multiprocess_worker.py two_processes OUT REFERENCE   # each of 2 processes (jax.distributed, gloo)
    python multiprocess_worker.py eight_devices REFERENCE        # one process with 8 simulated CPU devices

REFERENCE holds what the test wrote in one process: `adapter` (the trained adapter), `train` (a training
checkpoint at step RESUME). Each process writes `report-<process>.json` under OUT.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

import jaxlora
from jaxlora import checkpoint as lora_checkpoint
from jaxlora import peft_format as lora_peft
from jaxlora._src.paths import leaves_with_paths

STEPS, RESUME, BATCH = 4, 2, 16
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distributed.py"


def load_example():
    spec = importlib.util.spec_from_file_location("distributed_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ex = load_example()


def frozen_hash(params, plan) -> str:
    """sha256 of every frozen base leaf (all but the modules_to_save ones), gathered: the same on every process."""
    digest = hashlib.sha256()
    for path, leaf in leaves_with_paths(params):
        if path not in plan.saved:
            digest.update(path.encode())
            digest.update(np.ascontiguousarray(jaxlora._src.multihost.host_array(leaf)).tobytes())
    return digest.hexdigest()


def shards_unchanged(before, after, plan) -> bool:
    """Every shard this process holds of every frozen leaf is bit-identical before and after training."""
    old = dict(leaves_with_paths(before))
    for path, leaf in leaves_with_paths(after):
        if path in plan.saved:
            continue
        for a, b in zip(old[path].addressable_shards, leaf.addressable_shards, strict=True):
            if a.index != b.index or a.data.tobytes() != b.data.tobytes():
                return False
    return True


def placed_as(adapters, shardings) -> bool:
    """Every adapter leaf lies where `shardings` says (the same devices and the same layout)."""
    want = dict(leaves_with_paths(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)))
    got = dict(leaves_with_paths(adapters))
    return set(want) == set(got) and all(got[p].sharding.is_equivalent_to(want[p], got[p].ndim) for p in want)


def mesh_of_one_device_per_process() -> Mesh:
    devices = [jax.local_devices(process_index=p)[0] for p in range(jax.process_count())]
    return Mesh(np.array(devices).reshape(-1, 1), ("data", "model"))


def on_mesh(mesh: Mesh):
    """The reference base (and fresh adapters) on `mesh`, and a function of a plan giving its adapter shardings."""
    params, adapters, plan, param_shardings = ex.base_and_adapters(mesh)
    return params, adapters, plan, lambda p: jaxlora.adapter_shardings(p, param_shardings)


def two_processes(out: Path, reference: Path) -> None:
    ex.start_distributed()
    assert jax.process_count() == 2, jax.process_count()
    mesh = ex.make_mesh(model_parallel=2)
    report: dict = {"process": jax.process_index(), "mesh": dict(mesh.shape)}

    # Train from scratch with the example (FSDP x tensor parallel, data parallel over processes), then write.
    summary, trained = ex.run(out / "run", STEPS, BATCH, model_parallel=2)
    params, _, plan, adapter_shardings = on_mesh(mesh)
    report |= {"losses": summary["losses"], "seconds_per_step": summary["seconds_per_step"]}
    report["frozen_unchanged"] = shards_unchanged(params, trained, plan)
    report["frozen_hash"] = frozen_hash(trained, plan)

    # 1 process -> 2: the reference adapter onto this mesh, written back out as a PEFT export.
    restored, adapters, plan1 = lora_checkpoint.load_adapter(reference / "adapter", params, shardings=adapter_shardings)
    report["restored_placed"] = placed_as(adapters, adapter_shardings(plan1))
    lora_peft.save_peft(out / "peft_from_one", restored, adapters, plan1, name_map=ex.PEFT_NAME_MAP)

    # 8 simulated devices -> 2 (one per process).
    params2, _, _, shardings2 = on_mesh(mesh_of_one_device_per_process())
    restored2, adapters2, plan2 = lora_checkpoint.load_adapter(reference / "adapter8", params2, shardings=shardings2)
    report["restored8_placed"] = placed_as(adapters2, shardings2(plan2))
    lora_peft.save_peft(out / "peft_from_eight", restored2, adapters2, plan2, name_map=ex.PEFT_NAME_MAP)

    # Resume the 1-process training checkpoint (step RESUME) here and train on to STEPS.
    _, fresh, _, _ = on_mesh(mesh)
    template = ex.optimizer(plan).init(jaxlora.partition(params, fresh, plan)[0])  # sharded like the trainables
    manager = lora_checkpoint.checkpoint_manager(reference / "train", async_save=False)
    state = lora_checkpoint.restore_training(manager, params, template, shardings=adapter_shardings)
    manager.close()
    report["resumed_from"] = state.step
    report["resumed_placed"] = placed_as(state.adapters, adapter_shardings(state.plan))
    *_, resumed_losses, _ = ex.train(
        mesh, state.params, state.adapters, state.plan, STEPS, BATCH, first_step=state.step, opt_state=state.opt_state
    )
    report["resumed_losses"] = resumed_losses
    (out / f"report-{jax.process_index()}.json").write_text(json.dumps(report) + "\n")


def eight_devices(reference: Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    params, _, _, shardings = on_mesh(ex.make_mesh(model_parallel=2))  # a (4, 2) mesh
    restored, adapters, plan = lora_checkpoint.load_adapter(reference / "adapter", params, shardings=shardings)
    assert placed_as(adapters, shardings(plan))
    assert len(adapters["layers"]["up"]["kernel"]["lora_a"].sharding.device_set) == 8
    lora_checkpoint.save_adapter(reference / "adapter8", restored, adapters, plan)


if __name__ == "__main__":
    if sys.argv[1] == "two_processes":
        two_processes(Path(sys.argv[2]), Path(sys.argv[3]))
    elif sys.argv[1] == "eight_devices":
        eight_devices(Path(sys.argv[2]))
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
