"""`python -m training` for real: Fashion-MNIST subset -> verified ONNX -> accuracy in ONNX Runtime."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import onnx

from harness import PYTHON, ROOT
from tests.helpers import cpu_session, expected_probabilities
from training import datasets


def test_trained_model_is_far_above_chance_in_onnxruntime(fashion_model: Path) -> None:
    ds = datasets.load("fashion_mnist", allow_download=False)
    x, y = ds.x_test[:2000], ds.y_test[:2000]
    probabilities = expected_probabilities(cpu_session(fashion_model), x)
    accuracy = float((probabilities.argmax(axis=1) == y).mean())
    assert accuracy >= 0.70, accuracy


def test_artifact_and_report(fashion_model: Path) -> None:
    onnx.checker.check_model(str(fashion_model))
    props = {p.key: p.value for p in onnx.load(str(fashion_model)).metadata_props}
    assert props["dataset"] == "fashion_mnist" and props["keras_parameters"] == "93322"
    assert props["train_images"] == "5000" and props["test_images"] == "2000"
    assert "dataset-fashion-mnist" in props["data_source"] or "Keras cache" in props["data_source"]
    assert json.loads(props["class_names"])[0] == "T-shirt/top"
    folder = fashion_model.parent
    report = json.loads((folder / "report.json").read_text())
    assert abs(report["test_accuracy"] - float(props["test_accuracy"])) < 1e-6
    assert len(report["epoch_seconds"]) == report["epochs_run"] == 3
    history = json.loads((folder / "history.json").read_text())
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history)
    assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Trainable params: 93,322" in (folder / "summary.txt").read_text()


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "training", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cli_bad_input_is_explained(tmp_path: Path) -> None:
    done = run_cli("--dataset", "imagenet")
    assert (
        done.returncode == 2
        and "invalid choice: 'imagenet' (choose from 'mnist', 'fashion_mnist', 'cifar10')"
        in done.stderr
    )
    done = run_cli("--epochs", "0")
    assert (
        done.returncode == 2 and "--epochs: expected a positive whole number, got 0" in done.stderr
    )
    done = run_cli("--validation-split", "1.5")
    assert done.returncode == 2 and "expected a number in [0, 1)" in done.stderr
    done = run_cli(
        "--dataset", "mnist", "--data-dir", str(tmp_path / "missing"), "--models-dir", str(tmp_path)
    )
    assert (
        done.returncode == 2
        and f"--data-dir {tmp_path / 'missing'}: not a directory" in done.stderr
    )
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8bnot really gzip")
    for name in (
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ):
        (tmp_path / "data" / name).write_bytes(b"")
    done = run_cli(
        "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--models-dir", str(tmp_path)
    )
    assert done.returncode == 2 and "train-images-idx3-ubyte.gz" in done.stderr
    assert not (tmp_path / "mnist").exists()  # nothing written to the repository


def test_demo_runs_end_to_end(trained_repo: Path) -> None:
    done = subprocess.run(
        [
            PYTHON,
            "scripts/demo.py",
            "--models-dir",
            str(trained_repo),
            "--model",
            "fashion",
            "--images",
            "10",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "accuracy over these images:" in done.stdout
    assert "Total params: 93,322" in done.stdout
    assert "server stopped (exit 0)" in done.stdout


def test_compare_cnn_and_mlp_on_the_same_shifted_images(tmp_path: Path) -> None:
    """`make compare` in small: four one-epoch runs on a real subset, one table, one plot."""
    out = tmp_path / "compare"
    done = subprocess.run(
        [PYTHON, "-m", "training.compare", "--dataset", "mnist", "--epochs", "1",
         "--train-limit", "1000", "--test-limit", "300", "--no-download", "--verbose", "0",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "compare.json").read_text())
    rows = {(r["architecture"], r["augment"]): r for r in report["rows"]}
    assert set(rows) == {("cnn", False), ("mlp", False), ("cnn", True), ("mlp", True)}
    for (arch, _), row in rows.items():
        assert row["parameters"] == {"cnn": 93_322, "mlp": 109_386}[arch]
        assert row["weights_per_first_layer_neuron"] == {"cnn": 10, "mlp": 785}[arch]
        assert set(row["shifted_accuracy"]) == {"1", "2", "3", "4"}
        assert len(row["shifted_accuracy_by_direction"]) == 16
        assert 0.0 <= min(row["shifted_accuracy"].values()) <= 1.0
        assert row["median_epoch_seconds"] > 0 and row["epochs_run"] == 1
    assert report["test_images"] == 300 and len(report["shifted_images_sha256"]) == 64
    table = (out / "compare.md").read_text()
    assert (
        table.startswith("| model | augmentation | parameters |") and table.count("\n| ") == 4
    )  # 4 rows
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
