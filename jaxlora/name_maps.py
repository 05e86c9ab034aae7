"""Tables from our parameter paths to PyTorch module names and weight layouts, for PEFT files and HF checkpoints.

A name map is a sequence of rows ``ModuleName(pattern, module, layout)``: ``pattern`` fully matches one of our
module paths ("h_0/attn/c_attn"), ``module`` is the ``re.sub`` template of the torch module name
("transformer.h.\\1.attn.c_attn"), ``layout`` how torch stores its weights (one of ``LAYOUTS``). Modules no row
matches follow the generic rule ("a/b/kernel" is the torch ``nn.Linear`` "a.b")."""

from jaxlora._src.name_maps import (
    LAYOUTS,
    ModuleName,
    NameMap,
    TorchModule,
    from_torch,
    module_table,
    sequential,
    to_torch,
    torch_module,
    torch_param,
)

__all__ = [
    "LAYOUTS",
    "ModuleName",
    "NameMap",
    "TorchModule",
    "from_torch",
    "module_table",
    "sequential",
    "to_torch",
    "torch_module",
    "torch_param",
]
