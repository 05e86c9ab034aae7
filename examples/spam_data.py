"""SMS Spam Collection for the GPT-2 spam classifier: download, balance, split, tokenize, pad.

Follows the published recipe (Raschka, "Build a Large Language Model From Scratch", ch. 6): keep all 747 spam
messages and a seeded random 747 of the 4827 ham ones, shuffle, split 70/10/20 (1045 / 149 / 300), encode with
GPT-2's BPE, pad every sequence with <|endoftext|> (50256) to the longest *training* sequence and truncate
validation and test to that length. ``lengths`` records the real tokens per row, so the classifier can read the
last real token instead of padding. ``read_reference_split`` loads the exact published split instead.

Online, both are fetched once: tiktoken downloads GPT-2's BPE (and checks its sha256 itself), and the SMS Spam
Collection is downloaded from UCI (or the book's mirror) and checked against a pinned sha256. Offline use:
``TIKTOKEN_CACHE_DIR`` (tiktoken's own cache) or ``gpt2_encoding(bpe_dir)`` with GPT-2's ``encoder.json`` +
``vocab.bpe``; a local ``SMSSpamCollection`` file or directory for the data. ``../shared/data`` beside the
checkout is used when it holds them. What cannot be had raises ``Unavailable``, a one-line reason and fix.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tiktoken

PAD_TOKEN_ID = 50256  # <|endoftext|>, GPT-2's only special token
LABELS = {"ham": 0, "spam": 1}
DATA_URLS = (
    "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
    "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip",  # the book's mirror
)
DATA_PAGE = "https://archive.ics.uci.edu/dataset/228/sms+spam+collection"  # where a user gets it by hand
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxlora" / "sms_spam"
FILE_NAME = "SMSSpamCollection"
FILE_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"  # SMSSpamCollection of v.1
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # ../shared/data beside the checkout
BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"  # encoder.json, vocab.bpe
DOWNLOAD_TIMEOUT = 30.0
SPLITS = ("train", "validation", "test")

Example = tuple[int, str]  # (label, text): ham 0, spam 1


class Unavailable(RuntimeError):
    """Something the example needs cannot be had here; the message is one line: what, why, and how to get it."""


def _short(err: BaseException) -> str:
    """An exception in a few words, on one line (network errors carry pages of nested reasons)."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    if "Failed to resolve" in text or "Name or service not known" in text or "getaddrinfo" in text:
        return "offline: the host name cannot be resolved"
    return text if len(text) <= 140 else text[:137] + "..."


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


def _data_gym_byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character stand-ins for raw bytes, as used in encoder.json and vocab.bpe."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    decoder = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            decoder[chr(256 + extra)] = b
            extra += 1
    return decoder


def encoding_from_files(encoder_json: str | Path, vocab_bpe: str | Path) -> tiktoken.Encoding:
    """GPT-2's tiktoken encoding built from OpenAI's ``encoder.json`` and ``vocab.bpe`` (no network, no cache)."""
    byte_of = _data_gym_byte_decoder()

    def to_bytes(token: str) -> bytes:
        return bytes(byte_of[ch] for ch in token)

    try:
        encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        merges = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")[1:-1]
    except (OSError, ValueError) as err:
        raise ValueError(f"Could not read GPT-2 BPE files {encoder_json} / {vocab_bpe}: {err}") from err
    ranks = {to_bytes(token): rank for token, rank in encoder.items() if token != "<|endoftext|>"}
    # tiktoken merges by rank, so the ranks must follow vocab.bpe's merge order: check as tiktoken itself does.
    # Single bytes come first, printable ones in byte order then the rest (the order byte_of was built in).
    expected = {bytes([b]): rank for rank, b in enumerate(byte_of.values())}
    for rank, merge in enumerate(merges, start=len(expected)):
        first, second = merge.split()
        expected[to_bytes(first) + to_bytes(second)] = rank
    if expected != ranks:
        raise ValueError(f"{encoder_json} and {vocab_bpe} disagree: they are not GPT-2's matching BPE files.")
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": PAD_TOKEN_ID},
        explicit_n_vocab=50257,
    )


def gpt2_encoding(bpe_dir: str | Path | None = None) -> tiktoken.Encoding:
    """GPT-2's BPE: from ``bpe_dir/{encoder.json,vocab.bpe}`` if given, else ``tiktoken.get_encoding("gpt2")``.

    ``../shared/data/gpt2_bpe`` beside the checkout stands in for ``bpe_dir`` when present. tiktoken downloads
    once (checking the files' sha256) or reads ``TIKTOKEN_CACHE_DIR``; when it cannot, ``Unavailable`` is raised.
    """
    if bpe_dir is None and (SHARED_DATA / "gpt2_bpe" / "vocab.bpe").is_file():
        bpe_dir = SHARED_DATA / "gpt2_bpe"  # no network needed; the same encoding (a test compares them)
    if bpe_dir is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as err:  # no network and no cache
            raise Unavailable(
                f"GPT-2's BPE tokenizer: tiktoken could not download it ({_short(err)}) and it is not in "
                f"tiktoken's cache; get encoder.json and vocab.bpe from {BPE_URL} and pass their folder "
                "as --bpe-dir (or set TIKTOKEN_CACHE_DIR to a tiktoken cache holding them)"
            ) from err
    bpe_dir = Path(bpe_dir)
    files = [bpe_dir / "encoder.json", bpe_dir / "vocab.bpe"]
    if not all(f.is_file() for f in files):
        raise Unavailable(
            f"GPT-2's BPE tokenizer: {bpe_dir} must hold GPT-2's encoder.json and vocab.bpe (from {BPE_URL})"
        )
    return encoding_from_files(*files)


# --------------------------------------------------------------------------------------------------------------
# Raw data
# --------------------------------------------------------------------------------------------------------------


def _download(destination: Path, urls: Sequence[str] | None = None, sha256: str | None = None) -> None:
    """The collection's zip from the first of `urls` that answers; its SMSSpamCollection must match `sha256`."""
    urls, sha256 = DATA_URLS if urls is None else urls, FILE_SHA256 if sha256 is None else sha256
    errors = []
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
                archive = zipfile.ZipFile(io.BytesIO(response.read()))
            content = archive.read(FILE_NAME)
            if hashlib.sha256(content).hexdigest() != sha256:
                raise ValueError(f"its {FILE_NAME} differs from the pinned sha256 (a corrupt or different file)")
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
            errors.append(f"{urllib.parse.urlsplit(url).netloc}: {_short(err)}")
            continue
        destination.parent.mkdir(parents=True, exist_ok=True)
        tmp = destination.with_suffix(".tmp")
        tmp.write_bytes(content)
        tmp.replace(destination)
        return
    raise Unavailable(
        f"the SMS Spam Collection: could not download it ({'; '.join(errors)}); download it from {DATA_PAGE}, "
        f"unzip it and pass the {FILE_NAME} file or its folder as --data-dir"
    )


def sms_spam_file(data_dir: str | Path | None = None, download: bool = True) -> Path:
    """Path of ``SMSSpamCollection``: ``data_dir`` (the file or its folder), else ``../shared/data/sms_spam``
    beside the checkout, else the cache, downloading it there if needed."""
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        path = path / FILE_NAME if path.is_dir() else path
        if not path.is_file():
            raise Unavailable(
                f"the SMS Spam Collection: no {FILE_NAME} at {path}; point --data-dir at the unzipped UCI file or "
                f"its folder (from {DATA_PAGE}), or leave --data-dir out to download it"
            )
        return path
    if (SHARED_DATA / "sms_spam" / FILE_NAME).is_file():
        return SHARED_DATA / "sms_spam" / FILE_NAME
    path = DEFAULT_CACHE / FILE_NAME
    if not path.is_file():
        if not download:
            raise Unavailable(f"the SMS Spam Collection: {path} does not exist and downloading is off")
        _download(path)
    return path


def read_sms_spam(path: str | Path) -> list[Example]:
    """All messages of the UCI file (one ``label<TAB>text`` per line) as ``(label, text)``, label ham 0 / spam 1."""
    examples = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        label, sep, text = line.partition("\t")
        if not sep or label not in LABELS:
            raise ValueError(f"{path}:{number}: expected 'ham<TAB>text' or 'spam<TAB>text', got {line[:60]!r}")
        examples.append((LABELS[label], text))
    return examples


def balance(examples: Sequence[Example], seed: int = 123) -> list[Example]:
    """All spam plus an equal-sized random (seeded) subset of ham, in file order."""
    spam = [i for i, (label, _) in enumerate(examples) if label == 1]
    ham = [i for i, (label, _) in enumerate(examples) if label == 0]
    if len(ham) < len(spam):
        raise ValueError(f"Cannot balance: {len(ham)} ham < {len(spam)} spam.")
    keep = set(spam) | set(np.random.default_rng(seed).choice(ham, size=len(spam), replace=False).tolist())
    return [examples[i] for i in sorted(keep)]


def random_split(
    examples: Sequence[Example], fractions: tuple[float, float] = (0.7, 0.1), seed: int = 123
) -> dict[str, list[Example]]:
    """Shuffle (seeded) and cut into train / validation / test; test takes the remainder (0.7/0.1/0.2)."""
    order = np.random.default_rng(seed).permutation(len(examples))
    shuffled = [examples[i] for i in order]
    train_end = int(len(examples) * fractions[0])
    val_end = train_end + int(len(examples) * fractions[1])
    return {"train": shuffled[:train_end], "validation": shuffled[train_end:val_end], "test": shuffled[val_end:]}


def read_reference_split(directory: str | Path) -> dict[str, list[Example]]:
    """The published split: ``{train,validation,test}.csv`` with columns ``Label,Text`` (ham 0, spam 1)."""
    splits = {}
    for name in SPLITS:
        path = Path(directory) / f"{name}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"Reference split file {path} is missing (expected {', '.join(SPLITS)} .csv).")
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"Label", "Text"} <= set(reader.fieldnames):
                raise ValueError(f"{path} must have columns Label,Text; found {reader.fieldnames}.")
            splits[name] = [(int(row["Label"]), row["Text"]) for row in reader]
    return splits


def load_splits(
    data_dir: str | Path | None = None, reference_dir: str | Path | None = None, seed: int = 123
) -> dict[str, list[Example]]:
    """The exact published split when ``reference_dir`` is given, else balance and split the raw collection."""
    if reference_dir is not None:
        return read_reference_split(reference_dir)
    return random_split(balance(read_sms_spam(sms_spam_file(data_dir)), seed), seed=seed)


# --------------------------------------------------------------------------------------------------------------
# Offline stand-ins: synthetic messages and byte tokens (the examples' --quick runs, with no data at hand)
# --------------------------------------------------------------------------------------------------------------

_SPAM = (
    "WINNER! You have won a {prize}. Call {phone} now to claim. T&C apply",
    "FREE entry to win a {prize}! Text WIN to {code} now",
    "URGENT: your mobile number has been awarded a {prize}. Call {phone}",
    "Congratulations! Claim your {prize} today, reply YES to {code}",
)
_HAM = (
    "Hey, are we still meeting at {place} {when}?",
    "I'll be home {when}, can you get some {food}?",
    "Sorry I missed your call, talk {when}",
    "Thanks for the {food}, see you at {place}",
)
_FILL = {
    "prize": ["cash prize", "holiday", "new phone", "1000 pound voucher"],
    "phone": ["09061701461", "08000930705", "09050002311"],
    "code": ["87121", "80086", "69669"],
    "place": ["the station", "the pub", "work", "mum's"],
    "when": ["tonight", "later", "tomorrow", "at 6"],
    "food": ["bread", "milk", "pizza", "cake"],
}


def synthetic_sms(n: int, rng: np.random.Generator) -> list[tuple[int, str]]:
    """n (label, text) messages from the templates above, half spam (1), half ham (0)."""
    out = []
    for i in range(n):
        label = i % 2
        template = str(rng.choice(_SPAM if label else _HAM))
        out.append((label, template.format(**{k: str(rng.choice(v)) for k, v in _FILL.items()})))
    return out


class ByteEncoding:
    """UTF-8 bytes as token ids 0..255 and <|endoftext|> 256: tiktoken's interface, a 257-token vocabulary.

    Needs no file and no network, and gives a small model a cheap softmax: the examples' --quick runs use it
    when GPT-2's BPE is not asked for.
    """

    name = "bytes"
    eot_token = 256
    n_vocab = 257

    def encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def synthetic_splits(n: int = 600, seed: int = 123) -> dict[str, list[Example]]:
    """n synthetic messages (half spam), shuffled and split 70/10/20 like the collection."""
    return random_split(synthetic_sms(n, np.random.default_rng(seed)), seed=seed)


# --------------------------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EncodedSplit:
    """Token ids (n, length) right-padded with 50256, real tokens per row, and labels."""

    ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def encode(encoding: tiktoken.Encoding, examples: Sequence[Example], max_length: int | None = None) -> EncodedSplit:
    """Encode texts, truncate to ``max_length`` (default: the longest) and right-pad with <|endoftext|> (50256)."""
    tokens = [encoding.encode_ordinary(text) for _, text in examples]
    pad = getattr(encoding, "eot_token", PAD_TOKEN_ID)  # 50256 for GPT-2's BPE; 256 for ByteEncoding
    if any(len(t) == 0 for t in tokens):
        raise ValueError("An empty message encodes to no tokens; drop it before encoding.")
    max_length = max_length or max(len(t) for t in tokens)
    ids = np.full((len(tokens), max_length), pad, np.int32)
    lengths = np.zeros(len(tokens), np.int32)
    for row, t in enumerate(tokens):
        t = t[:max_length]
        ids[row, : len(t)] = t
        lengths[row] = len(t)
    return EncodedSplit(ids, lengths, np.array([label for label, _ in examples], np.int32))


def encode_splits(encoding: tiktoken.Encoding, splits: dict[str, list[Example]]) -> dict[str, EncodedSplit]:
    """Pad all splits to the longest training sequence; longer validation/test messages are truncated."""
    train = encode(encoding, splits["train"])
    width = train.ids.shape[1]
    return {name: train if name == "train" else encode(encoding, examples, width) for name, examples in splits.items()}
