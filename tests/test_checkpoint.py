"""Adapter-only orbax checkpoints: round trips across processes, fingerprints, atomic and interrupted saves."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from models import MLP

import jaxlora
from jaxlora import checkpoint

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

# The toy MLP 20-2000-200-2 with rank-3 adapters on its first two layers: 12,660 LoRA parameters.
FEATURES = (2000, 200, 2)
CONFIG = jaxlora.LoraConfig(rank=3, alpha=6.0, targets=(r"linear[12]/kernel",), modules_to_save=(r"linear3/.*",))


def _setup(seed: int = 0, features=FEATURES, config=CONFIG):
    """Base params, trained-looking adapters (B non-zero) and params whose saved head was trained."""
    model = MLP(features)
    base = model.init(jax.random.key(seed), jnp.zeros((1, 20)))["params"]
    _, adapters = jaxlora.init(jax.random.key(seed + 1), base, config)
    adapters = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(x.size), x.shape), adapters)
    head = f"linear{len(features)}"
    trained = {**base, head: jax.tree.map(lambda x: x + 0.5, base[head])}
    return model, base, trained, adapters


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _run_python(code: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{REPO}{os.pathsep}{TESTS}"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


# ----------------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.slow
def test_round_trip_in_a_fresh_process(tmp_path):
    model, base, trained, adapters = _setup()
    checkpoint.save_adapter(tmp_path / "adapter", trained, adapters, CONFIG)
    x = np.random.default_rng(0).standard_normal((5, 20)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    child = _run_python(
        """
        import sys, jax, jax.numpy as jnp, numpy as np
        import jaxlora
        from jaxlora import checkpoint
        from models import MLP
        model = MLP((2000, 200, 2))
        base = model.init(jax.random.key(0), jnp.zeros((1, 20)))["params"]  # the untrained base, rebuilt
        params, adapters, plan = checkpoint.load_adapter(sys.argv[1] + "/adapter", base)
        x = np.load(sys.argv[1] + "/x.npy")
        np.save(sys.argv[1] + "/y.npy", np.asarray(jaxlora.apply(model, {"params": params}, adapters, plan, x)))
        print(plan.config.to_json())
        """,
        str(tmp_path),
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert jaxlora.LoraConfig.from_json(child.stdout[child.stdout.index("{") :]) == CONFIG
    want = model.apply({"params": jaxlora.merge(trained, adapters, CONFIG)}, x)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, atol=1e-5)
    assert not np.allclose(want, model.apply({"params": base}, x), atol=1e-3)  # the adapters and head matter


def test_round_trip_is_exact_and_keeps_dtypes(tmp_path):
    _, base, trained, adapters = _setup()
    adapters["linear2"]["kernel"]["lora_b"] = adapters["linear2"]["kernel"]["lora_b"].astype(jnp.bfloat16)
    path = checkpoint.save_adapter(tmp_path / "a", trained, adapters, CONFIG)
    assert path == (tmp_path / "a").absolute()
    params, restored, plan = checkpoint.load_adapter(path, base)
    assert plan.config == CONFIG and plan == jaxlora.plan(base, CONFIG)
    _assert_trees_equal(restored, adapters)
    _assert_trees_equal(params, trained)


def test_without_saved_leaves_the_given_params_come_back(tmp_path):
    _, base, trained, adapters = _setup()
    checkpoint.save_adapter(tmp_path / "a", trained, adapters, CONFIG, include_saved=False)
    params, restored, _ = checkpoint.load_adapter(tmp_path / "a", base)
    _assert_trees_equal(params, base)
    _assert_trees_equal(restored, adapters)


def test_relative_paths(tmp_path, monkeypatch):
    _, base, trained, adapters = _setup()
    monkeypatch.chdir(tmp_path)
    checkpoint.save_adapter("runs/adapter", trained, adapters, CONFIG)
    assert (tmp_path / "runs" / "adapter" / "meta").is_dir()
    _, restored, _ = checkpoint.load_adapter("runs/adapter", base)
    _assert_trees_equal(restored, adapters)


def test_size_on_disk_of_the_toy_adapter(tmp_path):
    config = jaxlora.LoraConfig(rank=3, alpha=6.0, targets=(r"linear[12]/kernel",))
    _, base, _, adapters = _setup(config=config)
    assert jaxlora.count_params(adapters) == 12_660
    path = checkpoint.save_adapter(tmp_path / "a", base, adapters, config)
    files = [p for p in path.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    print(f"\norbax adapter checkpoint: {size:,} bytes in {len(files)} files (12,660 float32 = 50,640 bytes)")
    assert 50_640 * 0.5 < size < 50_640 * 3


# ----------------------------------------------------------------------------------------------------------------
# Fingerprint and metadata


def test_fingerprint_mismatch_names_the_first_differing_path(tmp_path):
    _, _, trained, adapters = _setup()
    checkpoint.save_adapter(tmp_path / "a", trained, adapters, CONFIG)
    _, other, _, _ = _setup(features=(2000, 100, 2))
    message = (
        f"adapter checkpoint {tmp_path / 'a'} does not fit these params: at 'linear2/kernel' it expects a "
        "float32 array of shape (2000, 200), but params have a float32 array of shape (2000, 100). "
        "Load it with the base model it was trained on."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        checkpoint.load_adapter(tmp_path / "a", other)


def test_fingerprint_checks_dtype_and_missing_leaves(tmp_path):
    _, base, trained, adapters = _setup()
    checkpoint.save_adapter(tmp_path / "a", trained, adapters, CONFIG)
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "at 'linear1/kernel' it expects a float32 array of shape (20, 2000), but params have a bfloat16 array"
        ),
    ):
        checkpoint.load_adapter(tmp_path / "a", half)
    renamed = {"fc1" if k == "linear1" else k: v for k, v in base.items()}
    with pytest.raises(
        ValueError,
        match=re.escape(
            "at 'linear1/kernel' it expects a float32 array of shape (20, 2000), but params have no such leaf"
        ),
    ):
        checkpoint.load_adapter(tmp_path / "a", renamed)


def test_extra_adapted_leaf_is_a_mismatch(tmp_path):
    config = jaxlora.LoraConfig(rank=2, targets=(r"linear\d/kernel",))
    _, base, _, adapters = _setup(features=(8, 4), config=config)
    checkpoint.save_adapter(tmp_path / "a", base, adapters, config)
    _, deeper, _, _ = _setup(features=(8, 4, 4), config=config)
    with pytest.raises(
        ValueError, match=re.escape("its config also adapts 'linear3/kernel' (a float32 array of shape (4, 4))")
    ):
        checkpoint.load_adapter(tmp_path / "a", deeper)


def _nudge(params, path: str, index, by: float = 1e-3):
    """`params` with one element of the leaf at `path` moved by `by` (a copy)."""
    layer, leaf = path.split("/")
    return {**params, layer: {**params[layer], leaf: params[layer][leaf].at[index].add(by)}}


def test_a_base_with_other_weights_of_the_same_shapes_is_refused_unless_asked(tmp_path):
    _, base, trained, adapters = _setup()
    checkpoint.save_adapter(tmp_path / "a", trained, adapters, CONFIG)
    other = _nudge(base, "linear2/kernel", (1234, 56))  # one weight of 400,000 moved by 1e-3
    message = (
        f"adapter checkpoint {tmp_path / 'a'} was saved with other base weights: the values of 'linear2/kernel' "
        "differ from the base it was trained on (1 of 2 adapted leaves differ"
    )
    with pytest.raises(ValueError, match=re.escape(message) + r".*check_content=False to load it anyway"):
        checkpoint.load_adapter(tmp_path / "a", other)
    params, restored, _ = checkpoint.load_adapter(tmp_path / "a", other, check_content=False)
    _assert_trees_equal(restored, adapters)
    _assert_trees_equal(params["linear2"], other["linear2"])
    checkpoint.load_adapter(tmp_path / "a", base)  # the right base loads
    # A trained modules_to_save leaf is stored, not fingerprinted: a different head in params is no mismatch.
    checkpoint.load_adapter(tmp_path / "a", _nudge(base, "linear3/kernel", (0, 0)))


def test_training_restore_checks_the_base_content_too(tmp_path):
    _, base, trained, adapters = _setup()
    manager = checkpoint.checkpoint_manager(tmp_path / "run", async_save=False)
    checkpoint.save_training(manager, 1, trained, adapters, {"count": jnp.int32(1)}, CONFIG)
    other = _nudge(base, "linear1/kernel", (0, 0), by=-1e-3)
    with pytest.raises(ValueError, match=r"step 1 was saved with other base weights: the values of 'linear1/kernel'"):
        checkpoint.restore_training(manager, other, {"count": jnp.int32(0)})
    state = checkpoint.restore_training(manager, other, {"count": jnp.int32(0)}, check_content=False)
    assert int(state.opt_state["count"]) == 1
    manager.close()


def test_checkpoints_without_content_checksums_still_load(tmp_path):
    _, base, trained, adapters = _setup()
    checkpoint.save_adapter(tmp_path / "a", trained, adapters, CONFIG)
    _edit_meta(tmp_path / "a", lambda meta: meta["base"].pop("content"))  # as written before checksums existed
    _, restored, _ = checkpoint.load_adapter(tmp_path / "a", _nudge(base, "linear2/kernel", (0, 0)))
    _assert_trees_equal(restored, adapters)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_content_checksum_sees_any_single_changed_element_and_nothing_else(dtype):
    from jaxlora._src.fingerprints import content_checksums

    rng = np.random.default_rng(0)
    kernel = jnp.asarray(rng.standard_normal((37, 29)) * 20, dtype)
    params = {"layer": {"kernel": kernel, "bias": jnp.zeros(29, dtype)}}
    plan = jaxlora.plan(params, jaxlora.LoraConfig(rank=2))
    reference = content_checksums(params, plan)
    assert list(reference) == ["layer/kernel"] and len(reference["layer/kernel"]) == 16
    assert content_checksums(jax.tree.map(jnp.copy, params), plan) == reference  # values, not identity
    assert content_checksums({"layer": {**params["layer"], "bias": params["layer"]["bias"] + 1}}, plan) == reference
    flat = np.asarray(kernel).reshape(-1)
    for index in rng.choice(flat.size, 40, replace=False):
        changed = flat.copy()
        bits = changed.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[changed.dtype.itemsize])
        bits[index] ^= 1  # the smallest change there is: the last bit of one element
        moved = {"layer": {**params["layer"], "kernel": jnp.asarray(changed.reshape(kernel.shape))}}
        assert content_checksums(moved, plan) != reference, index
    swapped = flat.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # the same values in another order
    if swapped[0] != swapped[1]:
        moved = {"layer": {**params["layer"], "kernel": jnp.asarray(swapped.reshape(kernel.shape))}}
        assert content_checksums(moved, plan) != reference


def _edit_meta(path: Path, edit) -> None:
    meta_file = path / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    edit(meta)
    meta_file.write_text(json.dumps(meta))


def test_unknown_config_keys_from_a_newer_version_warn(tmp_path):
    _, base, trained, adapters = _setup()
    checkpoint.save_adapter(tmp_path / "a", trained, adapters, CONFIG)
    _edit_meta(tmp_path / "a", lambda meta: meta["config"].update(future_knob=3))
    with pytest.warns(UserWarning, match=re.escape("LoraConfig: ignoring unknown keys ['future_knob']")):
        _, restored, plan = checkpoint.load_adapter(tmp_path / "a", base)
    assert plan.config == CONFIG
    _assert_trees_equal(restored, adapters)


def test_newer_format_version_is_refused(tmp_path):
    _, base, trained, adapters = _setup()
    checkpoint.save_adapter(tmp_path / "a", trained, adapters, CONFIG)
    _edit_meta(tmp_path / "a", lambda meta: meta.update(format_version=99))
    with pytest.raises(
        ValueError,
        match=re.escape("has checkpoint format version 99; this jaxlora reads versions up to 1: upgrade jaxlora"),
    ):
        checkpoint.load_adapter(tmp_path / "a", base)


def test_missing_and_foreign_directories(tmp_path):
    _, base, _, _ = _setup()
    with pytest.raises(FileNotFoundError, match=re.escape(f"no adapter checkpoint at {tmp_path / 'nope'}")):
        checkpoint.load_adapter(tmp_path / "nope", base)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'empty'} is not a jaxlora adapter checkpoint")):
        checkpoint.load_adapter(tmp_path / "empty", base)


# ----------------------------------------------------------------------------------------------------------------
# Overwriting and failed saves


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_overwrite_needs_explicit_permission(tmp_path):
    _, base, trained, adapters = _setup()
    checkpoint.save_adapter(tmp_path / "a", trained, adapters, CONFIG)
    newer = jax.tree.map(lambda x: x * 2, adapters)
    message = (
        f"{tmp_path / 'a'} already exists; pass overwrite=True to replace it "
        "(the old one is kept until the new one is completely written)"
    )
    with pytest.raises(FileExistsError, match=re.escape(message)):
        checkpoint.save_adapter(tmp_path / "a", trained, newer, CONFIG)
    _assert_trees_equal(checkpoint.load_adapter(tmp_path / "a", base)[1], adapters)
    checkpoint.save_adapter(tmp_path / "a", trained, newer, CONFIG, overwrite=True)
    _assert_trees_equal(checkpoint.load_adapter(tmp_path / "a", base)[1], newer)
    assert _siblings(tmp_path / "a") == ["a"]


def test_invalid_input_writes_nothing(tmp_path):
    _, _, trained, adapters = _setup()
    adapters["linear1"]["kernel"]["lora_a"] = jnp.zeros((20, 4))
    with pytest.raises(
        ValueError, match=re.escape("adapter linear1/kernel/lora_a has shape (20, 4), but the plan gives (20, 3)")
    ):
        checkpoint.save_adapter(tmp_path / "a", trained, adapters, CONFIG)
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_leaves_nothing_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    _, base, trained, adapters = _setup()
    checkpoint.save_adapter(tmp_path / "a", trained, adapters, CONFIG)
    original_save = ocp.Checkpointer.save

    def save_then_fail(self, directory, *args, **kwargs):
        original_save(self, directory, *args, **kwargs)  # everything written ...
        raise OSError("disk full")  # ... and then the save fails anyway

    monkeypatch.setattr(ocp.Checkpointer, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_adapter(
            tmp_path / "a", trained, jax.tree.map(lambda x: x * 2, adapters), CONFIG, overwrite=True
        )
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_adapter(tmp_path / "b", trained, adapters, CONFIG)
    monkeypatch.undo()
    assert _siblings(tmp_path / "a") == ["a"]
    _assert_trees_equal(checkpoint.load_adapter(tmp_path / "a", base)[1], adapters)


_BIG_SAVE = """
import sys, time, jax, jax.numpy as jnp, numpy as np
import jaxlora
from jaxlora import checkpoint
from models import MLP
directory, mode = sys.argv[1], sys.argv[2]
model = MLP((4000, 200, 2))
base = model.init(jax.random.key(0), jnp.zeros((1, 6000)))["params"]  # linear1: 24M floats, trained in full
config = jaxlora.LoraConfig(rank=3, targets=(r"linear2/kernel",), modules_to_save=(r"linear1/.*",))
_, adapters = jaxlora.init(jax.random.key(1), base, config)
adapters = jax.tree.map(lambda x: x + 1.0, adapters)
if mode == "adapter":
    checkpoint.save_adapter(directory, base, adapters, config, include_saved=False)
    print("first saved", flush=True)
    big = jax.tree.map(lambda x: x * 2, adapters)
    checkpoint.save_adapter(directory, base, big, config, overwrite=True)  # killed while writing linear1
else:
    manager = checkpoint.checkpoint_manager(directory, max_to_keep=3, async_save=False)
    small = jaxlora.LoraConfig(rank=3, targets=(r"linear2/kernel",))
    checkpoint.save_training(manager, 1, base, adapters, {"count": jnp.int32(1)}, small)
    print("first saved", flush=True)
    checkpoint.save_training(manager, 2, base, adapters, {"count": jnp.int32(2)}, config)  # killed mid-save
print("second saved", flush=True)
"""


def _kill_during_second_save(tmp_path: Path, mode: str, in_progress) -> None:
    """Runs _BIG_SAVE in a child and SIGKILLs it as soon as `in_progress()` sees the second save's temporaries."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{REPO}{os.pathsep}{TESTS}"}
    target = tmp_path / "ckpt"
    child = subprocess.Popen(
        [sys.executable, "-c", _BIG_SAVE, str(target), mode],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "first saved", child.stderr.read()[-3000:]
        deadline = time.monotonic() + 120
        while not in_progress(target) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    assert "second saved" not in child.stdout.read()


def _bytes_under(paths) -> int:
    """Bytes in the files below `paths`, counting files that vanish while we look (orbax renames as it writes) as 0."""

    def size(path: str) -> int:
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            return 0

    # os.walk skips directories that disappear mid-walk, where Path.rglob may raise.
    return sum(size(os.path.join(d, f)) for p in paths for d, _, files in os.walk(p) for f in files)


# Killed once more than 4 MB of the 96 MB second save are on disk: in the middle of writing its arrays.
_MID_WRITE = 4 * 2**20


@pytest.mark.slow  # end to end (see pyproject.toml: --all and .ci/run run it)
def test_killed_adapter_save_leaves_the_previous_checkpoint(tmp_path):
    _kill_during_second_save(
        tmp_path, "adapter", lambda target: _bytes_under(target.parent.glob(f".{target.name}.tmp-*")) > _MID_WRITE
    )
    assert any(p.name.startswith(".ckpt.tmp-") for p in tmp_path.iterdir())  # the half-written save is there
    model = MLP((4000, 200, 2))
    base = model.init(jax.random.key(0), jnp.zeros((1, 6000)))["params"]
    params, adapters, plan = checkpoint.load_adapter(tmp_path / "ckpt", base)
    np.testing.assert_array_equal(np.asarray(adapters["linear2"]["kernel"]["lora_b"]), 1.0)  # the first save
    _assert_trees_equal(params, base)
    checkpoint.save_adapter(tmp_path / "ckpt", base, adapters, plan, include_saved=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # the next save cleans up


def test_replacement_cut_between_its_two_renames_is_recovered(tmp_path):
    """A crash after moving the old checkpoint aside, before moving the new one in, loses nothing."""
    _, base, trained, adapters = _setup()
    checkpoint.save_adapter(tmp_path / "a", trained, adapters, CONFIG)
    (tmp_path / "a").rename(tmp_path / ".a.old-123456789abc")
    (tmp_path / ".a.tmp-123456789abc").mkdir()  # the new one, never finished
    _assert_trees_equal(checkpoint.load_adapter(tmp_path / "a", base)[1], adapters)
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        checkpoint.save_adapter(tmp_path / "a", trained, adapters, CONFIG)
    assert _siblings(tmp_path / "a") == ["a"]


@pytest.mark.slow  # end to end (see pyproject.toml: --all and .ci/run run it)
def test_killed_training_save_keeps_the_previous_step(tmp_path):
    _kill_during_second_save(
        tmp_path, "manager", lambda target: _bytes_under(target.glob("2.orbax-checkpoint-tmp*")) > _MID_WRITE
    )
    model = MLP((4000, 200, 2))
    base = model.init(jax.random.key(0), jnp.zeros((1, 6000)))["params"]
    manager = checkpoint.checkpoint_manager(tmp_path / "ckpt")
    assert manager.all_steps() == [1]
    state = checkpoint.restore_training(manager, base, {"count": jnp.int32(0)})
    assert state.step == 1 and int(state.opt_state["count"]) == 1
    np.testing.assert_array_equal(np.asarray(state.adapters["linear2"]["kernel"]["lora_b"]), 1.0)
    manager.close()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1"]  # temporaries removed


_SAVE_FOREVER = """
import sys, jax, jax.numpy as jnp
import jaxlora
from jaxlora import checkpoint
from models import MLP
model = MLP((64,) * 12 + (2,))  # 13 layers: many files per step, so pruning one takes a while
base = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8)))["params"]  # jitted: one compile, not one per op
targets = (r"linear\\d/kernel", r"linear1[012]/kernel")
config = jaxlora.LoraConfig(rank=2, targets=targets, modules_to_save=(r"linear13/.*",))
_, adapters = jax.jit(jaxlora.init, static_argnums=2)(jax.random.key(1), base, config)
manager = checkpoint.checkpoint_manager(sys.argv[1], max_to_keep=2)  # every save prunes the oldest step
start = (manager.latest_step() or 0) + 1
for step in range(start, start + 100_000):
    print("saving", step, flush=True)
    marked = jax.tree.map(lambda x: jnp.full_like(x, step), adapters)
    checkpoint.save_training(manager, step, base, marked, {"count": jnp.int32(step)}, config)
"""

RANDOM_KILLS = 10


@pytest.mark.slow
def test_every_listed_step_restores_after_kills_at_random_moments_of_saving_and_pruning(tmp_path):
    """SIGKILL a run that saves (async) and prunes (max_to_keep=2) without pause, at random moments, 10 times.

    Before pruning became a rename, about one kill in four left a half-deleted step that all_steps() listed and
    restore failed on (orbax KeyError 'Item "meta" was not found', or TensorStore NOT_FOUND).
    """
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": f"{REPO}{os.pathsep}{TESTS}"}
    model = MLP((64,) * 12 + (2,))
    base = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8)))["params"]  # as the child builds it
    rng = np.random.default_rng(0 if os.environ.get("CI") == "true" else int(time.time()))
    seen_steps = 0
    for kill in range(RANDOM_KILLS):
        child = subprocess.Popen(
            [sys.executable, "-c", _SAVE_FOREVER, str(tmp_path / "run")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # Kill only once saves overlap pruning (from the third save on), at a random moment within the next
            # two saves' time as this machine paces them: a loaded machine cannot push every kill before pruning.
            started = _wait_for_saves(child, 3 if kill == 0 else 2)
            delay = float(rng.uniform(0.0, 2.0)) * (started[-1] - started[-2])
            time.sleep(delay)
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
        manager = checkpoint.checkpoint_manager(tmp_path / "run", max_to_keep=2)
        steps = manager.all_steps()
        for step in steps:
            state = checkpoint.restore_training(manager, base, {"count": jnp.int32(0)}, step=step)
            assert int(state.opt_state["count"]) == step, (kill, delay, step)
            np.testing.assert_array_equal(np.asarray(state.adapters["linear1"]["kernel"]["lora_a"]), step)
        manager.close()
        seen_steps = max([seen_steps, *steps])
        assert not (tmp_path / "run" / ".jaxlora-pruned").exists()  # pruned leftovers are removed at start
    assert seen_steps >= 3, "no step was ever pruned before a kill; the test proved nothing"


def _wait_for_saves(child, count):
    """Read the child's "saving N" lines until `count` saves have begun; returns the times they began."""
    started = []
    while len(started) < count:
        line = child.stdout.readline()
        assert line.startswith("saving"), f"the saving child stopped: {child.stderr.read()[-3000:]}"
        started.append(time.monotonic())
    return started


def test_a_damaged_step_names_the_step_and_what_is_missing(tmp_path):
    _, base, trained, adapters = _setup()
    manager = checkpoint.checkpoint_manager(tmp_path / "run", async_save=False)
    for step in (1, 2):
        checkpoint.save_training(manager, step, trained, adapters, {"count": jnp.int32(step)}, CONFIG)
    shutil.rmtree(tmp_path / "run" / "2" / "meta")  # as a deletion cut short by a kill (older jaxlora) leaves it
    with pytest.raises(ValueError, match=r"step 2 cannot be restored: items \['meta'\] are missing in .*\[1\]"):
        checkpoint.restore_training(manager, base, {"count": jnp.int32(0)}, step=2)
    for path in (tmp_path / "run" / "1" / "opt_state").rglob("*"):
        if path.is_file() and path.name != "_METADATA":
            path.unlink()
    with pytest.raises(ValueError, match=r"step 1 cannot be restored: an item's files are incomplete"):
        checkpoint.restore_training(manager, base, {"count": jnp.int32(0)}, step=1)
    manager.close()


# ----------------------------------------------------------------------------------------------------------------
# Resuming training


def _train(model, trainable, frozen, opt_state, tx, config, steps: int, start: int):
    @jax.jit
    def step(trainable, opt_state, x, y):
        def loss_fn(trainable):
            params, adapters = jaxlora.combine(trainable, frozen)
            logits = jaxlora.apply(model, {"params": params}, adapters, config, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    for i in range(start, start + steps):
        rng = np.random.default_rng(i)
        x, y = rng.standard_normal((8, 20)).astype(np.float32), rng.integers(0, 2, 8)
        trainable, opt_state = step(trainable, opt_state, x, y)
    return trainable, opt_state


def test_resume_training_matches_an_uninterrupted_run(tmp_path):
    config = jaxlora.LoraConfig(rank=2, alpha=4.0, targets=(r"linear[12]/kernel",), modules_to_save=(r"linear3/.*",))
    model = MLP((16, 8, 2))
    base = model.init(jax.random.key(0), jnp.zeros((1, 20)))["params"]
    params, adapters = jaxlora.init(jax.random.key(1), base, config)
    tx = jaxlora.optimizer(optax.adam(1e-2), config)
    trainable, frozen = jaxlora.partition(params, adapters, config)
    opt_state = tx.init(trainable)

    manager = checkpoint.checkpoint_manager(tmp_path / "run", max_to_keep=2)
    assert checkpoint.restore_training(manager, base, opt_state) is None  # nothing saved yet
    for step in range(1, 5):
        trainable, opt_state = _train(model, trainable, frozen, opt_state, tx, config, 1, step)
        checkpoint.save_training(manager, step, *jaxlora.combine(trainable, frozen), opt_state, config)
    manager.wait_until_finished()
    assert manager.all_steps() == [3, 4]  # keeps the last 2
    uninterrupted, _ = _train(model, trainable, frozen, opt_state, tx, config, 3, 5)
    manager.close()

    # A new process would start from the untrained base and a fresh optimizer state as templates.
    manager = checkpoint.checkpoint_manager(tmp_path / "run", max_to_keep=2)
    fresh_trainable, _ = jaxlora.partition(*jaxlora.init(jax.random.key(9), base, config), config)
    state = checkpoint.restore_training(manager, base, jax.eval_shape(tx.init, fresh_trainable))
    assert state.step == 4 and state.config == config and state.plan.config == config
    trainable2, frozen2 = jaxlora.partition(state.params, state.adapters, state.plan)
    resumed, _ = _train(model, trainable2, frozen2, state.opt_state, tx, config, 3, 5)
    for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(uninterrupted), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    assert checkpoint.restore_training(manager, base, opt_state, step=3).step == 3
    with pytest.raises(ValueError, match=re.escape("no checkpoint for step 1 in")):
        checkpoint.restore_training(manager, base, opt_state, step=1)
    manager.close()
