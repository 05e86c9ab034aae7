"""LoRA+ (B learns `ratio` times faster than A): the optimizer helper and its labels."""

from jaxlora._src.loraplus import DEFAULT_RATIO, FAST, loraplus_labels, loraplus_optimizer

__all__ = ["DEFAULT_RATIO", "FAST", "loraplus_labels", "loraplus_optimizer"]
