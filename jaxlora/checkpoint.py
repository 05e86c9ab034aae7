"""Checkpoints of adapters with orbax: one adapter (`save_adapter` / `load_adapter`) and training runs
(`checkpoint_manager`, `save_training`, `restore_training`). Every write is atomic, and every load checks the
base params against the fingerprint stored with the adapter."""

from jaxlora._src.adapter_checkpoint import FORMAT, FORMAT_VERSION, load_adapter, save_adapter
from jaxlora._src.training_checkpoint import TrainingState, checkpoint_manager, restore_training, save_training

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "TrainingState",
    "checkpoint_manager",
    "load_adapter",
    "restore_training",
    "save_adapter",
    "save_training",
]
