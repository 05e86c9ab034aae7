"""Tables from our parameter paths to PyTorch module names and weight layouts, for PEFT files and HF checkpoints.

A name map is a sequence of rows ``ModuleName(pattern, module, layout)``: ``pattern`` fully matches one of our
module paths ("h_0/attn/c_attn"), ``module`` is the ``re.sub`` template of the torch module name
("transformer.h.\\1.attn.c_attn"), ``layout`` how torch stores its weights (one of ``LAYOUTS``). Modules no row
matches follow the generic rule ("a/b/kernel" is the torch ``nn.Linear`` "a.b"). A pattern may also match a leaf's
whole path (kernels sharing one scope), and a template may hold one ``{a,b}`` group (a kernel whose first axis
stacks several torch modules, `split_names`). `tunix_name_map` and `gemma_name_map` are the maps of the peer
libraries' language models."""

from jaxlora._src.name_maps import (
    LAYOUTS,
    ModuleName,
    NameMap,
    TorchModule,
    from_torch,
    module_table,
    sequential,
    split_names,
    to_torch,
    torch_module,
    torch_param,
)
from jaxlora._src.peer_name_maps import gemma_name_map, tunix_name_map

__all__ = [
    "LAYOUTS",
    "ModuleName",
    "NameMap",
    "TorchModule",
    "from_torch",
    "gemma_name_map",
    "module_table",
    "sequential",
    "split_names",
    "to_torch",
    "torch_module",
    "torch_param",
    "tunix_name_map",
]
