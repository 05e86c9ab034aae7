"""GPT-2 in flax.linen, with parameter names that mirror Hugging Face's ``GPT2Model``.

Parameter tree (linen names a list of blocks ``h_0``, ``h_1``, ...; the torch names are ``h.0``, ``h.1``)::

    wte/embedding                  (vocab, n_embd)      transformer.wte.weight
    wpe/embedding                  (n_positions, n_embd) transformer.wpe.weight
    h_{i}/ln_1/{scale,bias}                             transformer.h.{i}.ln_1.{weight,bias}
    h_{i}/attn/c_attn/{kernel,bias} (n_embd, 3 n_embd)  transformer.h.{i}.attn.c_attn.{weight,bias}
    h_{i}/attn/c_proj/{kernel,bias} (n_embd, n_embd)    transformer.h.{i}.attn.c_proj.{weight,bias}
    h_{i}/ln_2/{scale,bias}                             transformer.h.{i}.ln_2.{weight,bias}
    h_{i}/mlp/c_fc/{kernel,bias}    (n_embd, 4 n_embd)  transformer.h.{i}.mlp.c_fc.{weight,bias}
    h_{i}/mlp/c_proj/{kernel,bias}  (4 n_embd, n_embd)  transformer.h.{i}.mlp.c_proj.{weight,bias}
    ln_f/{scale,bias}                                   transformer.ln_f.{weight,bias}
    head/kernel  (classifier only)  (n_embd, classes)   score.weight (transposed: nn.Linear)

Every linear layer is a plain ``nn.Dense`` and both embeddings are ``nn.Embed``, so ``jaxlora.apply`` adapts
them without forming ``W + A @ B``. Hugging Face stores GPT-2's linears as ``Conv1D`` whose weight is already
laid out ``(in, out)`` like a flax kernel, so loading copies them without a transpose.

The package is laid out as ``jaxlora.models.llama`` is: ``config``, ``cache``, ``model``, ``generation``,
``hf_checkpoint``, ``names``, ``layout``::

    from jaxlora.models import gpt2
    params = gpt2.load_hf_weights("path/or/repo-id")
    tokens = gpt2.generate(gpt2.GPT2(gpt2.GPT2Config.from_name("gpt2")), params, prompt_ids, max_new_tokens=32)
"""

from jaxlora.models.gpt2.cache import init_cache
from jaxlora.models.gpt2.config import PRESETS, GPT2Config
from jaxlora.models.gpt2.generation import apply_model, generate, generate_greedy, left_pad
from jaxlora.models.gpt2.hf_checkpoint import config_from_hf, load_hf_weights
from jaxlora.models.gpt2.layout import stack_layers, unstack_layers
from jaxlora.models.gpt2.model import GPT2, GPT2Classifier
from jaxlora.models.gpt2.names import PEFT_NAME_MAP, PEFT_NAME_MAP_SCANNED, torch_module_name, torch_param_name
from jaxlora.models.kv_cache import KVCache

__all__ = [
    "GPT2",
    "PEFT_NAME_MAP",
    "PEFT_NAME_MAP_SCANNED",
    "PRESETS",
    "GPT2Classifier",
    "GPT2Config",
    "KVCache",
    "apply_model",
    "config_from_hf",
    "generate",
    "generate_greedy",
    "init_cache",
    "left_pad",
    "load_hf_weights",
    "stack_layers",
    "torch_module_name",
    "torch_param_name",
    "unstack_layers",
]
