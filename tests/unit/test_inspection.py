"""serving.core.inspection, in process: feature maps against a reference session of the same
graph, filters against the initializers, the size cap, unknown layers, and the feature-map
session's life (made on first use, dropped at unload)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from harness import write_tiny_cnn
from serving.core.dataplane import DataPlane, Limits
from serving.core.summary import summarize
from serving.errors import InvalidArgument, ResourceExhausted
from tests.helpers import repository, session_with_outputs


def reference_maps(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """The Relu and MaxPool outputs of the tiny CNN, from a plain session with them added."""
    model = onnx.load(str(path))
    names = {"conv1": "relu", "pool1": "pool"}
    session = session_with_outputs(model, list(names.values()))
    outs = session.run(list(names.values()), {"image": x})
    return {name: out[0].transpose(1, 2, 0) for name, out in zip(names, outs, strict=True)}


async def test_feature_maps_filters_cap_and_session_life(tmp_path: Path) -> None:
    path = write_tiny_cnn(tmp_path / "tiny" / "1" / "model.onnx", h=9, w=9, c=3)
    repo = repository(tmp_path, max_versions=1)
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
