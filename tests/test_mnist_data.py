"""The MNIST loader: normalisation, shapes through tfds' mock data, the cache, and clear errors offline."""

from __future__ import annotations

import gzip
import hashlib
import sys

import numpy as np
import pytest
from conftest import REPO, SHARED_DATA, require_data, require_module

sys.path.insert(0, str(REPO / "examples"))
import mnist_data

tfds = require_module("tensorflow_datasets")


class _Records:
    """A tfds-like data source over fixed examples (what `as_data_source` returns), for exact checks."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i])}


def _known_examples(n: int = 11) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28, 1), dtype=np.uint8)
    images[0] = 0  # the darkest and the brightest pixel values appear
    images[1] = 255
    return images, (np.arange(n) % 10).astype(np.int64)


def test_normalise_values_and_shapes():
    pixels = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)  # (1, 2, 2)
    got = mnist_data.normalise(pixels)
    want = (np.array([[0, 255, 51, 102]], np.float64) / 255 - 0.1307) / 0.3081
    assert got.dtype == np.float32 and got.shape == (1, 4)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(mnist_data.normalise(pixels[..., None]), got)  # (n, h, w, 1) too
    digits = mnist_data.normalise(np.full((2, 8, 8), 16), mean=0.5, std=0.25, scale=16.0)
    np.testing.assert_allclose(digits, np.full((2, 64), 2.0))


def test_normalise_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(n, height, width\)"):
        mnist_data.normalise(np.zeros((4, 784)))


def _mock_getitems(*args, generator, serialized=False):
    """tfds 4.9's mock installs `__getitems__` on a MagicMock instance, so it is called without `self`."""
    return [generator[key] for key in args[-1]]


def test_load_mnist_under_tfds_mock_data(tmp_path, monkeypatch):
    from tensorflow_datasets.testing import mocking

    monkeypatch.setattr(mocking, "_getitems", _mock_getitems)
    with tfds.testing.mock_data(num_examples=12):
        data = mnist_data.load_mnist(str(tmp_path), download=False)
    for split in (data.train, data.test):
        assert split.images.shape == (12, 784) and split.images.dtype == np.float32
        assert split.labels.shape == (12,) and split.labels.dtype == np.int32
        assert split.labels.min() >= 0 and split.labels.max() <= 9
        pixels = (split.images * mnist_data.MNIST_STD + mnist_data.MNIST_MEAN) * 255  # undo the normalisation
        np.testing.assert_allclose(pixels, np.round(pixels), atol=2e-3)
        assert pixels.min() > -0.01 and pixels.max() < 255.01
    assert data.image_shape == (28, 28) and data.num_classes == 10


def test_load_mnist_values_are_exact(tmp_path):
    images, labels = _known_examples()

    def as_data_source(self, split, decoders=None, deserialize_method=None, **kwargs):
        return _Records(images, labels)

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        data = mnist_data.load_mnist(str(tmp_path), download=False)
    want = (
        (images[..., 0].reshape(len(images), -1) / np.float32(255) - np.float32(0.1307)) / np.float32(0.3081)
    ).astype(np.float32)
    np.testing.assert_array_equal(data.train.images, want)
    np.testing.assert_array_equal(data.test.labels, labels.astype(np.int32))
    assert data.train.images[0].min() == pytest.approx(-0.1307 / 0.3081, rel=1e-6)
    assert data.train.images[1].max() == pytest.approx((1 - 0.1307) / 0.3081, rel=1e-6)


def test_cache_is_written_and_reused(tmp_path, monkeypatch):
    images, labels = _known_examples()

    def as_data_source(self, split, decoders=None, deserialize_method=None, **kwargs):
        return _Records(images, labels)

    cache = tmp_path / "cache"
    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        first = mnist_data.read_mnist_split("train", str(tmp_path), cache)
        assert (cache / f"mnist-3.0.1-train-{len(labels)}.npz").exists()

        def no_decoding(*args, **kwargs):
            raise AssertionError("the cached split was decoded again")

        monkeypatch.setattr(mnist_data, "_read_all", no_decoding)
        second = mnist_data.read_mnist_split("train", str(tmp_path), cache)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(first[0], images)


def test_a_repeated_load_reads_the_decoded_cache_without_opening_tfds(tmp_path, monkeypatch):
    import json

    images, labels = _known_examples()

    def as_data_source(self, split, decoders=None, deserialize_method=None, **kwargs):
        return _Records(images, labels)

    cache = tmp_path / "cache"
    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        first = mnist_data.load_mnist(str(tmp_path), download=False, cache_dir=cache)
    info = tmp_path / "mnist" / "3.0.1" / "dataset_info.json"  # what tfds writes beside the array_record files
    info.parent.mkdir(parents=True)
    splits = [{"name": split, "shardLengths": [str(len(labels))]} for split in ("train", "test")]
    info.write_text(json.dumps({"name": "mnist", "splits": splits}))

    def no_tfds(*args, **kwargs):
        raise RuntimeError("tfds was opened although both splits are cached")

    monkeypatch.setattr(mnist_data, "_open_source", no_tfds)
    second = mnist_data.load_mnist(str(tmp_path), download=False, cache_dir=cache)
    for a, b in ((first.train, second.train), (first.test, second.test)):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)
    # another example count in the copy's info is another copy: the cache is not used, tfds is asked (here: fails)
    splits[0]["shardLengths"] = [str(len(labels) + 1)]
    info.write_text(json.dumps({"name": "mnist", "splits": splits}))
    with pytest.raises(mnist_data.DataUnavailable, match="not found"):
        mnist_data.load_mnist(str(tmp_path), download=False, cache_dir=cache)


def test_missing_mnist_without_download_says_how_to_get_it(tmp_path):
    with pytest.raises(mnist_data.DataUnavailable) as info:
        mnist_data.load_mnist(str(tmp_path), download=False)
    message = str(info.value)
    assert str(tmp_path) in message and "not found" in message
    assert "--mnist-raw-dir" in message and "array_record" in message and "internet" in message
    assert "TensorFlow" not in message.replace("no TensorFlow", "")  # nothing to install by hand any more


def _idx(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes (MNIST's format), gzipped."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_raw(tmp_path, monkeypatch):
    """Four small raw MNIST-format files (12 train, 5 test images of 28x28), pinned in place of the real sums."""
    rng = np.random.default_rng(3)
    arrays = {
        "train": (rng.integers(0, 256, (12, 28, 28), dtype=np.uint8), rng.integers(0, 10, 12, dtype=np.uint8)),
        "test": (rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), rng.integers(0, 10, 5, dtype=np.uint8)),
    }
    contents = {}
    for split, (images_file, labels_file) in mnist_data.SPLIT_FILES.items():
        contents[images_file], contents[labels_file] = _idx(arrays[split][0]), _idx(arrays[split][1])
    pinned = {name: (len(data), hashlib.sha256(data).hexdigest()) for name, data in contents.items()}
    monkeypatch.setattr(mnist_data, "RAW_FILES", pinned)
    return contents, arrays


def test_read_idx_round_trip_and_rejects_other_files(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.gz").write_bytes(_idx(array))
    np.testing.assert_array_equal(mnist_data.read_idx(tmp_path / "a.gz"), array)
    (tmp_path / "b.gz").write_bytes(gzip.compress(b"PK\x03\x04 not an idx file"))
    with pytest.raises(ValueError, match="not an IDX file"):
        mnist_data.read_idx(tmp_path / "b.gz")


def test_download_verify_and_build_without_tensorflow(tmp_path, tiny_raw, local_server, closed_port_url, capsys):
    """Offline first mirror, then a mirror serving the files: downloaded, verified, built, read by tfds."""
    contents, arrays = tiny_raw
    served, url = local_server
    for name, data in contents.items():
        (served / name).write_bytes(data)
    data_dir = tmp_path / "tfds"
    raw = mnist_data.download_raw_files(data_dir / "downloads" / "mnist_raw", urls=(closed_port_url, url))
    assert sorted(p.name for p in raw.iterdir()) == sorted(contents)  # no .part file left behind
    lines = []
    data = mnist_data.load_mnist(str(data_dir), download=False, raw_dir=str(raw), log=lines.append)
    assert "building MNIST" in lines[-1]
    for split in ("train", "test"):
        images, labels = arrays[split]
        got = getattr(data, split)
        # tfds shuffles the records by key (as in its own copy): the same examples, image with label, reordered
        want = sorted((im.tobytes(), int(lb)) for im, lb in zip(mnist_data.normalise(images), labels, strict=True))
        have = sorted((im.tobytes(), int(lb)) for im, lb in zip(got.images, got.labels, strict=True))
        assert have == want and got.labels.dtype == np.int32
    assert (data_dir / "mnist" / "3.0.1" / "dataset_info.json").is_file()
    assert "Downloading and preparing" not in capsys.readouterr().out  # tfds' own chatter stays silent


def test_download_rejects_a_file_with_the_wrong_checksum(tmp_path, tiny_raw, local_server):
    contents, _ = tiny_raw
    served, url = local_server
    for name, data in contents.items():
        (served / name).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped in each
    with pytest.raises(mnist_data.DataUnavailable, match="differs from the pinned one") as info:
        mnist_data.download_raw_files(tmp_path / "raw", urls=(url,))
    assert "offline" not in info.value.reason
    assert not any((tmp_path / "raw").iterdir())  # the bad download is not kept


def test_raw_dir_with_a_missing_or_bad_file_is_named(tmp_path, tiny_raw):
    contents, _ = tiny_raw
    for name, data in contents.items():
        (tmp_path / name).write_bytes(data)
    mnist_data.check_raw_files(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"junk")
    with pytest.raises(mnist_data.DataUnavailable, match=r"t10k-labels-idx1-ubyte\.gz in .* fail"):
        mnist_data.check_raw_files(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(mnist_data.DataUnavailable, match=r"lacks the raw MNIST file.*train-images-idx3-ubyte\.gz"):
        mnist_data.check_raw_files(tmp_path)


def test_offline_falls_back_to_digits_in_one_line(tmp_path, monkeypatch, closed_port_url, capsys):
    """What a user without internet sees: one line saying why (offline) and how to get MNIST, no traceback."""
    monkeypatch.setattr(mnist_data, "RAW_URLS", (closed_port_url,))
    lines = []
    data = mnist_data.load("auto", str(tmp_path / "tfds"), download=True, log=lines.append)
    assert data.name == "digits"
    fallback = [line for line in lines if "8x8 digits" in line]
    assert lines == fallback and len(fallback) == 1 and "\n" not in fallback[0]  # that line and nothing else
    assert fallback[0].startswith("no MNIST (offline: could not download train-images-idx3-ubyte.gz")
    assert "To get MNIST: run once with internet" in fallback[0] and "--mnist-raw-dir" in fallback[0]
    assert "Traceback" not in capsys.readouterr().out


def test_auto_falls_back_to_digits_in_one_line(tmp_path):
    lines = []
    data = mnist_data.load("auto", str(tmp_path), download=False, log=lines.append)
    assert data.name == "digits"
    assert len(lines) == 1 and "\n" not in lines[0] and "8x8 digits" in lines[0] and "not found" in lines[0]
    with pytest.raises(mnist_data.DataUnavailable):
        mnist_data.load("mnist", str(tmp_path), download=False)
    with pytest.raises(ValueError, match="'auto', 'mnist' or 'digits'"):
        mnist_data.load("cifar")


@pytest.mark.slow
def test_build_from_the_real_raw_files_equals_tfds_own_copy(tmp_path):
    """The TF-free build from the four official files gives tfds' own prepared MNIST, record for record."""
    raw = require_data(SHARED_DATA / "mnist", "the four raw MNIST files")
    reference = require_data(SHARED_DATA / "tfds" / "mnist" / "3.0.1", "MNIST in tfds array_record format")
    built = mnist_data.load_mnist(str(tmp_path), download=False, raw_dir=str(raw), log=lambda line: None)
    theirs = mnist_data.load_mnist(str(reference.parents[1]), download=False)
    for split in ("train", "test"):
        np.testing.assert_array_equal(getattr(built, split).images, getattr(theirs, split).images)
        np.testing.assert_array_equal(getattr(built, split).labels, getattr(theirs, split).labels)


def test_digits_split_and_normalisation():
    data = mnist_data.load_digits()
    assert data.image_shape == (8, 8) and data.num_classes == 10
    assert data.train.images.shape[1] == 64 and data.train.images.dtype == np.float32
    assert len(data.train) + len(data.test) == 1797
    assert len(data.test) == 360
    assert set(np.unique(data.test.labels)) == set(range(10))  # stratified: every digit is tested
    assert abs(float(data.train.images.mean())) < 1e-5
    assert float(data.train.images.std()) == pytest.approx(1.0, rel=1e-4)


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    assert mnist_data.default_data_dir() == str(tmp_path)
    monkeypatch.delenv("TFDS_DATA_DIR")
    monkeypatch.setattr(mnist_data, "SHARED_TFDS_DIR", tmp_path)
    assert mnist_data.default_data_dir() is None
    (tmp_path / "mnist").mkdir()
    assert mnist_data.default_data_dir() == str(tmp_path)
