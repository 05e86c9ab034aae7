"""SMS spam data pipeline: tokenizer from local files, balancing, splitting, padding, the reference split."""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SHARED_DATA, require_data

sys.path.insert(0, str(REPO / "examples"))
import spam_data

SMS = SHARED_DATA / "sms_spam"


@pytest.fixture(scope="module")
def encoding():
    """GPT-2 BPE built from the shared encoder.json + vocab.bpe (no network, no tiktoken cache)."""
    return spam_data.gpt2_encoding(require_data(SHARED_DATA / "gpt2_bpe", "GPT-2 BPE files"))


@pytest.fixture(scope="module")
def splits():
    return spam_data.load_splits(require_data(SMS / "SMSSpamCollection", "SMS Spam Collection"), seed=123)


def test_encoding_from_files_matches_tiktoken_cache(encoding, monkeypatch):
    import tiktoken

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(require_data(SHARED_DATA / "tiktoken_cache", "tiktoken cache")))
    reference = tiktoken.get_encoding("gpt2")
    text = "Hello world!! FREE entry 2 a wkly comp <|endoftext|> 08452810075over18's\n  ü€ 😀 tab\there"
    assert encoding.encode_ordinary(text) == reference.encode_ordinary(text)
    assert encoding.encode("a<|endoftext|>", allowed_special="all") == [64, 50256]
    assert encoding.n_vocab == 50257
    assert encoding.decode(encoding.encode_ordinary(text)) == text


def test_mismatched_bpe_files_are_rejected(tmp_path):
    bpe = require_data(SHARED_DATA / "gpt2_bpe", "GPT-2 BPE files")
    lines = (bpe / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    lines[1], lines[2] = lines[2], lines[1]  # swap two merges: ranks no longer follow merge order
    (tmp_path / "vocab.bpe").write_text("\n".join(lines), encoding="utf-8")
    (tmp_path / "encoder.json").write_bytes((bpe / "encoder.json").read_bytes())
    with pytest.raises(ValueError, match="disagree"):
        spam_data.gpt2_encoding(tmp_path)
    with pytest.raises(spam_data.Unavailable, match=r"nowhere must hold GPT-2's encoder\.json and vocab\.bpe"):
        spam_data.gpt2_encoding(tmp_path / "nowhere")


def test_read_counts_every_line():
    examples = spam_data.read_sms_spam(require_data(SMS / "SMSSpamCollection", "SMS Spam Collection"))
    labels = np.array([label for label, _ in examples])
    assert (len(examples), (labels == 0).sum(), (labels == 1).sum()) == (5574, 4827, 747)


def test_balance_and_split_sizes(splits):
    sizes = {name: len(examples) for name, examples in splits.items()}
    assert sizes == {"train": 1045, "validation": 149, "test": 300}
    everything = [e for examples in splits.values() for e in examples]
    labels = np.array([label for label, _ in everything])
    assert ((labels == 0).sum(), (labels == 1).sum()) == (747, 747)
    # The three splits partition the balanced set: nothing lost, nothing in two splits.
    balanced = spam_data.balance(spam_data.read_sms_spam(SMS / "SMSSpamCollection"), seed=123)
    assert sorted(everything) == sorted(balanced)


def test_split_is_seeded(splits):
    path = SMS / "SMSSpamCollection"
    assert spam_data.load_splits(path, seed=123) == splits
    other = spam_data.load_splits(path, seed=7)
    assert other["train"] != splits["train"]


def test_balance_rejects_too_little_ham():
    with pytest.raises(ValueError, match="Cannot balance"):
        spam_data.balance([(1, "a"), (1, "b"), (0, "c")])


def test_padding_truncation_and_lengths(encoding, splits):
    encoded = spam_data.encode_splits(encoding, splits)
    train = encoded["train"]
    width = train.ids.shape[1]
    assert width == max(len(encoding.encode_ordinary(text)) for _, text in splits["train"])
    assert {e.ids.shape[1] for e in encoded.values()} == {width}
    for split, examples in zip(encoded.values(), splits.values(), strict=True):
        assert split.ids.dtype == np.int32 and split.labels.tolist() == [label for label, _ in examples]
        for row in range(len(split)):
            n = split.lengths[row]
            tokens = encoding.encode_ordinary(examples[row][1])
            assert n == min(len(tokens), width)
            assert split.ids[row, :n].tolist() == tokens[:n]
            assert (split.ids[row, n:] == spam_data.PAD_TOKEN_ID).all()
    # The classifier reads ids[row, lengths - 1]: the last real token, never the padding.
    last = train.ids[np.arange(len(train)), train.lengths - 1]
    assert (last != spam_data.PAD_TOKEN_ID).all()


def test_long_messages_are_truncated(encoding):
    examples = [(0, "short"), (1, "a much longer message that will not fit in the training width")]
    split = spam_data.encode(encoding, examples, max_length=4)
    assert split.ids.shape == (2, 4)
    assert split.lengths.tolist() == [1, 4]
    assert split.ids[1].tolist() == encoding.encode_ordinary(examples[1][1])[:4]


def test_reference_split(encoding):
    directory = require_data(SMS / "reference_split", "reference split")
    splits = spam_data.load_splits(reference_dir=directory)
    assert {name: len(examples) for name, examples in splits.items()} == {"train": 1045, "validation": 149, "test": 300}
    assert splits["train"][0] == (0, "Dude how do you like the buff wind.")
    assert sum(label for examples in splits.values() for label, _ in examples) == 747
    assert spam_data.encode_splits(encoding, splits)["train"].ids.shape == (1045, 120)


def test_bad_inputs_name_the_fix(tmp_path):
    (tmp_path / "SMSSpamCollection").write_text("ham\tfine\nspma\ttypo\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"SMSSpamCollection:2"):
        spam_data.read_sms_spam(tmp_path / "SMSSpamCollection")
    with pytest.raises(spam_data.Unavailable, match=r"no SMSSpamCollection at .*missing.*--data-dir"):
        spam_data.sms_spam_file(tmp_path / "missing")
    (tmp_path / "train.csv").write_text("label,text\n0,hi\n", encoding="utf-8")
    (tmp_path / "validation.csv").write_text("Label,Text\n", encoding="utf-8")
    (tmp_path / "test.csv").write_text("Label,Text\n", encoding="utf-8")
    with pytest.raises(ValueError, match="Label,Text"):
        spam_data.read_reference_split(tmp_path)


def _zipped(content: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme", "the SMS Spam Collection v.1")
        archive.writestr(spam_data.FILE_NAME, content)
    return buffer.getvalue()


def test_download_checks_the_pinned_checksum(tmp_path, local_server, closed_port_url):
    """The real collection, zipped as UCI serves it, from a local server after an unreachable mirror."""
    real = require_data(SMS / "SMSSpamCollection", "SMS Spam Collection").read_bytes()
    served, url = local_server
    (served / "good.zip").write_bytes(_zipped(real))
    (served / "bad.zip").write_bytes(_zipped(real.replace(b"ham\t", b"spam\t", 1)))
    target = tmp_path / "cache" / "SMSSpamCollection"
    spam_data._download(target, urls=[closed_port_url + "x.zip", url + "bad.zip", url + "good.zip"])
    assert target.read_bytes() == real
    with pytest.raises(spam_data.Unavailable) as info:
        spam_data._download(tmp_path / "other" / "SMSSpamCollection", urls=[url + "bad.zip", url + "absent.zip"])
    message = str(info.value)
    assert "\n" not in message and "differs from the pinned sha256" in message and "HTTPError" in message
    assert "--data-dir" in message and spam_data.DATA_PAGE in message
    assert not (tmp_path / "other").exists()


def test_offline_tokenizer_is_one_line_with_the_fix(monkeypatch, tmp_path):
    """tiktoken offline (its download refused, no cache) and no shared copy: one line naming --bpe-dir."""
    import requests
    import tiktoken.load

    def refused(*args, **kwargs):
        raise requests.exceptions.ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken.load, "read_file", refused)  # the download; the cache below is empty
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(spam_data, "SHARED_DATA", Path("/nonexistent"))
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # no encoding built earlier in this process
    with pytest.raises(spam_data.Unavailable) as info:
        spam_data.gpt2_encoding()
    message = str(info.value)
    assert "\n" not in message and "offline" in message and "--bpe-dir" in message and spam_data.BPE_URL in message


def test_byte_encoding_round_trips_and_pads_with_its_own_end_of_text():
    encoding = spam_data.ByteEncoding()
    text = "Free entry: £100!"
    assert encoding.decode(encoding.encode_ordinary(text)) == text
    assert list(b"Hi") == encoding.encode_ordinary("Hi")
    split = spam_data.encode(encoding, [(0, "Hi"), (1, "Hello")])
    assert split.ids.tolist() == [[72, 105, 256, 256, 256], list(b"Hello")]  # 256, inside the 257-token vocabulary
    assert split.lengths.tolist() == [2, 5]


def test_synthetic_splits_are_balanced_seeded_and_split_like_the_collection():
    splits = spam_data.synthetic_splits(600, seed=1)
    assert {name: len(rows) for name, rows in splits.items()} == {"train": 420, "validation": 60, "test": 120}
    every = [row for rows in splits.values() for row in rows]
    assert sum(label for label, _ in every) == 300 and all(text for _, text in every)
    assert spam_data.synthetic_splits(600, seed=1) == splits != spam_data.synthetic_splits(600, seed=2)
