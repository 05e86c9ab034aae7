"""The torch side of the zoo's PEFT tests, run in the main environment (torch, transformers, peft), which .venv-zoo
lacks: `run_torch(job)` (called from a zoo test) runs this file as a script there with `job`, a dict:

- ``family`` ("qwen3", "llama", "gemma3"), ``config`` (the transformers config's keyword arguments), ``seed``;
- ``checkpoint``: a directory; the tiny model is built from config and seed and saved there (safetensors) when it
  holds none yet, else loaded from it;
- ``tokens``: an .npy of token ids;
- ``make_adapter`` (optional): ``{"dir", "peft", "seed"}``: a torch-peft LoRA adapter with ``peft.LoraConfig(
  **peft)`` on the model, every A and B random (PEFT's own init leaves B zero), saved to ``dir``;
- ``logits``: ``[{"adapter": a directory or None, "out": an .npy}]``: the model's logits (with that adapter loaded
  by ``PeftModel.from_pretrained``) written there; runs after make_adapter.

The interpreter is $JAXLORA_TORCH_PYTHON, else ``<repo>/.venv/bin/python`` (which ``scripts/test.sh --all`` creates
before it runs the zoo tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def torch_python() -> Path:
    """The main environment's interpreter (it has torch); AssertionError naming the fix if there is none."""
    python = Path(os.environ.get("JAXLORA_TORCH_PYTHON") or REPO / ".venv" / "bin" / "python")
    assert python.exists(), (
        f"the zoo's PEFT tests run torch in the main environment, and {python} does not exist: run "
        "`bash scripts/setup.sh test` (scripts/test.sh --all does), or set JAXLORA_TORCH_PYTHON to a python with "
        "torch, transformers and peft"
    )
    return python


def run_torch(job: dict) -> None:
    """Runs `job` (see the module docstring) in the main environment; AssertionError with its output on failure."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONPATH"] = str(REPO)  # this checkout's tests, whatever jaxlora the environment has installed
    done = subprocess.run(
        [str(torch_python()), __file__, json.dumps(job)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, f"the torch side failed:\n{done.stdout}\n{done.stderr}"


def logits_both_ways(tmp_path: Path, family: str, config: dict, torch_lora: dict, adapter_seed: int) -> tuple:
    """(base, with jaxlora's adapter, with a torch-made adapter) logits of the Hugging Face model `family` built by
    `config` (seed 0, saved to tmp_path/"hf"), on tmp_path/"tokens.npy"; jaxlora's adapter is read from
    tmp_path/"from_jax", torch's (peft `torch_lora`, `adapter_seed`) written to tmp_path/"from_torch"."""
    run_torch({
        "family": family, "config": config, "seed": 0, "checkpoint": str(tmp_path / "hf"),
        "tokens": str(tmp_path / "tokens.npy"),
        "make_adapter": {"dir": str(tmp_path / "from_torch"), "peft": torch_lora, "seed": adapter_seed},
        "logits": [
            {"adapter": None, "out": str(tmp_path / "base.npy")},
            {"adapter": str(tmp_path / "from_jax"), "out": str(tmp_path / "jax_adapter.npy")},
            {"adapter": str(tmp_path / "from_torch"), "out": str(tmp_path / "torch_adapter.npy")},
        ],
    })  # fmt: skip
    return tuple(np.load(tmp_path / f"{n}.npy") for n in ("base", "jax_adapter", "torch_adapter"))


def _model(family: str, config: dict, seed: int, checkpoint: Path):
    import torch
    import transformers

    classes = {
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }
    config_class, model_class = classes[family]
    if not (checkpoint / "config.json").exists():
        torch.manual_seed(seed)
        model = model_class(config_class(**config, attn_implementation="eager"))
        model.save_pretrained(checkpoint)  # safetensors
    return model_class.from_pretrained(checkpoint, attn_implementation="eager", dtype=torch.float32).eval()


def _make_adapter(model, spec: dict) -> None:
    import peft
    import torch

    peft_model = peft.get_peft_model(model, peft.LoraConfig(**spec["peft"]))
    generator = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(spec["dir"])


def main(job: dict) -> None:
    import numpy as np
    import peft
    import torch

    def model():  # a fresh copy for each use: peft changes the model it wraps
        return _model(job["family"], job["config"], job["seed"], Path(job["checkpoint"]))

    tokens = torch.tensor(np.load(job["tokens"]))
    if "make_adapter" in job:
        _make_adapter(model(), job["make_adapter"])
    for request in job["logits"]:
        served = model() if request["adapter"] is None else peft.PeftModel.from_pretrained(model(), request["adapter"])
        with torch.no_grad():
            np.save(request["out"], served.eval()(input_ids=tokens).logits.numpy())


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
