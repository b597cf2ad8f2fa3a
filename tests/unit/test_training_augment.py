"""Augmentation is active only while training and never reaches the export: the ONNX graph,
the parity check and the parameter count are those of the plain network (TensorFlow needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

keras = pytest.importorskip("keras")

from training import datasets  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.export import export, to_onnx  # noqa: E402
from training.model import CNN_LAYERS, build_augmentation, build_cnn  # noqa: E402
from training.train import fit, scale_images  # noqa: E402


@pytest.fixture(scope="module")
def digits() -> datasets.Dataset:
    return datasets.subset(datasets.load("mnist", allow_download=False), 512, 300, seed=0)


def test_augmentation_changes_training_images_only(digits: datasets.Dataset) -> None:
    x = scale_images(digits.x_train[:64])
    augment = build_augmentation(seed=1)
    np.testing.assert_array_equal(np.asarray(augment(x, training=False)), x)
    moved = np.asarray(augment(x, training=True))
    assert moved.shape == x.shape
    changed = np.abs(moved - x).reshape(len(x), -1).max(axis=1) > 0.1
    assert changed.mean() > 0.9  # nearly every image moved, turned or zoomed
    assert moved.min() >= 0.0 and moved.max() <= 1.0 + 1e-6  # black borders, no new range


def test_augmented_training_exports_the_plain_network(
    digits: datasets.Dataset, tmp_path: Path
) -> None:
    config = TrainConfig(epochs=1, augment=True, verbose=0, early_stopping=0)
    fitted = fit(digits, config)
    net = fitted.net
    assert tuple(layer.name for layer in net.layers) == CNN_LAYERS
    assert net.count_params() == 93_322
    done = export(
        net,
        models_dir=tmp_path,
        name="augmented",
        metadata={"dataset": "mnist", "augmentation": "on"},
        x_check=scale_images(digits.x_test),
    )
    path, parity = done.path, done.parity
    assert parity.ok and parity.images == 300
    exported = onnx.load(str(path))
    twin = build_cnn((28, 28, 1))  # the same weights in a network that never saw augmentation
    twin.set_weights(net.get_weights())
    ops = [n.op_type for n in exported.graph.node]
    assert ops == [n.op_type for n in to_onnx(twin).graph.node]
    assert not {op for op in ops if "Random" in op or "Resize" in op or "GridSample" in op}
    props = {p.key: p.value for p in exported.metadata_props}
    assert props["keras_parameters"] == "93322" and props["augmentation"] == "on"
