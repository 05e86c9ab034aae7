"""MNIST as normalised numpy arrays, read with `tfds.data_source` (array_record: no TensorFlow needed).

When no prepared copy is at hand, the four raw MNIST files are downloaded (or taken from a folder), checked
against pinned sha256 sums and prepared with tfds' own MNIST builder into the same array_record files that
tfds would write, without TensorFlow (numpy reads the raw files, Pillow encodes the PNGs tfds stores).

When MNIST cannot be had (offline, no local copy), scikit-learn's bundled 8x8 digits tell the same
story at a smaller scale. Every array is built in one go; the training loop never touches Python
objects per example.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from progress import Progress, track

MNIST_MEAN = 0.1307  # mean and std of the MNIST training pixels in [0, 1], the customary normalisation
MNIST_STD = 0.3081
SHARED_TFDS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tfds"
READ_CHUNK = 5000  # examples decoded per tfds call (one progress-bar tick)

RAW_URLS = (  # where the four raw MNIST files are downloaded from, in order (tfds' own source first)
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
)
RAW_FILES = {  # name: (bytes, sha256), as pinned by tensorflow-datasets (url_checksums/mnist.txt)
    "train-images-idx3-ubyte.gz": (9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    "train-labels-idx1-ubyte.gz": (28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    "t10k-images-idx3-ubyte.gz": (1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    "t10k-labels-idx1-ubyte.gz": (4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
}
SPLIT_FILES = {  # split: (images file, labels file)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
DOWNLOAD_TIMEOUT = 30.0  # seconds without an answer before a mirror counts as unreachable

HOW_TO_GET_MNIST = (
    "To get MNIST: run once with internet (the four raw files, 11.6 MB, are downloaded, checksum-verified and "
    "prepared in tfds' array_record format, no TensorFlow needed), or pass --mnist-raw-dir with the four raw "
    ".gz files, or point --data-dir / TFDS_DATA_DIR at a folder holding mnist/3.0.1 in array_record format"
)


class DataUnavailable(RuntimeError):
    """MNIST is neither on disk nor obtainable here; `reason` says why, the message also how to get it."""

    def __init__(self, reason: str):
        super().__init__(f"{reason}. {HOW_TO_GET_MNIST}.")
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Split:
    """Images flattened to (n, height*width) float32, normalised; labels (n,) int32."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train and a test split of one image-classification data set, with where it came from."""

    name: str
    source: str
    image_shape: tuple[int, int]
    num_classes: int
    mean: float
    std: float
    train: Split
    test: Split


def default_data_dir() -> str | None:
    """TFDS_DATA_DIR if set, else ../shared/data/tfds beside the repo when it holds MNIST, else tfds' default."""
    if os.environ.get("TFDS_DATA_DIR"):
        return os.environ["TFDS_DATA_DIR"]
    if (SHARED_TFDS_DIR / "mnist").is_dir():
        return str(SHARED_TFDS_DIR)
    return None


def normalise(images: np.ndarray, mean: float = MNIST_MEAN, std: float = MNIST_STD, scale: float = 255.0) -> np.ndarray:
    """(n, h, w[, 1]) integer pixels in [0, scale] -> (n, h*w) float32 `(x/scale - mean)/std`, vectorised."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3:
        raise ValueError(f"expected images of shape (n, height, width) or (n, height, width, 1), got {images.shape}")
    flat = images.reshape(len(images), -1).astype(np.float32)
    # in place, the same float32 operations in the same order: no 188 MB temporaries to fault in for MNIST's train
    flat /= np.float32(scale)
    flat -= np.float32(mean)
    flat /= np.float32(std)
    return flat


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Silences tfds' one-off absl warnings (e.g. "OpenCV is not installed") for the story's sake."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _open_source(split: str, data_dir: str | None):
    import tensorflow_datasets as tfds

    return tfds.data_source("mnist", split=split, data_dir=data_dir, download=False)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _matches(path: Path, size: int, sha256: str) -> bool:
    return path.is_file() and path.stat().st_size == size and _sha256(path) == sha256


def check_raw_files(raw_dir: str | os.PathLike, files: dict[str, tuple[int, str]] | None = None) -> Path:
    """`raw_dir` when it holds every raw MNIST file with the pinned size and sha256; DataUnavailable otherwise."""
    files = RAW_FILES if files is None else files
    raw_dir = Path(raw_dir).expanduser()
    missing = [name for name in files if not (raw_dir / name).is_file()]
    if missing:
        raise DataUnavailable(f"{raw_dir} lacks the raw MNIST file(s) {', '.join(missing)}")
    wrong = [name for name, (size, sha) in files.items() if not _matches(raw_dir / name, size, sha)]
    if wrong:
        raise DataUnavailable(f"{', '.join(wrong)} in {raw_dir} fail(s) the checksum (a corrupt or different file)")
    return raw_dir


def _fetch(url: str, destination: Path, size: int, sha256: str, timeout: float) -> None:
    """Downloads `url` to `destination` through a .part file, showing progress; checks size and sha256."""
    partial = destination.with_name(destination.name + ".part")
    with (
        urllib.request.urlopen(url, timeout=timeout) as response,
        partial.open("wb") as out,
        Progress(size, f"   downloading {destination.name}", "B") as bar,
    ):
        for block in iter(lambda: response.read(1 << 16), b""):
            out.write(block)
            bar.update(len(block))
    if not _matches(partial, size, sha256):
        partial.unlink()
        raise ValueError(f"{url} gave a file whose size or sha256 differs from the pinned one")
    partial.replace(destination)


def download_raw_files(
    raw_dir: str | os.PathLike,
    urls: tuple[str, ...] | None = None,
    files: dict[str, tuple[int, str]] | None = None,
    timeout: float = DOWNLOAD_TIMEOUT,
) -> Path:
    """The four raw MNIST files in `raw_dir`, downloaded (mirror by mirror) unless already there and verified.

    `urls` (default RAW_URLS) are base URLs tried in order; `files` (default RAW_FILES) the pinned sizes and sums.
    """
    urls, files = RAW_URLS if urls is None else urls, RAW_FILES if files is None else files
    raw_dir = Path(raw_dir).expanduser()
    raw_dir.mkdir(parents=True, exist_ok=True)
    for name, (size, sha256) in files.items():
        target = raw_dir / name
        if _matches(target, size, sha256):
            continue
        errors: list[tuple[str, BaseException]] = []
        for base in urls:
            try:
                _fetch(base + name, target, size, sha256, timeout)
                break
            except (OSError, ValueError) as err:  # URLError, timeouts and refused connections are OSErrors
                errors.append((urllib.parse.urlsplit(base).netloc, err))
        else:
            offline = all(isinstance(err, OSError) for _, err in errors)
            reasons = {_short(err) for _, err in errors}
            if len(reasons) == 1:  # e.g. every host name unresolvable: say it once
                detail = f"{', '.join(host for host, _ in errors)}: {reasons.pop()}"
            else:
                detail = "; ".join(f"{host}: {_short(err)}" for host, err in errors)
            raise DataUnavailable(f"{'offline: ' if offline else ''}could not download {name} ({detail})")
    return raw_dir


def _short(err: BaseException) -> str:
    """An exception in a few words: URLError's reason, else the type and message, on one line."""
    reason = getattr(err, "reason", None)
    text = " ".join(f"{type(err).__name__}: {reason if reason is not None else err}".split())
    if any(sign in text for sign in ("Name or service not known", "name resolution", "nodename nor servname")):
        return "the host name cannot be resolved"
    return text[:160]


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An (optionally gzipped) IDX file of unsigned bytes (MNIST's format) as a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int(n) for n in np.frombuffer(data, ">u4", count=ndim, offset=4))
    values = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if values.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, but it holds {values.size} values")
    return values.reshape(shape)


def build_array_record(data_dir: str | None, raw_dir: str | os.PathLike) -> None:
    """MNIST in tfds' array_record format, built from the four raw files without TensorFlow.

    The builder is tfds' own MNIST builder (same name, version, features and split names, so that
    `tfds.data_source("mnist")` reads the result); only where the examples come from is replaced: the raw files
    are read with numpy instead of tf.io, and the PNGs that tfds stores are encoded with Pillow instead of
    tf.image. tfds shuffles by example key as usual, so the records land in the same order as in a copy that
    tfds prepares itself, with the same decoded images and labels.
    """
    import tensorflow_datasets as tfds
    from PIL import Image
    from tensorflow_datasets.image_classification import mnist as tfds_mnist

    raw_dir = Path(raw_dir)
    log_stream = sys.stdout  # tfds' own prints are silenced below; the progress lines go to the real stdout

    def png(image: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    class RawMnist(tfds_mnist.MNIST, skip_registration=True):
        name = "mnist"

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(*files) for split, files in SPLIT_FILES.items()}

        def _generate_examples(self, images_file, labels_file):
            images, labels = read_idx(raw_dir / images_file), read_idx(raw_dir / labels_file)
            if len(images) != len(labels):
                raise ValueError(f"{images_file} holds {len(images)} images but {labels_file} {len(labels)} labels")
            for index, (image, label) in enumerate(
                track(zip(images, labels, strict=True), len(labels), f"encoding {images_file}", stream=log_stream)
            ):
                yield index, {"image": png(image), "label": int(label)}  # (28, 28): a grayscale PNG

    with _quiet_absl(), _tfds_bars_off(tfds), contextlib.redirect_stdout(io.StringIO()):
        RawMnist(data_dir=data_dir, file_format="array_record").download_and_prepare()


@contextlib.contextmanager
def _tfds_bars_off(tfds) -> Iterator[None]:
    """tfds' own progress bars are replaced by ours (a bar on a terminal, lines in a log)."""
    from tensorflow_datasets.core.utils import tqdm_utils

    enabled = getattr(tqdm_utils, "_active", True)
    tfds.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            tfds.enable_progress_bar()


def tfds_root(data_dir: str | None) -> Path:
    """The tfds data folder `data_dir` stands for (None: $TFDS_DATA_DIR, else ~/tensorflow_datasets)."""
    return Path(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def prepare_mnist(data_dir: str | None, raw_dir: str | None = None, log: Callable[[str], None] = print) -> None:
    """MNIST in array_record format in `data_dir`, from the raw files in `raw_dir` or downloaded ones.

    Without `raw_dir`, the four raw files are downloaded into `<data_dir>/downloads/mnist_raw` (once; kept
    files are checksum-verified again). Raises DataUnavailable when the files cannot be had or built.
    """
    root = tfds_root(data_dir)
    if raw_dir is not None:
        raw = check_raw_files(raw_dir)
    else:
        raw = download_raw_files(root / "downloads" / "mnist_raw")  # offline: DataUnavailable, nothing printed
        log(f"MNIST was not in {root}: downloaded the four raw files (11.6 MB, sha256 verified) into {raw}")
    log(f"building MNIST in tfds' array_record format in {root / 'mnist' / '3.0.1'} (once; about 15 s)")
    try:
        build_array_record(str(root), raw)
    except ImportError as err:
        raise DataUnavailable(f"preparing MNIST needs {err.name or err} (pip install -e '.[examples]')") from err
    except Exception as err:
        raise DataUnavailable(f"could not prepare MNIST from the raw files in {raw} ({_short(err)})") from err


def _read_all(source, progress: Callable | None, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Every example of a tfds data source as (uint8 images (n, h, w, 1), int32 labels (n,))."""
    n = len(source)
    starts = range(0, n, READ_CHUNK)
    if progress is not None:
        starts = progress(starts, total=len(starts), desc=desc)
    images, labels = [], []
    for start in starts:
        chunk = list(range(start, min(start + READ_CHUNK, n)))
        # tfds sources read a whole chunk of records at once; any other Sequence is indexed one by one
        examples = source.__getitems__(chunk) if hasattr(source, "__getitems__") else [source[i] for i in chunk]
        images.append(np.stack([ex["image"] for ex in examples]))
        labels.append(np.array([ex["label"] for ex in examples], dtype=np.int32))
    return np.concatenate(images), np.concatenate(labels)


def _cache_path(cache_dir: str | os.PathLike, split: str, num_examples: int) -> Path:
    return Path(cache_dir) / f"mnist-3.0.1-{split}-{num_examples}.npz"


def _recorded_sizes(data_dir: str | None) -> dict[str, int] | None:
    """Split sizes from tfds' dataset_info.json of the copy in `data_dir`, read without importing tfds."""
    info = tfds_root(data_dir) / "mnist" / "3.0.1" / "dataset_info.json"
    try:
        splits = json.loads(info.read_text())["splits"]
        return {split["name"]: sum(int(n) for n in split["shardLengths"]) for split in splits}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_cached_splits(
    data_dir: str | None, cache_dir: str | os.PathLike
) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """Both decoded splits from the cache when the tfds copy in `data_dir` is there and both are cached, else None.

    The cache files are the ones `read_mnist_split` writes (keyed by split and example count); the counts come
    from the copy's dataset_info.json, so a repeated run never imports tfds (about a second saved).
    """
    sizes = _recorded_sizes(data_dir)
    if sizes is None or not all(split in sizes for split in ("train", "test")):
        return None
    paths = {split: _cache_path(cache_dir, split, sizes[split]) for split in ("train", "test")}
    if not all(path.is_file() for path in paths.values()):
        return None
    splits = {}
    for split, path in paths.items():
        with np.load(path) as stored:
            splits[split] = stored["images"], stored["labels"]
    return splits


def read_mnist_split(
    split: str,
    data_dir: str | None,
    cache_dir: str | os.PathLike | None = None,
    progress: Callable | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decoded uint8 images and int32 labels of one split; with `cache_dir`, decoded once and kept as .npz.

    tfds decodes each PNG in Python (about 2.5 s per 10,000 images on a 2-core CPU); the cache makes
    later runs load in a fraction of a second.
    """
    with _quiet_absl():
        source = _open_source(split, data_dir)
        cached = _cache_path(cache_dir, split, len(source)) if cache_dir is not None else None
        if cached is not None and cached.exists():
            with np.load(cached) as stored:
                return stored["images"], stored["labels"]
        images, labels = _read_all(source, progress, f"decoding mnist {split}")
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(".partial.npz")
        np.savez(partial, images=images, labels=labels)
        partial.replace(cached)
    return images, labels


def load_mnist(
    data_dir: str | None = None,
    *,
    download: bool = True,
    raw_dir: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: Callable | None = None,
    log: Callable[[str], None] = print,
) -> Dataset:
    """MNIST train (60,000) and test (10,000), normalised with mean 0.1307 and std 0.3081.

    Reads the array_record copy in `data_dir` (default: `default_data_dir()`); when absent, builds it from
    the raw files in `raw_dir`, or (with `download`) from downloaded ones. Raises DataUnavailable saying how
    to get it.
    """
    data_dir = data_dir if data_dir is not None else default_data_dir()
    decoded = read_cached_splits(data_dir, cache_dir) if cache_dir is not None else None
    if decoded is None:
        try:
            with _quiet_absl():
                _open_source("test", data_dir)
        except Exception as err:
            where = str(tfds_root(data_dir))
            if not download and raw_dir is None:
                raise DataUnavailable(f"MNIST not found in {where} (and downloading is off)") from err
            prepare_mnist(data_dir, raw_dir, log=log)
        decoded = {split: read_mnist_split(split, data_dir, cache_dir, progress) for split in ("train", "test")}
    splits = {split: Split(normalise(images), labels) for split, (images, labels) in decoded.items()}
    return Dataset(
        name="mnist",
        source=f"tfds mnist (array_record) in {data_dir or 'the tfds default folder'}",
        image_shape=(28, 28),
        num_classes=10,
        mean=MNIST_MEAN,
        std=MNIST_STD,
        train=splits["train"],
        test=splits["test"],
    )


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download), split stratified and normalised.

    Pixels (0..16) are scaled to [0, 1] and normalised with the training split's own mean and std.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = bunch.images.astype(np.uint8)  # (1797, 8, 8), values 0..16
    labels = bunch.target.astype(np.int32)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed
    )
    mean = float((train_x / 16.0).mean())
    std = float((train_x / 16.0).std())
    return Dataset(
        name="digits",
        source="scikit-learn load_digits (8x8, bundled, offline)",
        image_shape=(8, 8),
        num_classes=10,
        mean=mean,
        std=std,
        train=Split(normalise(train_x, mean, std, scale=16.0), train_y),
        test=Split(normalise(test_x, mean, std, scale=16.0), test_y),
    )


def load(
    dataset: str = "auto",
    data_dir: str | None = None,
    *,
    download: bool = True,
    raw_dir: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: Callable | None = None,
    log: Callable[[str], None] = print,
) -> Dataset:
    """ "mnist", "digits", or "auto": MNIST when it can be had, otherwise digits, saying which in one line."""
    if dataset not in ("auto", "mnist", "digits"):
        raise ValueError(f"dataset must be 'auto', 'mnist' or 'digits', got {dataset!r}")
    if dataset == "digits":
        return load_digits()
    try:
        return load_mnist(data_dir, download=download, raw_dir=raw_dir, cache_dir=cache_dir, progress=progress, log=log)
    except DataUnavailable as err:
        if dataset == "mnist":
            raise
        log(f"no MNIST ({err.reason}), so using scikit-learn's bundled 8x8 digits instead. {HOW_TO_GET_MNIST}.")
        return load_digits()
