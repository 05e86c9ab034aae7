"""The Llama SFT example in --quick mode, offline, and its PEFT adapter loaded in PyTorch with equal logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED_DATA, load_example, require_data

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.mark.slow
def test_quick_offline_run_exports_a_peft_adapter_that_torch_reproduces(tmp_path):
    example = load_example("llama_sft")
    data = require_data(SHARED_DATA / "sms_spam" / "SMSSpamCollection", "SMS Spam Collection")
    bpe = require_data(SHARED_DATA / "gpt2_bpe", "GPT-2 BPE files")
    out = tmp_path / "run"
    metrics = example.main(["--quick", "--data-dir", str(data), "--bpe-dir", str(bpe), "--out", str(out)])

    assert metrics["after"]["answer_loss"] < metrics["before"]["answer_loss"]
    assert set(metrics["after"]["exact_match"]) == {"spam", "first_word"}
    written = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == str(out / "base") and written["task_type"] == "CAUSAL_LM"
    assert sorted({m.rsplit(".", 1)[-1] for m in written["target_modules"]}) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    base = transformers.AutoModelForCausalLM.from_pretrained(out / "base", attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    probe = np.load(out / "probe.npz")
    with torch.no_grad():
        got = model(input_ids=torch.tensor(probe["ids"], dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, probe["logits"], atol=1e-4, rtol=0)
    with model.disable_adapter(), torch.no_grad():
        plain = model(input_ids=torch.tensor(probe["ids"], dtype=torch.long)).logits.numpy()
    assert not np.allclose(plain, probe["logits"], atol=1e-3), "the adapter changed nothing"


def test_missing_model_offline_names_the_fix(tmp_path):
    example = load_example("llama_sft")
    data = require_data(SHARED_DATA / "sms_spam" / "SMSSpamCollection", "SMS Spam Collection")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        example.main(["--model", str(tmp_path / "absent"), "--data-dir", str(data), "--out", str(tmp_path / "o")])


def test_offline_without_data_gives_one_line_per_missing_thing(tmp_path, offline, capsys):
    example = load_example("llama_sft")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--out", str(out)])
    lines = str(exit_info.value).splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines), lines
    assert "GPT-2's BPE tokenizer" in lines[0] and "--bpe-dir" in lines[0]
    assert "the SMS Spam Collection" in lines[1] and "--data-dir" in lines[1]
    assert not out.exists()  # nothing is started before the inputs are all there


@pytest.mark.slow
def test_quick_with_nothing_at_hand_runs_offline_on_byte_tokens_and_synthetic_messages(tmp_path, offline, capsys):
    """No network, no ../shared, no flags: --quick trains and exports an adapter that PyTorch reproduces."""
    example = load_example("llama_sft")
    out = tmp_path / "run"
    metrics = example.main(["--quick", "--out", str(out)])
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--quick runs offline")]
    assert said == [
        "--quick runs offline: byte tokens (not GPT-2's BPE) and synthetic SMS; "
        "pass --bpe-dir and --data-dir for the real ones."
    ]
    assert metrics["after"]["answer_loss"] < metrics["before"]["answer_loss"]
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "base", attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    probe = np.load(out / "probe.npz")
    with torch.no_grad():
        got = model(input_ids=torch.tensor(probe["ids"], dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, probe["logits"], atol=1e-4, rtol=0)
