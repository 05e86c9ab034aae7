"""Shared test helpers: where the real data lives, and whether its absence is a skip or a failure."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

# Most tests run tiny arrays, so nearly all their time is XLA compiling, and much of that LLVM optimising machine
# code that then runs for microseconds. They compile without LLVM's expensive passes, as benchmarks' --smoke runs do,
# and with XLA's older (elemental) CPU fusion code generator in place of the MLIR fusion emitters, which compiles a
# small program in about half the time (measured on the 2-core machine, 2026-12-02: a 2-layer GPT-2's jitted forward
# 0.6 -> 0.35 s, its gradient 1.4 -> 0.7 s, one eager op 37 -> 25 ms; 2026-12-07, CI=true, nothing else running: the
# slow tests other than those below 1096 -> 668 s, a tunix model's zoo test 50 -> 24 s). The HLO passes and IEEE
# semantics are unchanged (no fast-math). Tests marked `default_codegen` keep XLA's default: the MNIST story computes
# for real (6,000 steps: 173 s by default, 325 s the cheaper way) and the multi-process tests need the bits users get.
# The choice is made per pytest run, before jax creates its CPU client: the cheaper code generation when the marker
# expression leaves the default_codegen tests out (-m "not slow", -m "not default_codegen", -m zoo; scripts/test.sh
# runs those, and with --all the default_codegen tests in a second run). An XLA_FLAGS that already sets the level is
# left alone; the tests' subprocesses inherit it.
FAST_COMPILE_XLA_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
)


def pytest_configure(config):
    """Before any test module is imported (and so before jax creates its CPU client, on first use)."""
    markexpr = (config.option.markexpr or "").replace(" ", "")
    cheap = markexpr == "zoo" or "notslow" in markexpr or "notdefault_codegen" in markexpr
    if cheap and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_XLA_FLAGS).strip()


# tests/zoo runs in its own virtualenv (.venv-zoo, with gemma and tunix: scripts/test.sh --all runs it there); the
# other venvs leave it out. Where .venv-zoo lacks one of them, pytest finds no test there and fails (exit 5).
collect_ignore = [] if importlib.util.find_spec("gemma") and importlib.util.find_spec("tunix") else ["zoo"]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("JAXLORA_SHARED_DATA", REPO.parent / "shared" / "data"))


def in_ci() -> bool:
    """True under CI=true, where a test never skips: a missing dependency or data set is a failure."""
    return os.environ.get("CI", "").lower() == "true"


def _register_hypothesis_profiles() -> None:
    """Property tests draw 5 examples in the fast set and 10 under CI=true (HYPOTHESIS_PROFILE picks another).

    Every example compiles its own shapes, so the count is what a property test costs. In the dev profile examples
    are random on every run (it keeps exploring), and a failing one is saved in .hypothesis/ and replayed first on
    the next run. Under CI=true hypothesis is derandomized (each test draws the same examples every run, seeded by
    the test's name) and reads no example database, so CI's verdict depends on the code alone.
    """
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # the property tests then fail to import, which says so
        return
    common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("dev", max_examples=5, derandomize=False, **common)  # explicit: CI=true would inherit
    settings.register_profile("ci", max_examples=10, derandomize=True, database=None, print_blob=True, **common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if in_ci() else "dev"))


_register_hypothesis_profiles()


def skip_unless_ci(message: str) -> None:
    """Skips the test, or fails it under CI=true (where nothing may skip)."""
    if in_ci():
        pytest.fail(message + " (CI=true: tests may not skip in CI)")
    pytest.skip(message)


def require_data(path: Path, what: str) -> Path:
    """`path` if it exists; otherwise skip the test, or fail it under CI (CI=true) where data must be present."""
    if path.exists():
        return path
    skip_unless_ci(f"{what} not found at {path}")


def require_module(name: str):
    """`pytest.importorskip` that fails instead of skipping under CI=true: the imported module, else skip/fail.

    At module level it skips (or fails) the whole test module, as `pytest.importorskip` does.
    """
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as err:
        if in_ci():
            pytest.fail(f"cannot import {name!r} ({err}) (CI=true: tests may not skip in CI)", pytrace=False)
        pytest.skip(f"cannot import {name!r}: {err}", allow_module_level=True)


def load_example(name: str):
    """Imports `examples/<name>.py` as a module (registered in sys.modules, which dataclasses need)."""
    import importlib.util
    import sys

    examples = str(REPO / "examples")
    if examples not in sys.path:  # as when run as a script: its sibling modules (mnist_data, ...) import
        sys.path.insert(0, examples)
    spec = importlib.util.spec_from_file_location(f"{name}_example", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def local_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving a fresh folder; yields (folder, base URL ending in '/')."""
    import functools
    import http.server
    import threading

    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # no request lines in the test output
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def closed_port_url():
    """A URL on 127.0.0.1 where nothing listens: connecting is refused at once, as offline."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture
def offline(monkeypatch, tmp_path, closed_port_url):
    """No network and none of the data: downloads refused, empty caches, no ../shared copy."""
    import huggingface_hub
    import requests
    import tiktoken.load

    load_example("spam_data")  # puts examples/ on sys.path
    import spam_data

    def refused(*args, **kwargs):
        raise requests.exceptions.ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken.load, "read_file", refused)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    monkeypatch.setattr(spam_data, "SHARED_DATA", tmp_path / "no_shared")
    monkeypatch.setattr(spam_data, "DEFAULT_CACHE", tmp_path / "cache")
    monkeypatch.setattr(spam_data, "DATA_URLS", (closed_port_url + "sms.zip",))

    def no_hub(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("ConnectError: [Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)


def pytest_collection_modifyitems(config, items):
    """Files holding the most slow tests run first (the rest keep their order): pytest-xdist (`--dist loadfile`)
    hands whole files to its workers in this order, so the longest files no longer start last and leave one core idle
    at the end of `scripts/test.sh --all`. A file's tests stay together and in their order."""
    files = [item.nodeid.split("::")[0] for item in items]
    slow = {file: 0 for file in files}
    for file, item in zip(files, items, strict=True):
        slow[file] += item.get_closest_marker("slow") is not None
    first = {file: index for index, file in reversed(list(enumerate(files)))}
    order = {id(item): (-slow[file], first[file]) for file, item in zip(files, items, strict=True)}
    items.sort(key=lambda item: order[id(item)])
