"""The continuous-batching example: requests over time on a Llama with several adapters, each request's tokens
equal to running it alone with its adapter merged; also on a Hugging Face checkpoint with PEFT adapter folders."""

from __future__ import annotations

import json

import pytest
from conftest import load_example

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def example():
    return load_example("serve")


def test_quick_serves_every_request_as_it_would_run_alone(example, tmp_path):
    metrics = example.main(["--quick", "--out", str(tmp_path)])
    assert metrics["equal_alone"] is True and len(metrics["checked"]) == 4
    assert metrics["compilations"]["step"] == 1 and 1 <= metrics["compilations"]["insert"] <= 3  # batches of 1, 2, 4
    assert json.loads((tmp_path / "metrics.json").read_text())["requests"] == 10
    rows = metrics["per_request"]
    assert all(r["arrival"] <= r["admitted"] <= r["finished"] for r in rows)
    assert {r["adapter"] for r in rows} == {None, "task0", "task1", "task2", "task3"}


def test_a_hugging_face_checkpoint_and_peft_adapter_folders(example, tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    base = transformers.LlamaForCausalLM(config)
    base.save_pretrained(tmp_path / "base")
    targets = ["q_proj", "v_proj", "down_proj"]
    for name, rank in (("one", 2), ("two", 4)):
        lora = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
        peft.get_peft_model(transformers.LlamaForCausalLM(config), lora).save_pretrained(tmp_path / name)
    argv = ["--quick", "--base", str(tmp_path / "base"), "--adapter", f"one={tmp_path / 'one'}",
            "--adapter", f"two={tmp_path / 'two'}", "--out", str(tmp_path / "out")]  # fmt: skip
    metrics = example.main(argv)
    assert metrics["equal_alone"] is True
    assert {r["adapter"] for r in metrics["per_request"]} == {None, "one", "two"}
    with pytest.raises(SystemExit, match="write NAME=DIR"):
        example.main(["--quick", "--adapter", str(tmp_path / "one"), "--out", str(tmp_path / "out")])
