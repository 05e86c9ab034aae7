"""The GPT-2 spam example end to end in --quick mode: offline pretraining, and local Hugging Face weights."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO, SHARED_DATA, require_data, require_module

sys.path.insert(0, str(REPO / "examples"))
import gpt2_spam
import spam_data


@pytest.fixture
def data_args():
    return [
        "--data-dir", str(require_data(SHARED_DATA / "sms_spam" / "SMSSpamCollection", "SMS Spam Collection")),
        "--bpe-dir", str(require_data(SHARED_DATA / "gpt2_bpe", "GPT-2 BPE files")),
    ]  # fmt: skip


def _check_outputs(out, metrics):
    assert set(metrics["accuracy"]) == {"train", "validation", "test"}
    for name, acc in metrics["accuracy"].items():  # a share of the quick subset's messages (96 train, 32 others)
        size = 96 if name == "train" else 32
        assert 0.0 <= acc <= 1.0 and abs(acc * size - round(acc * size)) < 1e-6, (name, acc)
    assert metrics["reload_ok"] is True
    assert len(metrics["history"]["train_acc"]) == 1  # one epoch in --quick mode
    assert metrics["history"]["train_loss"], "no loss evaluation ran"
    for name in ("loss.png", "accuracy.png", "metrics.json", "lora_plan.txt"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "adapter").is_dir()
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]


@pytest.mark.slow
def test_quick_offline_pretrain(tmp_path, data_args, capsys):
    out = tmp_path / "run"
    metrics = gpt2_spam.main(["--quick", "--out", str(out), *data_args])
    _check_outputs(out, metrics)
    assert (out / "pretrain_loss.png").is_file() and (out / "pretrained" / "config.json").is_file()
    # Quick model: 2 blocks of width 32, rank 4 on c_attn (32->96), c_proj (32->32), c_fc (32->128),
    # mlp c_proj (128->32), plus the 32x2 head trained in full.
    assert metrics["trainable_params"] == 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32)) + 32 * 2
    printed = capsys.readouterr().out
    assert "published 2,666,528" in printed and "(equal to the published count)" in printed

    # The saved pretrained base is reused instead of pretraining again.
    again = gpt2_spam.main(["--quick", "--out", str(tmp_path / "again"), "--pretrained", str(out / "pretrained"),
                            *data_args])  # fmt: skip
    assert not (tmp_path / "again" / "pretrained").exists()
    assert again["model"] == metrics["model"]


@pytest.mark.slow
def test_quick_with_local_hugging_face_weights_on_the_reference_split(tmp_path):
    """--weights PATH instead of pretraining, on the published split's CSVs."""
    transformers = require_module("transformers")
    torch = require_module("torch")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=256)  # GPT-2's 50257 tokens
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "weights")
    out = tmp_path / "run"
    reference = require_data(SHARED_DATA / "sms_spam" / "reference_split", "reference split")
    bpe = require_data(SHARED_DATA / "gpt2_bpe", "GPT-2 BPE files")
    args = [
        "--quick",
        "--weights",
        str(tmp_path / "weights"),
        "--reference-split",
        str(reference),
        "--bpe-dir",
        str(bpe),
    ]
    metrics = gpt2_spam.main([*args, "--out", str(out)])
    _check_outputs(out, metrics)
    assert metrics["model"]["n_embd"] == 16 and not (out / "pretrained").exists()
    assert metrics["args"]["lr"] == 5e-5 and metrics["args"]["schedule"] == "constant"  # the recipe's settings


def test_missing_weights_offline_names_the_flags(tmp_path, data_args):
    with pytest.raises(gpt2_spam.MissingInputs, match=r"absent does not exist.*--weights PATH.*--offline-pretrain"):
        gpt2_spam.main(["--weights", str(tmp_path / "absent"), "--out", str(tmp_path / "run"), *data_args])
    assert not (tmp_path / "run").exists()  # nothing is started before the inputs are all there


def test_offline_without_data_gives_one_line_per_missing_thing(tmp_path, offline, capsys):
    out = tmp_path / "run"
    assert gpt2_spam.cli(["--offline-pretrain", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines), captured.err
    tokenizer, data = lines
    assert "GPT-2's BPE tokenizer" in tokenizer and "offline" in tokenizer and "--bpe-dir" in tokenizer
    assert "SMS Spam Collection" in data and "127.0.0.1" in data and "--data-dir" in data
    assert "archive.ics.uci.edu" in data  # where to get it
    assert "Traceback" not in captured.out + captured.err and not out.exists()

    # Asking for the published weights adds a third line, for them.
    assert gpt2_spam.cli(["--weights", "gpt2", "--out", str(out)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and lines[2].startswith("error: GPT-2 weights: could not get openai-community/gpt2")
    assert "offline" in lines[2] and "--offline-pretrain" in lines[2]


def test_weights_aliases_name_openai_community_repos(monkeypatch, tmp_path):
    asked = []
    monkeypatch.setattr(gpt2_spam, "fetch_hub_weights", lambda repo_id: asked.append(repo_id) or tmp_path)
    assert gpt2_spam.resolve_weights("gpt2") == str(tmp_path)
    gpt2_spam.resolve_weights("gpt2-medium")
    gpt2_spam.resolve_weights("someone/tiny-gpt2")
    assert asked == ["openai-community/gpt2", "openai-community/gpt2-medium", "someone/tiny-gpt2"]
    assert gpt2_spam.resolve_weights(str(tmp_path)) == str(tmp_path)  # a local path is used as it is
    with pytest.raises(spam_data.Unavailable, match="does not exist"):
        gpt2_spam.resolve_weights(str(tmp_path / "absent.safetensors"))


def test_weights_without_config_json_must_match_a_preset(tmp_path):
    transformers = require_module("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50257, n_positions=8)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match=r"width 16, 1 layers.*put the model's config\.json next to it"):
        gpt2_spam.load_pretrained_weights(str(tmp_path))


@pytest.mark.slow
def test_quick_with_scanned_blocks_trains_one_adapter_per_layer(tmp_path, data_args):
    out = tmp_path / "run"
    metrics = gpt2_spam.main(["--quick", "--scan-layers", "--out", str(out), *data_args])
    _check_outputs(out, metrics)
    assert metrics["model"]["scan_layers"] is True and metrics["timings"]["compile_s"] > 0
    # the same count as unscanned: per-layer adapters, 2 layers x rank 4 on the four block linears, plus the head
    assert metrics["trainable_params"] == 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32)) + 32 * 2
    assert "(2, 32, 4)" in (out / "lora_plan.txt").read_text()  # A of c_attn: (n_layer, in, r)


@pytest.mark.slow
def test_quick_with_nothing_at_hand_runs_offline_on_byte_tokens_and_synthetic_messages(tmp_path, offline, capsys):
    """No network, no ../shared, no flags: --quick still runs end to end, and says in one line what it used."""
    out = tmp_path / "run"
    metrics = gpt2_spam.main(["--quick", "--out", str(out)])
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--quick runs offline")]
    assert said == [
        "--quick runs offline: byte tokens (not GPT-2's BPE) and synthetic SMS; "
        "pass --bpe-dir and --data-dir for the real ones."
    ]
    assert metrics["model"]["vocab_size"] == spam_data.ByteEncoding.n_vocab  # 257: bytes and <|endoftext|>
    _check_outputs(out, metrics)
