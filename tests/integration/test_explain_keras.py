"""The server's closed-form Grad-CAM equals TensorFlow's GradientTape Grad-CAM on the same
weights: the trained design-notes CNN (its ONNX initializers loaded back into Keras's model of
training/model.py) through a real server, and a CNN with two hidden dense layers exported by
our training code's converter, in process. (Tests may import both sides; the packages do not.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("keras")

import keras  # noqa: E402
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from harness import ServerProcess  # noqa: E402
from serving.client import Client  # noqa: E402
from serving.core.explanations import CamGraph  # noqa: E402
from serving.core.inspection import FeatureMapSession  # noqa: E402
from serving.core.summary import summarize  # noqa: E402
from training import datasets  # noqa: E402
from training.export import to_onnx  # noqa: E402
from training.model import build_cnn  # noqa: E402

L = keras.layers


def keras_from_onnx(path: Path) -> keras.Model:
    """training/model.py's CNN with the served file's weights: kernels [out, in, K, K] back to
    Keras's [K, K, in, out], dense weights as they are."""
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    summary = summarize(path)
    model = build_cnn(summary.input_shape, 10)
    for layer in summary.layers:
        if not layer.weight:
            continue
        weight = inits[layer.weight]
        if layer.kind == "Conv2D":
            weight = weight.transpose(2, 3, 1, 0)
        model.get_layer(layer.name).set_weights([weight, inits[layer.bias].reshape(-1)])
    return model


def tape_grad_cam(model: keras.Model, conv: str, x: np.ndarray, cls: int) -> np.ndarray:
    """Grad-CAM as Keras's example computes it, with the class's score taken before the
    softmax (the last dense layer's logits): GradientTape, mean gradient per map, ReLU, resize."""
    last = model.layers[-1]
    probe = keras.Model(model.inputs, [model.get_layer(conv).output, last.input])
    kernel, bias = last.get_weights()
    with tf.GradientTape() as tape:
        activation, hidden = probe(tf.constant(x), training=False)
        logits = tf.matmul(hidden, kernel) + bias
        score = logits[:, cls]
    grads = tape.gradient(score, activation)
    weights = tf.reduce_mean(grads, axis=(0, 1, 2))
    cam = tf.nn.relu(tf.reduce_sum(activation[0] * weights, axis=-1))
    resized = tf.image.resize(cam[..., None], x.shape[1:3], method="bilinear")
    return np.asarray(resized[..., 0])


def test_server_grad_cam_equals_gradient_tape(server: ServerProcess, fashion_model: Path) -> None:
    model = keras_from_onnx(fashion_model)
    data = datasets.load("fashion_mnist", allow_download=False)
    with Client(server.target) as client:
        for i in range(6):
            pixels = data.x_test[i]
            x = pixels[None].astype(np.float32) / np.float32(255)
            probabilities = np.asarray(model(x, training=False))[0]
            for cls in (int(probabilities.argmax()), (int(probabilities.argmax()) + 1) % 10):
                got = client.explain("fashion", pixels, method="grad_cam", class_index=cls)
                assert got.layer == "conv3" and got.class_index == cls
                assert got.probability == pytest.approx(float(probabilities[cls]), abs=1e-5)
                want = tape_grad_cam(model, "conv3", x, cls)
                np.testing.assert_allclose(got.heat, want, rtol=0, atol=1e-4)


def test_closed_form_equals_gradient_tape_with_more_dense_layers(tmp_path: Path) -> None:
    """Same padding, a stride, and two hidden dense layers (one without an activation)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(shape=(16, 16, 3), name="image"),
            L.Conv2D(6, 3, padding="same", strides=2, activation="relu", name="conv_a"),
            L.Conv2D(5, 3, padding="valid", activation="relu", name="conv_b"),
            L.Flatten(name="flatten"),
            L.Dense(12, activation="relu", name="hidden_a"),
            L.Dense(8, name="hidden_b"),
            L.Dense(4, activation="softmax", name="output"),
        ],
        name="deeper",
    )
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if layer.weights:
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape).astype(np.float32)])
    path = tmp_path / "model.onnx"
    onnx.save(to_onnx(model), str(path))
    summary = summarize(path)
    cam = CamGraph.read(path, summary)
    assert cam.layer.name == "conv_b" and [d.relu for d in cam.dense] == [True, False, False]
    session = FeatureMapSession(path, summary)
    for seed in range(3):
        x = np.random.default_rng(seed).random((1, 16, 16, 3), dtype=np.float32)
        probabilities, (activation,) = session.run(x, [cam.layer])
        for cls in range(4):
            heat, closed = cam.explain(activation, cls, (16, 16))
            np.testing.assert_allclose(closed, probabilities, rtol=0, atol=1e-5)
            want = tape_grad_cam(model, "conv_b", x, cls)
            np.testing.assert_allclose(heat, want, rtol=0, atol=1e-4)
