"""jaxlora: LoRA as a pure transform over Flax parameter pytrees.

The public face; the implementation lives in `jaxlora._src`. Build a `Plan` once with `plan(params, config)` and
hand it to the other functions.
"""

from jaxlora import analysis, checkpoint, layers, loraplus, name_maps, peft_format, quantization
from jaxlora._src.adapter_bank import BASE_MODEL, AdapterBank, adapter_bank, apply_bank, apply_bank_nnx
from jaxlora._src.adapter_module import AdapterModule
from jaxlora._src.builtin_layers import register_builtin_layers as _register_builtin_layers
from jaxlora._src.combinations import weighted_cat, weighted_linear, weighted_svd
from jaxlora._src.config import ALL_EMBEDDINGS, ALL_KERNELS, LoraConfig
from jaxlora._src.eva import init_eva
from jaxlora._src.finiteness import all_finite, nonfinite_paths
from jaxlora._src.immutable import FrozenMapping
from jaxlora._src.initializers import init
from jaxlora._src.interception import DROPOUT_RNG, apply, apply_fn
from jaxlora._src.layer_kinds import register_layer, unregister_layer
from jaxlora._src.linear import lora_linear
from jaxlora._src.loraplus import loraplus_optimizer
from jaxlora._src.merging import dora_norms, merge, unmerge
from jaxlora._src.named_adapters import NamedAdapters
from jaxlora._src.nnx_interception import apply_nnx, apply_nnx_fn
from jaxlora._src.partitioning import combine, count_params, labels, optimizer, partition
from jaxlora._src.planning import LeafPlan, Plan, plan, summary
from jaxlora._src.sharding import adapter_shardings, adapter_specs

_register_builtin_layers()

__version__ = "0.2.0"

__all__ = [
    "ALL_EMBEDDINGS",
    "ALL_KERNELS",
    "BASE_MODEL",
    "DROPOUT_RNG",
    "AdapterBank",
    "AdapterModule",
    "FrozenMapping",
    "LeafPlan",
    "LoraConfig",
    "NamedAdapters",
    "Plan",
    "adapter_bank",
    "adapter_shardings",
    "adapter_specs",
    "all_finite",
    "analysis",
    "apply",
    "apply_bank",
    "apply_bank_nnx",
    "apply_fn",
    "apply_nnx",
    "apply_nnx_fn",
    "checkpoint",
    "combine",
    "count_params",
    "dora_norms",
    "init",
    "init_eva",
    "labels",
    "layers",
    "lora_linear",
    "loraplus",
    "loraplus_optimizer",
    "merge",
    "name_maps",
    "nonfinite_paths",
    "optimizer",
    "partition",
    "peft_format",
    "plan",
    "quantization",
    "register_layer",
    "summary",
    "unmerge",
    "unregister_layer",
    "weighted_cat",
    "weighted_linear",
    "weighted_svd",
]


def __getattr__(name: str):
    if name == "peft":  # jaxlora 0.1's name, which shadowed the `peft` package in users' namespaces
        import importlib

        return importlib.import_module("jaxlora.peft")  # the shim module: it warns (DeprecationWarning) on import
    raise AttributeError(f"module 'jaxlora' has no attribute {name!r}")
