"""MNIST as normalised numpy arrays, read with `tfds.data_source` (array_record: no TensorFlow needed).

When MNIST cannot be had (offline, no local copy), scikit-learn's bundled 8x8 digits tell the same
story at a smaller scale. Every array is built in one go; the training loop never touches Python
objects per example.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

MNIST_MEAN = 0.1307  # mean and std of the MNIST training pixels in [0, 1], the customary normalisation
MNIST_STD = 0.3081
SHARED_TFDS_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tfds"
READ_CHUNK = 5000  # examples decoded per tfds call (one progress-bar tick)

HOW_TO_GET_MNIST = (
    "To get MNIST: (1) with internet, install what tfds needs to prepare it once (`pip install tensorflow "
    "importlib_resources`) and this loader downloads and prepares it in array_record format (unless "
    "--no-download); or (2) to build it from the four raw files (train-images-idx3-ubyte.gz, ...), pass their "
    "folder as --mnist-raw-dir (tfds DownloadConfig(manual_dir=...); this needs the same two packages); or "
    "(3) point --data-dir or TFDS_DATA_DIR at a folder holding mnist/3.0.1 prepared with "
    "file_format='array_record' (reading it needs no TensorFlow). "
    "Offline, `--dataset digits` runs the same story on scikit-learn's bundled 8x8 digits."
)


class DataUnavailable(RuntimeError):
    """MNIST is neither on disk nor obtainable here; `reason` says why, the message also how to get it."""

    def __init__(self, reason: str):
        super().__init__(f"{reason}. {HOW_TO_GET_MNIST}")
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
    return (flat / np.float32(scale) - np.float32(mean)) / np.float32(std)


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


def prepare_mnist(data_dir: str | None, raw_dir: str | None = None) -> None:
    """Downloads (or builds from the raw files in `raw_dir`) MNIST in array_record format into `data_dir`."""
    import tensorflow_datasets as tfds

    config = tfds.download.DownloadConfig(manual_dir=raw_dir) if raw_dir else None
    try:
        builder = tfds.builder("mnist", data_dir=data_dir, file_format="array_record")
        builder.download_and_prepare(download_config=config)
    except Exception as err:
        raise DataUnavailable(
            f"could not download and prepare MNIST into {data_dir or 'the tfds default folder'} "
            f"({type(err).__name__}: {err})"
        ) from err


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
) -> Dataset:
    """MNIST train (60,000) and test (10,000), normalised with mean 0.1307 and std 0.3081.

    Reads the array_record copy in `data_dir` (default: `default_data_dir()`); when absent and
    `download` is set, downloads and prepares it first. Raises DataUnavailable saying how to get it.
    """
    data_dir = data_dir if data_dir is not None else default_data_dir()
    try:
        with _quiet_absl():
            _open_source("test", data_dir)
    except Exception as err:
        where = data_dir or "the tfds default folder (~/tensorflow_datasets)"
        if not download:
            raise DataUnavailable(f"no MNIST prepared in array_record format in {where}") from err
        prepare_mnist(data_dir, raw_dir)
    splits = {}
    for split in ("train", "test"):
        images, labels = read_mnist_split(split, data_dir, cache_dir, progress)
        splits[split] = Split(normalise(images), labels)
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
        return load_mnist(data_dir, download=download, raw_dir=raw_dir, cache_dir=cache_dir, progress=progress)
    except DataUnavailable as err:
        if dataset == "mnist":
            raise
        log(f"using scikit-learn's 8x8 digits: {err.reason} (run with --dataset mnist to see how to get it)")
        return load_digits()
