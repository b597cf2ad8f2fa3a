"""The design-notes CNN, its parameter arithmetic, and the ONNX export (TensorFlow needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

keras = pytest.importorskip("keras")

from serving.core.summary import summarize  # noqa: E402
from training.export import INPUT_NAME, OUTPUT_NAME, Parity, export, to_onnx  # noqa: E402
from training.model import build_cnn, build_mlp, layer_parameter_counts  # noqa: E402

MNIST_LAYERS = [320, 0, 18_496, 0, 36_928, 0, 36_928, 650]


def randomize_biases(model: Any, seed: int = 0) -> None:
    """Fresh layers have zero biases, which tf2onnx folds away; trained ones never are."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if len(weights) == 2:
            layer.set_weights([weights[0], rng.normal(0, 0.1, weights[1].shape).astype(np.float32)])


def test_cnn_parameters_mnist() -> None:
    model = build_cnn((28, 28, 1))
    assert model.count_params() == 93_322
    assert [n for _, n in layer_parameter_counts(model)] == MNIST_LAYERS


def test_cnn_parameters_cifar() -> None:
    model = build_cnn((32, 32, 3))
    assert model.count_params() == 122_570
    # Only the first conv and the first dense layer see the larger input.
    assert [n for _, n in layer_parameter_counts(model)] == [
        896,
        0,
        18_496,
        0,
        36_928,
        0,
        65_600,
        650,
    ]


def test_mlp_baseline_is_larger_than_the_cnn() -> None:
    mlp = build_mlp((28, 28, 1))
    assert mlp.count_params() == (784 + 1) * 128 + (128 + 1) * 64 + (64 + 1) * 10
    assert mlp.count_params() > build_cnn((28, 28, 1)).count_params()


@pytest.mark.parametrize(("shape", "total"), [((28, 28, 1), 93_322), ((32, 32, 3), 122_570)])
def test_onnx_graph_summary_equals_keras(shape: tuple[int, int, int], total: int) -> None:
    model = build_cnn(shape)
    randomize_biases(model)
    proto = to_onnx(model)
    assert [i.name for i in proto.graph.input] == [INPUT_NAME]
    assert [o.name for o in proto.graph.output] == [OUTPUT_NAME]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    summary = summarize(proto)
    keras_layers = layer_parameter_counts(model)
    assert [(layer.name, layer.parameters) for layer in summary.layers] == keras_layers
    assert summary.total == total
    assert [layer.kind for layer in summary.layers] == [
        "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Conv2D", "Flatten", "Dense", "Dense",
    ]  # fmt: skip
    keras_shapes = [tuple(layer.output.shape[1:]) for layer in model.layers]
    assert [layer.output_shape for layer in summary.layers] == keras_shapes
    h, w, c = shape
    assert summary.dense_neuron_parameters == h * w * c + 1
    assert summary.layers[0].formula == f"(3*3*{c} + 1) * 32 = {(9 * c + 1) * 32:,}"
    assert summary.layers[0].padding == "valid" and summary.layers[0].kernel == (3, 3)
    assert summary.layers[-1].activation == "softmax"


def test_export_writes_next_version_and_never_overwrites(tmp_path: Path) -> None:
    model = build_cnn((28, 28, 1))
    randomize_biases(model)
    existing = tmp_path / "digits" / "1"
    existing.mkdir(parents=True)
    (existing / "model.onnx").write_bytes(b"keep me")
    x = np.random.default_rng(0).random((64, 28, 28, 1), dtype=np.float32)
    extras: list[Path] = []
    done = export(
        model,
        models_dir=tmp_path,
        name="digits",
        metadata={"dataset": "mnist", "class_names": '["0","1","2","3","4","5","6","7","8","9"]'},
        x_check=x,
        write_extras=lambda folder, found: extras.append(folder),
    )
    path, parity = done.path, done.parity
    assert path == tmp_path / "digits" / "2" / "model.onnx"
    assert (existing / "model.onnx").read_bytes() == b"keep me"
    assert parity.ok and parity.images == 64 and parity.argmax_mismatches == 0
    assert not list((tmp_path / "digits").glob(".staging-*"))
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["keras_parameters"] == "93322"
    assert props["input_layout"] == "NHWC" and float(props["input_scale"]) == pytest.approx(1 / 255)
    assert props["opset"] == "17" and "tf2onnx" in props["library_versions"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"image": x})[0]
    assert np.abs(out - model.predict(x, verbose=0)).max() <= 1e-5


def test_parity_thresholds() -> None:
    assert Parity(1000, 1e-5, 0).ok
    assert not Parity(1000, 2e-5, 0).ok
    assert not Parity(1000, 0.0, 1).ok
