"""What serving reads from an exported graph equals Keras's own model, for small CNNs with
`valid` and `same` padding and strides 1 and 2: the summary's output shapes and size formulas
against Keras's shapes, feature maps against Keras's intermediate outputs for the same weights,
and filters against the layers' kernels. (Tests may import both sides; the packages do not.)"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import onnx
import pytest

from serving.core.inspection import MAP_KINDS, FeatureMapSession, read_filters
from serving.core.summary import summarize
from training.export import to_onnx

L = keras.layers


def odd_cnn() -> keras.Model:
    """29x29x2: every rule of Keras's output size once (an odd `same` pad, a division that is
    not exact, a pool with `same` padding)."""
    return keras.Sequential(
        [
            keras.Input(shape=(29, 29, 2), name="image"),
            L.Conv2D(4, 3, padding="valid", strides=1, activation="relu", name="conv_a"),  # 27
            L.Conv2D(4, 4, padding="valid", strides=2, activation="relu", name="conv_b"),  # 12
            L.MaxPooling2D(2, strides=2, padding="same", name="pool_a"),  # 6
            L.Conv2D(4, 3, padding="same", strides=1, activation="relu", name="conv_c"),  # 6
            L.Conv2D(4, 3, padding="same", strides=2, activation="relu", name="conv_d"),  # 3
            L.MaxPooling2D(2, strides=1, padding="valid", name="pool_b"),  # 2
            L.Flatten(name="flatten"),
            L.Dense(3, activation="softmax", name="output"),
        ],
        name="odd",
    )


def even_cnn() -> keras.Model:
    """16x16x3 (RGB): `same` with stride 2 on even sizes, a pool of 3 with stride 2."""
    return keras.Sequential(
        [
            keras.Input(shape=(16, 16, 3), name="image"),
            L.Conv2D(5, 3, padding="same", strides=2, activation="relu", name="conv_a"),  # 8
            L.MaxPooling2D(3, strides=2, padding="valid", name="pool_a"),  # 3
            L.Conv2D(6, 2, padding="valid", strides=1, name="conv_b"),  # 2, no activation
            L.Flatten(name="flatten"),
            L.Dense(4, activation="softmax", name="output"),
        ],
        name="even",
    )


@pytest.fixture(scope="module", params=[odd_cnn, even_cnn], ids=["odd", "even"])
def exported(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[keras.Model, Path]:
    keras.utils.set_random_seed(0)
    model = request.param()
    rng = np.random.default_rng(0)
    for layer in model.layers:  # biases as training leaves them (not Keras's zeros)
        if layer.weights:
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape).astype(np.float32)])
    path = tmp_path_factory.mktemp("keras") / "model.onnx"
    onnx.save(to_onnx(model), str(path))
    return model, path


def test_summary_shapes_and_size_formulas_equal_keras(exported: tuple[keras.Model, Path]) -> None:
    model, path = exported
    summary = summarize(path)
    keras_layers = {layer.name: layer for layer in model.layers}
    assert [x.name for x in summary.layers] == [layer.name for layer in model.layers]
    for layer in summary.layers:
        k = keras_layers[layer.name]
        assert layer.output_shape == tuple(k.output.shape[1:]), layer.name
        assert layer.parameters == k.count_params(), layer.name
        if layer.kind in MAP_KINDS:
            # the formula's result is Keras's height (the models are square)
            assert int(layer.output_size_formula.rsplit("= ", 1)[1]) == k.output.shape[1]
            assert layer.strides == tuple(k.strides)
            size_in, size_out = k.input.shape[1], k.output.shape[1]
            kernel = (k.kernel_size if layer.kind == "Conv2D" else k.pool_size)[0]
            pads = max((size_out - 1) * k.strides[0] + kernel - size_in, 0)
            # `same` that pads nothing reads as `valid` in the graph: the two are one there
            assert layer.padding == (k.padding if pads else "valid"), layer.name
    formulas = {x.name: x.output_size_formula for x in summary.layers}
    if model.name == "odd":
        assert formulas == {
            "conv_a": "(29 - 3 + 2*0)/1 + 1 = 27",
            "conv_b": "floor((27 - 4 + 2*0)/2) + 1 = 12",
            "pool_a": "floor((12 - 2)/2) + 1 = 6",
            "conv_c": "(6 - 3 + 2*1)/1 + 1 = 6",
            "conv_d": "(6 - 3 + 0 + 1)/2 + 1 = 3",
            "pool_b": "floor((3 - 2)/1) + 1 = 2",
            "flatten": "2*2*4 = 16",
            "output": "",
        }
    else:
        assert formulas["conv_a"] == "(16 - 3 + 0 + 1)/2 + 1 = 8"
        assert formulas["pool_a"] == "floor((8 - 3)/2) + 1 = 3"


def test_feature_maps_and_filters_equal_keras(exported: tuple[keras.Model, Path]) -> None:
    model, path = exported
    summary = summarize(path)
    session = FeatureMapSession(path, summary)
    x = np.random.default_rng(1).random((1, *model.input_shape[1:]), dtype=np.float32)
    probabilities, maps = session.run(x, session.layers)
    inner = [layer for layer in model.layers if layer.name in {x.name for x in session.layers}]
    outputs = [layer.output for layer in inner] + [model.layers[-1].output]
    probe = keras.Model(model.layers[0].input, outputs)
    *expected, keras_probabilities = probe(x, training=False)
    assert [x.name for x in session.layers] == [layer.name for layer in inner]
    for layer, got, want in zip(session.layers, maps, expected, strict=True):
        assert got.shape == tuple(want.shape[1:]), layer.name
        np.testing.assert_allclose(got, np.asarray(want)[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(probabilities, np.asarray(keras_probabilities)[0], atol=1e-6)
    for layer in summary.layers:
        if layer.kind == "Conv2D":
            kernels, biases = read_filters(path, layer)
            kernel, bias = model.get_layer(layer.name).get_weights()
            assert np.array_equal(kernels, kernel) and np.array_equal(biases, bias)
