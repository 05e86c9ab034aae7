"""Pytree paths as "/"-joined strings, the names that config patterns match against."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax

PyTree = Any

# Tests for pytree nodes that stand for one array leaf (quantized kernels): paths and plans treat them as leaves.
_LEAF_TESTS: list[Callable[[Any], bool]] = []


def register_leaf_test(test: Callable[[Any], bool]) -> None:
    """Makes `leaves_with_paths`, `map_with_paths` and plans treat nodes for which `test` is True as leaves."""
    if test not in _LEAF_TESTS:
        _LEAF_TESTS.append(test)


def is_array_leaf(x: Any) -> bool:
    """True for a node one of the `register_leaf_test` tests accepts (e.g. a quantized kernel)."""
    return any(test(x) for test in _LEAF_TESTS)


def key_name(key: Any) -> str:
    """The plain name of one key in a jax key path (dict key, attribute or index)."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(keypath: tuple) -> str:
    """`Dense_0/kernel` for a key path; NNX's trailing `.value` attribute is dropped."""
    names = [key_name(k) for k in keypath]
    if names and names[-1] == "value" and isinstance(keypath[-1], jax.tree_util.GetAttrKey):
        names = names[:-1]
    return "/".join(names)


def leaves_with_paths(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> Iterator[tuple[str, Any]]:
    """Yields `(path, leaf)` for every leaf of `tree`, None placeholders skipped (quantized kernels are leaves)."""
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf or is_array_leaf)[0]:
        yield path_str(keypath), leaf


def map_with_paths(fn: Callable[[str, Any], Any], tree: PyTree) -> PyTree:
    """`jax.tree.map` whose function also receives the leaf's path string."""
    return jax.tree_util.tree_map_with_path(lambda kp, leaf: fn(path_str(kp), leaf), tree, is_leaf=is_array_leaf)


def nested_set(tree: dict, path: str, value: Any) -> None:
    """Stores `value` under `path` in nested dicts, creating the levels it needs."""
    *parents, last = path.split("/")
    for name in parents:
        tree = tree.setdefault(name, {})
    tree[last] = value


# The entries of one adapter: LoRA's two factors, and DoRA's magnitude vector beside them.
ADAPTER_ENTRIES = ({"lora_a", "lora_b"}, {"lora_a", "lora_b", "magnitude"})


def flatten_adapters(adapters: Mapping) -> dict[str, dict[str, Any]]:
    """`{"Dense_0/kernel": {"lora_a": A, "lora_b": B}}` from the nested adapter dicts."""
    flat: dict[str, dict[str, Any]] = {}

    def walk(node: Mapping, prefix: str) -> None:
        if "lora_a" in node or "lora_b" in node:
            if set(node) not in ADAPTER_ENTRIES:
                raise ValueError(
                    f"adapter at {prefix!r} must hold exactly 'lora_a' and 'lora_b' (plus 'magnitude' for DoRA), "
                    f"got {sorted(node)}"
                )
            flat[prefix] = dict(node)
            return
        for name, child in node.items():
            if not isinstance(child, Mapping):
                raise ValueError(
                    f"adapters must be nested dicts ending in {{'lora_a', 'lora_b'}}; "
                    f"found a {type(child).__name__} at {prefix + '/' + str(name) if prefix else name!r}"
                )
            walk(child, f"{prefix}/{name}" if prefix else str(name))

    walk(adapters, "")
    return flat


def unflatten_adapters(flat: Mapping[str, Mapping[str, Any]]) -> dict:
    """The nested adapter dicts from a `{path: {"lora_a": A, "lora_b": B}}` mapping."""
    nested: dict = {}
    for path, pair in flat.items():
        nested_set(nested, path, dict(pair))
    return nested
