"""The INT8 twin served beside its FP32 model, each under its own name: it answers as
in-process ONNX Runtime on the same file, every listing says which precision each model is,
and its feature maps and filters are those of the quantized graph (kernels dequantized)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from harness import ServerProcess, train_model
from serving.client import Client
from training import datasets

pytest.importorskip("tensorflow")

SCALE = np.float32(1.0 / 255.0)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`digits/1` and `digits_int8/1`: two epochs on 3,000 real digits, INT8 on by default."""
    models = tmp_path_factory.mktemp("int8") / "models"
    train_model(
        models, "--dataset", "mnist", "--epochs", "2", "--train-limit", "3000",
        "--test-limit", "1000", "--name", "digits", "--no-download",
    )  # fmt: skip
    assert (models / "digits_int8" / "1" / "model.onnx").is_file()
    return models


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerProcess]:
    with ServerProcess(repo, http=True) as proc:
        yield proc


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return datasets.load("mnist", allow_download=False).x_test[:64]


def test_served_int8_answers_as_in_process_onnxruntime(
    server: ServerProcess, repo: Path, digits: np.ndarray
) -> None:
    path = repo / "digits_int8" / "1" / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"image": digits.astype(np.float32) * SCALE})[0]
    with Client(server.target) as client:
        got = client.predict("digits_int8", digits)
        one = client.predict("digits_int8", digits[:1])  # alone, not in a batch of 64
        fp32 = client.predict("digits", digits)
    assert got.probabilities is not None and one.probabilities is not None
    np.testing.assert_allclose(got.probabilities, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(one.probabilities[0], expected[0], rtol=0, atol=1e-6)
    assert fp32.probabilities is not None
    agreement = (fp32.probabilities.argmax(1) == got.probabilities.argmax(1)).mean()
    assert agreement >= 0.95  # both served, side by side, by name


def test_every_listing_says_the_precision(server: ServerProcess) -> None:
    with Client(server.target) as client:
        listed = {m.name: m.precision for m in client.list_models().models}
        assert listed == {"digits": "fp32", "digits_int8": "int8"}
        for name, precision in listed.items():
            assert client.metadata(name).precision == precision
            assert client.metadata(name).properties["precision"] == precision
            summary = client.summary(name)
            assert summary.precision == precision
            # The quantized graph reads as the network it came from.
            assert summary.total_parameters == summary.keras_parameters == 93_322
            assert [layer.name for layer in summary.layers] == [
                "conv1", "pool1", "conv2", "pool2", "conv3", "flatten", "dense1", "output",
            ]  # fmt: skip
            assert [layer.activation for layer in summary.layers if layer.kind == "Conv2D"] == [
                "relu"
            ] * 3
    for path, key in (("/v1/models", None), ("/v1/models/digits_int8/summary", "precision")):
        with urllib.request.urlopen(server.http_url + path, timeout=10) as response:
            body = json.loads(response.read())
        if key is None:
            assert {m["name"]: m["precision"] for m in body["models"]} == listed
        else:
            assert body[key] == "int8"


def test_feature_maps_and_filters_of_the_int8_model(
    server: ServerProcess, repo: Path, digits: np.ndarray
) -> None:
    int8 = onnx.load(str(repo / "digits_int8" / "1" / "model.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in int8.initializer}
    fp32 = onnx.load(str(repo / "digits" / "1" / "model.onnx")).graph
    fp32_inits = {i.name: numpy_helper.to_array(i) for i in fp32.initializer}
    fp32_conv1 = next(n for n in fp32.node if n.op_type == "Conv").input[1]
    with Client(server.target) as client:
        got = client.filters("digits_int8", "conv1")
        reference = client.filters("digits", "conv1")
        maps = client.feature_maps("digits_int8", digits[0])
        fp32_maps = client.feature_maps("digits", digits[0])
    # The kernels are the int8 weights times their per-channel scales ...
    dq = next(n for n in int8.node if n.op_type == "DequantizeLinear" and "conv1" in n.name
              and inits[n.input[0]].ndim == 4)  # fmt: skip
    weights, scale = inits[dq.input[0]].astype(np.float32), inits[dq.input[1]]
    assert inits[dq.input[0]].dtype == np.int8
    expected = weights * scale[:, None, None, None]
    np.testing.assert_allclose(got.kernels, expected.transpose(2, 3, 1, 0), rtol=0, atol=1e-7)
    # ... within half a quantization step of the FP32 model's.
    np.testing.assert_allclose(
        got.kernels, fp32_inits[fp32_conv1].transpose(2, 3, 1, 0), rtol=0, atol=float(scale.max())
    )
    assert got.biases.shape == reference.biases.shape == (32,)
    assert list(maps.maps) == list(fp32_maps.maps) == ["conv1", "pool1", "conv2", "pool2", "conv3"]
    for name, values in maps.maps.items():
        assert values.shape == fp32_maps.maps[name].shape and values.min() >= 0  # after ReLU
        # Quantized activations: close to FP32's, not equal.
        assert np.abs(values - fp32_maps.maps[name]).max() < 0.1 * fp32_maps.maps[name].max()
