"""Shared fixtures. Real models are trained once per test session by our own training code."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import onnxruntime as ort
import pytest

from harness import ServerProcess, copy_repository, train_model, write_tiny_model
from tests.helpers import cpu_session

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# A repository holding fashion/1/model.onnx trained elsewhere by `python -m training`: used
# instead of training one where TensorFlow is not installed (the GPU machine of `make test-gpu`).
PRETRAINED = "CNNSERVE_TEST_REPOSITORY"


@pytest.fixture(scope="session")
def trained_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with `fashion/1/model.onnx`: the design-notes CNN trained for real on
    5,000 Fashion-MNIST images (the Debian package, or the Keras cache) for three short epochs:
    about 80% test accuracy with the defaults that follow the data (batch 16 here), a safe margin
    over the 70% the tests ask for."""
    repo = tmp_path_factory.mktemp("repo") / "models"
    if os.environ.get(PRETRAINED):  # a machine without TensorFlow (the GPU check)
        return copy_repository(Path(os.environ[PRETRAINED]), repo)
    train_model(
        repo,
        "--dataset",
        "fashion_mnist",
        "--epochs",
        "3",
        "--train-limit",
        "5000",
        "--test-limit",
        "2000",
        "--name",
        "fashion",
        "--no-download",
        "--no-int8",  # one model in the shared repository; INT8 serving has its own
    )
    return repo


@pytest.fixture(scope="session")
def mnist_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with `mnist/1/model.onnx`: the design-notes CNN trained for real on
    5,000 MNIST digits for three epochs (~15 s; about 96% on the first 100 test digits), for
    the tests that look at what the model looked at on real digits."""
    repo = tmp_path_factory.mktemp("mnist") / "models"
    train_model(
        repo,
        "--dataset",
        "mnist",
        "--epochs",
        "3",
        "--train-limit",
        "5000",
        "--test-limit",
        "1000",
        "--name",
        "mnist",
        "--no-download",
    )
    return repo


@pytest.fixture(scope="session")
def rollout_models(mnist_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three real versions of `mnist` for the rollout tests (tests copy it before writing a
    policy into it): v1 is mnist_repo's (5,000 digits, 3 epochs), v2 was trained with other
    settings (2,000 digits, 1 epoch, seed 7, no label smoothing: it disagrees with v1 on some
    digits), v3 on shuffled labels (600 digits, 1 epoch: a candidate made worse)."""
    repo = tmp_path_factory.mktemp("rollout") / "models"
    shutil.copytree(mnist_repo / "mnist" / "1", repo / "mnist" / "1")
    common = ["--dataset", "mnist", "--epochs", "1", "--test-limit", "500", "--name", "mnist"]
    common += ["--no-download", "--no-int8"]
    train_model(repo, *common, "--train-limit", "2000", "--seed", "7", "--label-smoothing", "0")
    train_model(repo, *common, "--train-limit", "600", "--shuffle-labels")
    return repo


@pytest.fixture(scope="session")
def fashion_model(trained_repo: Path) -> Path:
    return trained_repo / "fashion" / "1" / "model.onnx"


@pytest.fixture(scope="session")
def server(trained_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One shared, read-only server over the trained repository (tests must not change it)."""
    with ServerProcess(trained_repo) as proc:
        yield proc


@pytest.fixture(scope="session")
def reference(fashion_model: Path) -> ort.InferenceSession:
    """In-process ONNX Runtime on the trained model's file: what the server's answers are
    compared with (see helpers.expected_probabilities)."""
    return cpu_session(fashion_model)


@pytest.fixture
def tiny_repo(tmp_path: Path) -> Path:
    """A fresh repository of this test's own with one tiny 4x4 model, `tiny/1/model.onnx`."""
    write_tiny_model(tmp_path / "models" / "tiny" / "1" / "model.onnx")
    return tmp_path / "models"
