"""Inside a served model, in process: the output-size arithmetic of the summary, feature maps
against a reference session of the same graph, filters against the initializers, the size
cap, unknown layers, and the feature-map session's life (made on first use, dropped at unload)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from harness import write_tiny_cnn
from serving.core.dataplane import DataPlane, Limits
from serving.core.repository import BatchingOptions, ModelRepository
from serving.core.runtime import RuntimeOptions
from serving.core.summary import size_formula, summarize
from serving.errors import InvalidArgument, ResourceExhausted

VALID = (0, 0, 0, 0)


@pytest.mark.parametrize(
    ("size", "conv", "pool", "expected"),
    [
        # valid, stride 1: the design notes' conv1 and pool1
        (
            28,
            (3, 1, VALID),
            (2, 2, VALID),
            ["(28 - 3 + 2*0)/1 + 1 = 26", "floor((26 - 2)/2) + 1 = 13"],
        ),
        # valid, stride 2, a division that is not exact
        (
            10,
            (3, 2, VALID),
            (2, 2, VALID),
            ["floor((10 - 3 + 2*0)/2) + 1 = 4", "floor((4 - 2)/2) + 1 = 2"],
        ),
        # same (explicit symmetric pads), stride 1: the size stays
        (
            9,
            (3, 1, (1, 1, 1, 1)),
            (3, 1, (1, 1, 1, 1)),
            ["(9 - 3 + 2*1)/1 + 1 = 9", "floor((9 - 3 + 2*1)/1) + 1 = 9"],
        ),
        # same (auto_pad), stride 2: ceil(W/S); an odd total pads the odd pixel after
        (
            9,
            (3, 2, "SAME_UPPER"),
            (2, 2, "SAME_UPPER"),
            ["(9 - 3 + 2*1)/2 + 1 = 5", "floor((5 - 2 + 0 + 1)/2) + 1 = 3"],
        ),
        (
            8,
            (3, 2, "SAME_UPPER"),
            (2, 1, "SAME_UPPER"),
            ["(8 - 3 + 0 + 1)/2 + 1 = 4", "floor((4 - 2 + 0 + 1)/1) + 1 = 4"],
        ),
    ],
)
def test_output_size_formulas(
    tmp_path: Path,
    size: int,
    conv: tuple[int, int, object],
    pool: tuple[int, int, object],
    expected: list[str],
) -> None:
    path = write_tiny_cnn(tmp_path / "m.onnx", h=size, w=size, conv=conv, pool=pool)  # type: ignore[arg-type]
    layers = summarize(path).layers
    assert [x.output_size_formula for x in layers[:2]] == expected
    # The formula's result is the shape ONNX Runtime computes.
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": np.zeros((1, size, size, 2), np.float32)})[0].shape == (1, 3)
    flatten = layers[2]
    oh, ow, channels = layers[1].output_shape
    assert flatten.output_size_formula == f"{oh}*{ow}*{channels} = {oh * ow * channels}"
    assert int(expected[1].rsplit("= ", 1)[1]) == oh
    assert layers[0].padding == ("valid" if conv[2] == VALID else "same")


def test_size_formula_of_a_rectangle_names_both_dimensions(tmp_path: Path) -> None:
    path = write_tiny_cnn(tmp_path / "m.onnx", h=12, w=7)
    assert summarize(path).layers[0].output_size_formula == (
        "height (12 - 3 + 2*0)/1 + 1 = 10; width (7 - 3 + 2*0)/1 + 1 = 5"
    )
    assert size_formula(7, 2, 2, 0, 0, pool=True) == "floor((7 - 2)/2) + 1 = 3"


def reference_maps(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """The Relu and MaxPool outputs of the tiny CNN, from a plain session with them added."""
    model = onnx.load(str(path))
    names = {"conv1": "relu", "pool1": "pool"}
    for value in names.values():
        model.graph.output.append(helper.make_tensor_value_info(value, TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = session.run(list(names.values()), {"image": x})
    return {name: out[0].transpose(1, 2, 0) for name, out in zip(names, outs, strict=True)}


def repository(root: Path) -> ModelRepository:
    return ModelRepository(
        root,
        runtime_options=RuntimeOptions(warmup_batch_sizes=(1,)),
        batching=BatchingOptions(enabled=True, max_batch_size=8),
        executor=ThreadPoolExecutor(2),
        max_versions=1,
    )


async def test_feature_maps_filters_cap_and_session_life(tmp_path: Path) -> None:
    path = write_tiny_cnn(tmp_path / "tiny" / "1" / "model.onnx", h=9, w=9, c=3)
    repo = repository(tmp_path)
    await repo.scan()
    # conv1 is 7*7*3 floats (588 bytes), pool1 3*3*3 (108 bytes); RGB in
    capped = DataPlane(repo, Limits(max_feature_map_bytes=600))
    served = capped.resolve("tiny")
    assert not served.has_feature_map_session
    pixels = np.random.default_rng(1).integers(0, 256, (9, 9, 3), dtype=np.uint8)

    with pytest.raises(ResourceExhausted) as info:
        await capped.feature_maps(served, pixels)
    assert info.value.message == (
        "the feature maps of 2 layers (conv1, pool1) are 696 bytes as float32, over the cap of "
        "600 bytes (--max-feature-map-mb); ask for fewer layers (the largest, conv1, is 588 bytes)"
    )
    assert not served.has_feature_map_session  # refused before anything was made or run
    assert [m.name for m in (await capped.feature_maps(served, pixels, ["conv1"])).layers] == [
        "conv1"
    ]
    assert capped.admission.held_bytes == 0

    plane = DataPlane(repo, Limits())

    maps = await plane.feature_maps(served, pixels, ["pool1", "conv1", "pool1"], top=2)
    assert served.has_feature_map_session
    assert [m.name for m in maps.layers] == ["conv1", "pool1"]  # the graph's order, each once
    assert [m.kind for m in maps.layers] == ["Conv2D", "MaxPooling2D"]
    x = pixels[None].astype(np.float32) * np.float32(1 / 255)
    expected = reference_maps(path, x)
    for m in maps.layers:
        assert (
            m.values.shape
            == expected[m.name].shape
            == summarize(path).layers[0 if m.name == "conv1" else 1].output_shape
        )
        np.testing.assert_allclose(m.values, expected[m.name], rtol=0, atol=1e-6)
    probabilities = (await plane.predict(served, pixels[None])).probabilities[0]
    np.testing.assert_allclose(maps.probabilities, probabilities, rtol=0, atol=1e-6)
    assert maps.top.indices.shape == (1, 2) and maps.top.indices[0, 0] == probabilities.argmax()
    assert np.array_equal(maps.image, pixels)
    assert plane.admission.held_bytes == 0  # the ticket went back

    for names, message in [
        (["conv9"], "'conv9' is not a layer of model 'tiny' v1"),
        (["output"], "'output' is a Dense layer of model 'tiny' v1"),
    ]:
        with pytest.raises(InvalidArgument) as bad:
            await plane.feature_maps(served, pixels, names)
        assert bad.value.message == (
            f"{message}; feature maps come from its convolution and pooling layers: conv1, pool1"
        )

    filters = await plane.filters(served)
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    assert filters.layer == "conv1" and filters.kernels.shape == (3, 3, 3, 3)  # [K, K, in, out]
    assert np.array_equal(filters.kernels, inits["K"].transpose(2, 3, 1, 0))
    assert np.array_equal(filters.biases, inits["KB"])
    # kernel [ky, kx, in, out] is ONNX's [out, in, ky, kx]
    assert filters.kernels[2, 0, 1, 2] == inits["K"][2, 1, 2, 0]
    with pytest.raises(
        InvalidArgument,
        match="'pool1' is a MaxPooling2D layer of model 'tiny' v1; "
        "filters come from its convolution layers: conv1",
    ):
        await plane.filters(served, "pool1")

    # A newer version replaces it (max_versions 1): the old one's second session goes with it.
    write_tiny_cnn(tmp_path / "tiny" / "2" / "model.onnx", h=9, w=9, c=3, seed=2)
    await repo.scan()
    assert plane.resolve("tiny").version == 2
    await repo.close()
    assert not served.has_feature_map_session
