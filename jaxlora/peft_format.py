"""Hugging Face PEFT's LoRA file format both ways: `save_peft` writes a directory that
`peft.PeftModel.from_pretrained` loads onto the PyTorch model, `load_peft` reads one (trained in PyTorch or here).

Named `peft_format`, not `peft`, so that it never shadows the `peft` package in a user's namespace."""

from jaxlora._src.peft_export import save_peft
from jaxlora._src.peft_import import load_peft
from jaxlora._src.peft_keys import CONFIG_NAME, PREFIX, WEIGHTS_NAME

__all__ = ["CONFIG_NAME", "PREFIX", "WEIGHTS_NAME", "load_peft", "save_peft"]
