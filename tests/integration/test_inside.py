"""GetFeatureMaps and GetFilters on the real server with the trained model, against a reference
ONNX Runtime session of the same file with the intermediate values added as outputs; the size
cap and unknown layers as a client sees them; the CLI's pictures."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image

from harness import PYTHON, ROOT, ServerProcess
from serving.client import Client
from tests.helpers import SCALE, session_with_outputs
from training import datasets


@pytest.fixture(scope="module")
def digit() -> tuple[np.ndarray, bytes]:
    """A real Fashion-MNIST test image, as pixels and as a PNG file's bytes."""
    pixels = datasets.load("fashion_mnist", allow_download=False).x_test[0]
    out = io.BytesIO()
    Image.fromarray(pixels[:, :, 0], mode="L").save(out, format="PNG")
    return pixels, out.getvalue()


def reference_outputs(path: Path, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Probabilities and each Keras layer's output (the Relu after a Conv, a MaxPool's own),
    named as tf2onnx names the nodes (`cnn_1/conv1_1/...`), NCHW turned into H, W, C."""
    model = onnx.load(str(path))
    consumers = {i: n for n in model.graph.node for i in n.input}
    wanted: dict[str, str] = {}
    for node in model.graph.node:
        layer = node.name.split("/")[1].rsplit("_", 1)[0] if "/" in node.name else ""
        if node.op_type == "Conv":
            wanted[layer] = consumers[node.output[0]].output[0]  # its Relu
        elif node.op_type == "MaxPool":
            wanted[layer] = node.output[0]
    session = session_with_outputs(model, list(wanted.values()))
    outs = session.run(["probabilities", *wanted.values()], {"image": x})
    maps = {name: out[0].transpose(1, 2, 0) for name, out in zip(wanted, outs[1:], strict=True)}
    return outs[0][0], maps


def test_feature_maps_equal_the_onnx_intermediate_outputs(
    server: ServerProcess, fashion_model: Path, digit: tuple[np.ndarray, bytes]
) -> None:
    pixels, png = digit
    probabilities, expected = reference_outputs(
        fashion_model, pixels[None].astype(np.float32) * SCALE
    )
    assert list(expected) == ["conv1", "pool1", "conv2", "pool2", "conv3"]
    with Client(server.target) as client:
        for image in (png, pixels):
            got = client.feature_maps("fashion", image, top_k=3)
            assert list(got.maps) == list(expected)
            assert got.kinds["conv1"] == "Conv2D" and got.kinds["pool1"] == "MaxPooling2D"
            for name, values in got.maps.items():
                assert values.dtype == np.float32 and values.shape == expected[name].shape
                np.testing.assert_allclose(values, expected[name], rtol=0, atol=1e-6)
            assert [s.output_shape for s in client.summary("fashion").layers[:5]] == [
                list(v.shape) for v in got.maps.values()
            ]
            np.testing.assert_allclose(got.probabilities, probabilities, rtol=0, atol=1e-6)
            assert got.labels[0][0] == datasets.CLASS_NAMES["fashion_mnist"][probabilities.argmax()]
            assert np.array_equal(got.image, pixels)
        two = client.feature_maps("fashion", png, layers=["pool2", "conv1"])
        assert list(two.maps) == ["conv1", "pool2"]


def test_filters_equal_the_onnx_initializers(server: ServerProcess, fashion_model: Path) -> None:
    graph = onnx.load(str(fashion_model)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    with Client(server.target) as client:
        for layer, node in zip(("conv1", "conv2", "conv3"), convs, strict=True):
            got = client.filters("fashion", layer)
            weight, bias = inits[node.input[1]], inits[node.input[2]]  # [out, in, K, K], [out]
            assert got.layer == layer and got.kernels.shape == (
                3,
                3,
                weight.shape[1],
                weight.shape[0],
            )
            assert np.array_equal(got.kernels, weight.transpose(2, 3, 1, 0))
            assert np.array_equal(got.biases, bias)
        assert client.filters("fashion").layer == "conv1"  # the first one by default
        with pytest.raises(grpc.RpcError) as info:
            client.filters("fashion", "dense1")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert "'dense1' is a Dense layer" in details
    assert "filters come from its convolution layers: conv1, conv2, conv3" in details


def test_unknown_layer_and_the_size_cap(
    trained_repo: Path, digit: tuple[np.ndarray, bytes], tmp_path: Path
) -> None:
    # conv1 alone is 26*26*32 floats (84.5 KiB); all five layers 145 KiB: a cap of 0.1 MiB
    # lets the first through and refuses the second.
    with (
        ServerProcess(
            trained_repo, ["--max-feature-map-mb", "0.1"], log_path=tmp_path / "capped.log"
        ) as proc,
        Client(proc.target) as client,
    ):
        png = digit[1]
        assert list(client.feature_maps("fashion", png, layers=["conv1"]).maps) == ["conv1"]
        with pytest.raises(grpc.RpcError) as info:
            client.feature_maps("fashion", png)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details() == (
            "the feature maps of 5 layers (conv1, pool1, conv2, pool2, conv3) are 144.4 KiB as "
            "float32, over the cap of 102.4 KiB (--max-feature-map-mb); ask for fewer layers "
            "(the largest, conv1, is 84.5 KiB)"
        )
        with pytest.raises(grpc.RpcError) as info:
            client.feature_maps("fashion", png, layers=["conv1", "conv7"])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == (
            "'conv7' is not a layer of model 'fashion' v1; feature maps come from its "
            "convolution and pooling layers: conv1, pool1, conv2, pool2, conv3"
        )
        with pytest.raises(grpc.RpcError) as info:
            client.feature_maps("fashion", b"not an image", layers=["conv1"])
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_cli_draws_feature_maps_and_filters(
    server: ServerProcess, digit: tuple[np.ndarray, bytes], tmp_path: Path
) -> None:
    image = tmp_path / "item.png"
    image.write_bytes(digit[1])

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [PYTHON, "-m", "serving.client", "--target", server.target, *args]
        return subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
        )

    done = cli(
        "feature-maps", str(image), "--model", "fashion", "--out", str(tmp_path / "maps.png")
    )
    assert done.returncode == 0, done.stderr
    assert (
        "  conv1 (26, 26, 32) max " in done.stdout
        and f"wrote {tmp_path / 'maps.png'}" in done.stdout
    )
    maps = Image.open(tmp_path / "maps.png")
    assert maps.format == "PNG" and maps.width >= 400 and maps.height >= 400
    done = cli(
        "filters", "--model", "fashion", "--layer", "conv1", "--out", str(tmp_path / "f.png")
    )
    assert done.returncode == 0, done.stderr
    assert "conv1: 32 kernels of 3x3x1" in done.stdout
    assert Image.open(tmp_path / "f.png").format == "PNG"
    done = cli(
        "filters", "--model", "fashion", "--layer", "pool1", "--out", str(tmp_path / "x.png")
    )
    assert done.returncode == 1 and "INVALID_ARGUMENT" in done.stderr
    assert not (tmp_path / "x.png").exists()
