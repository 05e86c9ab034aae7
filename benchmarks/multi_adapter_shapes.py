"""Sizes of the multi-adapter serving benchmarks, shared by the jax and torch sides (imports neither framework)."""

from __future__ import annotations

from benchmarks.common import Profile

SLOTS = 4  # adapters in the bank; row b uses adapter b % SLOTS


def decode_sizes(profile: Profile) -> tuple[int, int]:
    """(longest prompt, new tokens) of the decoding benchmark: 32 and 64 in full runs, 8 and 4 in smoke runs."""
    return (8, 4) if profile.name == "smoke" else (32, 64)


def prompt_lengths(batch: int, prompt: int) -> list[int]:
    """Per-row prompt lengths, left-padded to `prompt`: the rows differ, as when serving."""
    return [prompt - (row * 5) % max(1, prompt // 2) for row in range(batch)]
