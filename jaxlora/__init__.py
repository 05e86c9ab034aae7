"""jaxlora: LoRA as a pure transform over Flax parameter pytrees."""

from jaxlora import analysis, checkpoint, name_maps, peft
from jaxlora.config import ALL_EMBEDDINGS, ALL_KERNELS, LoraConfig
from jaxlora.factored import apply
from jaxlora.init import init
from jaxlora.merge import merge, unmerge
from jaxlora.partition import combine, count_params, labels, optimizer, partition
from jaxlora.plan import LeafPlan, Plan, plan, summary
from jaxlora.sharding import adapter_shardings, adapter_specs

__version__ = "0.1.0"

__all__ = [
    "ALL_EMBEDDINGS",
    "ALL_KERNELS",
    "LeafPlan",
    "LoraConfig",
    "Plan",
    "adapter_shardings",
    "adapter_specs",
    "analysis",
    "apply",
    "checkpoint",
    "combine",
    "count_params",
    "init",
    "labels",
    "merge",
    "name_maps",
    "optimizer",
    "partition",
    "peft",
    "plan",
    "summary",
    "unmerge",
]
