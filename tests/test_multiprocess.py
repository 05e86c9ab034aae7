"""LoRA across processes: two JAX processes (jax.distributed, gloo on CPU) train, checkpoint and export like one.

The reference is the same code (examples/distributed.py) run here, in one process on one device. Two processes
with two CPU devices each then form a (data 2 x model 2) mesh: the base sharded FSDP-style over "data" and
tensor-parallel over "model", stacked adapters placed by `jaxlora.adapter_shardings`, each process feeding its
half of every batch (tests/multiprocess_worker.py). Tolerances: float32 sums in another order (sharded matmuls,
a psum of gradients) move losses by ~1e-7 relative; we allow rtol 1e-5 on losses and 1e-4 (atol 1e-6) on the
trained adapters after 4 Adam steps. What is only moved between devices and processes (checkpoints, exports)
must be bit-identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import jaxlora
from jaxlora import checkpoint as lora_checkpoint
from jaxlora import peft_format as lora_peft
from jaxlora._src.safetensors_io import read_tensors

sys.path.insert(0, str(Path(__file__).parent))
import multiprocess_worker as worker

ex = worker.ex
# XLA's default code generation: under the cheaper one (tests/conftest.py) the base that the example initialises on
# one device and on the (2 x 2) mesh of two processes differ in their last bits (measured 2026-12-07: the workers'
# content check then refuses the one-process adapter), where the default gives the same bits, as users get them.
pytestmark = pytest.mark.default_codegen
TIMEOUT = 400  # seconds for each group of subprocesses (about 1 minute each on a loaded 2-core machine)


def _env(devices: int) -> dict[str, str]:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}",
    )
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    return env


def _reference(out: Path) -> dict:
    """Trains in this process on one device; writes the adapter, a training checkpoint at RESUME and a PEFT export."""
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    params, adapters, plan, _ = ex.base_and_adapters(mesh)
    trainable, frozen, opt_state, first, _ = ex.train(mesh, params, adapters, plan, worker.RESUME, worker.BATCH)
    manager = lora_checkpoint.checkpoint_manager(out / "train", async_save=False)
    lora_checkpoint.save_training(manager, worker.RESUME, *jaxlora.combine(trainable, frozen), opt_state, plan)
    manager.close()
    start = time.perf_counter()
    trainable, frozen, opt_state, rest, seconds = ex.train(
        mesh, *jaxlora.combine(trainable, frozen), plan, worker.STEPS, worker.BATCH, worker.RESUME, opt_state
    )
    trained, adapters = jaxlora.combine(trainable, frozen)
    lora_checkpoint.save_adapter(out / "adapter", trained, adapters, plan)
    lora_peft.save_peft(out / "peft", trained, adapters, plan, name_map=ex.PEFT_NAME_MAP)
    return {
        "params": params,
        "trained": trained,
        "adapters": adapters,
        "opt_state": opt_state,
        "plan": plan,
        "losses": first + rest,
        "seconds_per_step": float(np.median(seconds[1:])),  # the first step of a run compiles
        "train_seconds": time.perf_counter() - start,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    reference_dir = tmp_path_factory.mktemp("one_process")
    out = tmp_path_factory.mktemp("two_processes")
    reference = _reference(reference_dir)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, worker.__file__, "eight_devices", str(reference_dir)],
        env=_env(8),
        check=True,
        timeout=TIMEOUT,
    )
    eight_seconds = time.perf_counter() - started
    started = time.perf_counter()
    argv = ["two_processes", str(out), str(reference_dir)]
    status = ex.launch_local(worker.__file__, argv, processes=2, devices_per_process=2, timeout=TIMEOUT)
    assert status == 0, f"the two processes failed (exit status {status}); their output is above"
    reports = [json.loads((out / f"report-{i}.json").read_text()) for i in range(2)]
    timings = {"eight_devices_s": eight_seconds, "two_processes_s": time.perf_counter() - started}
    print(
        "multiprocess timings:",
        timings,
        "step s: 2 processes",
        reports[0]["seconds_per_step"],
        "1 process",
        reference["seconds_per_step"],
    )
    return reference, reference_dir, out, reports


def _flat(tree) -> dict:
    return dict(jaxlora._src.paths.leaves_with_paths(tree))


def _assert_close(got, want, **tolerance) -> None:
    got, want = _flat(got), _flat(want)
    assert set(got) == set(want)
    for path in want:
        np.testing.assert_allclose(np.asarray(got[path]), np.asarray(want[path]), err_msg=path, **tolerance)


def _same_files(a: Path, b: Path) -> None:
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.slow
def test_two_processes_train_like_one(runs):
    reference, _, out, reports = runs
    for report in reports:
        assert report["mesh"] == {"data": 2, "model": 2}
        np.testing.assert_allclose(report["losses"], reference["losses"], rtol=1e-5)
    assert reference["losses"][-1] < reference["losses"][0]  # it trains
    # 2 processes -> 1: the adapter both processes wrote, loaded here on one device
    params, adapters, plan = lora_checkpoint.load_adapter(out / "run" / "adapter", reference["params"])
    assert plan == reference["plan"]
    _assert_close(adapters, reference["adapters"], rtol=1e-4, atol=1e-6)
    _assert_close(params["head"], reference["trained"]["head"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_frozen_base_is_bit_identical_on_every_process(runs):
    reference, _, _, reports = runs
    want = worker.frozen_hash(reference["trained"], reference["plan"])
    assert want == worker.frozen_hash(reference["params"], reference["plan"])
    for report in reports:
        assert report["frozen_unchanged"], report["process"]
        assert report["frozen_hash"] == want, report["process"]


@pytest.mark.slow
def test_one_process_checkpoint_restores_sharded_on_two_processes(runs):
    _, reference_dir, out, reports = runs
    assert all(r["restored_placed"] for r in reports)  # where shardings= asked, on both processes
    _same_files(out / "peft_from_one", reference_dir / "peft")  # the same values, to the bit


@pytest.mark.slow
def test_eight_device_checkpoint_restores_on_two_processes_of_one_device(runs):
    _, reference_dir, out, reports = runs
    assert all(r["restored8_placed"] for r in reports)
    _same_files(out / "peft_from_eight", reference_dir / "peft")


@pytest.mark.slow
def test_peft_export_of_two_processes_equals_one_process_export(runs):
    reference, reference_dir, out, _ = runs
    two, one = (
        read_tensors([out / "run" / "peft" / "adapter_model.safetensors"]),
        read_tensors([reference_dir / "peft" / "adapter_model.safetensors"]),
    )
    assert set(two) == set(one) and len(one) == 2 * (1 + 2 * 4) + 2  # inp, 4 x (up, down), head weight + bias
    for key in one:
        np.testing.assert_allclose(two[key], one[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert (out / "run" / "peft" / "adapter_config.json").read_bytes() == (
        reference_dir / "peft" / "adapter_config.json"
    ).read_bytes()
    # the export gathers what the checkpoint holds, to the bit (two gathering paths: orbax and process_allgather)
    _, adapters, _ = lora_checkpoint.load_adapter(out / "run" / "adapter", reference["params"])
    a = np.asarray(adapters["layers"]["up"]["kernel"]["lora_a"])
    for layer in range(a.shape[0]):
        np.testing.assert_array_equal(two[f"base_model.model.layers.{layer}.up.lora_A.weight"], a[layer].T)


@pytest.mark.slow
def test_training_checkpoint_resumes_across_process_counts(runs):
    reference, _, out, reports = runs
    for report in reports:  # 1 process (step RESUME) -> 2 processes, trained on to STEPS
        assert report["resumed_from"] == worker.RESUME and report["resumed_placed"]
        np.testing.assert_allclose(report["resumed_losses"], reference["losses"][worker.RESUME :], rtol=1e-5)
    # 2 processes -> 1: the training state both processes wrote at STEPS
    manager = lora_checkpoint.checkpoint_manager(out / "run" / "train", async_save=False)
    state = lora_checkpoint.restore_training(manager, reference["params"], reference["opt_state"])
    manager.close()
    assert state.step == worker.STEPS
    _assert_close(state.adapters, reference["adapters"], rtol=1e-4, atol=1e-6)
    _assert_close(state.opt_state, reference["opt_state"], rtol=1e-4, atol=1e-6)


def test_shardings_argument_places_adapters_or_names_what_is_wrong(tmp_path):
    """In one process: one Sharding for all, a tree, a function of the plan; a tree missing a leaf is refused."""
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    params, adapters, plan, param_shardings = ex.base_and_adapters(mesh)
    lora_checkpoint.save_adapter(tmp_path / "adapter", params, adapters, plan)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    _, restored, _ = lora_checkpoint.load_adapter(tmp_path / "adapter", params, shardings=device)
    assert all(leaf.sharding == device for leaf in jax.tree.leaves(restored))
    tree = jaxlora.adapter_shardings(plan, param_shardings)
    for given in (tree, lambda p: jaxlora.adapter_shardings(p, param_shardings)):
        _, restored, _ = lora_checkpoint.load_adapter(tmp_path / "adapter", params, shardings=given)
        assert worker.placed_as(restored, tree)
        _assert_close(restored, adapters, rtol=0, atol=0)
    del tree["layers"]["up"]["kernel"]["lora_b"]
    with pytest.raises(ValueError, match=r"no entry for the adapter leaf 'layers/up/kernel/lora_b'"):
        lora_checkpoint.load_adapter(tmp_path / "adapter", params, shardings=tree)
    with pytest.raises(TypeError, match=r"shardings must be a jax.sharding.Sharding.*got list"):
        lora_checkpoint.load_adapter(tmp_path / "adapter", params, shardings=[device])


def test_the_example_writes_under_runs_and_says_what_it_did_in_plain_words(tmp_path):
    assert ex.parse_args([]).out == Path("runs/distributed")  # runs/ is gitignored, like every example's output
    summary = {"processes": 2, "devices": 4, "mesh": {"data": 2, "model": 2}, "losses": [2.0] * 5 + [1.0] * 15,
               "seconds_per_step": 0.0195}  # fmt: skip
    said = ex.describe(summary, Path("runs/distributed"))
    assert said.splitlines()[0] == (
        "Trained 20 steps on 2 processes, 4 devices, mesh data 2 x model 2: loss 2.000 -> 1.000 "
        "(mean of the first and last 5); 19.5 ms a step (median after the first, which compiles)."
    )
    assert "runs/distributed/: adapter/" in said and "{" not in said  # no bare JSON
    log = tmp_path / "process-0.log"
    log.write_text("[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\nok\n")
    assert ex.log_lines(log) == ["ok"]


@pytest.mark.slow
def test_the_example_on_two_local_processes_prints_a_summary_and_keeps_gloo_in_the_logs(tmp_path):
    out = tmp_path / "run"
    script = Path(ex.__file__)
    done = subprocess.run(
        [sys.executable, str(script), "--local-processes", "2", "--steps", "3", "--out", str(out)],
        capture_output=True, text=True, timeout=TIMEOUT, env=_env(1),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[Gloo]" not in done.stdout + done.stderr
    assert "Trained 3 steps on 2 processes, 2 devices, mesh data 2 x model 1" in done.stdout
    assert any("[Gloo]" in (out / "logs" / f"process-{i}.log").read_text() for i in range(2))  # kept, not lost
    assert json.loads((out / "summary.json").read_text())["processes"] == 2
    assert (out / "peft" / "adapter_config.json").is_file()
