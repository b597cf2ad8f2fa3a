"""serving.core.dataplane: top-k, and the shapes and limits a prediction is checked against."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harness import write_tiny_model
from serving.core.dataplane import DataPlane, Limits, top_k
from serving.errors import InvalidArgument
from tests.helpers import repository


def test_top_k_orders_best_first() -> None:
    p = np.array([[0.1, 0.5, 0.3, 0.1], [0.7, 0.1, 0.05, 0.15]], dtype=np.float32)
    top = top_k(p, 3)
    assert top.indices.tolist() == [[1, 2, 0], [0, 3, 1]] or top.indices.tolist() == [
        [1, 2, 3],
        [0, 3, 1],
    ]
    assert top.scores[0, 0] == pytest.approx(0.5)
    assert top_k(p, 99).indices.shape == (2, 4)
    assert top_k(p, 1).indices.tolist() == [[1], [0]]


def test_top_k_of_one_matches_argmax() -> None:
    p = np.random.default_rng(0).random((6, 10)).astype(np.float32)
    top = top_k(p, 1)
    assert top.indices.dtype == np.int64 and top.indices.shape == (6, 1)
    assert top.indices[:, 0].tolist() == p.argmax(axis=1).tolist()
    assert np.array_equal(top.scores[:, 0], p.max(axis=1))
    assert top_k(p, 3).indices[:, 0].tolist() == p.argmax(axis=1).tolist()


async def test_data_plane_validates_shapes_and_limits(tmp_path: Path) -> None:
    write_tiny_model(tmp_path / "tiny" / "1" / "model.onnx")
    repo = repository(tmp_path)
    await repo.scan()
    plane = DataPlane(repo, Limits(max_request_batch=4, max_image_pixels=1000))
    served = plane.resolve("tiny")
    with pytest.raises(InvalidArgument, match=r"\[2, 5, 4, 1\] .* expected \[N, 4, 4, 1\]"):
        await plane.predict(served, np.zeros((2, 5, 4, 1), np.uint8))
    with pytest.raises(InvalidArgument, match="batch of 5 images is over the limit of 4"):
        await plane.predict(served, np.zeros((5, 4, 4, 1), np.uint8))
    with pytest.raises(InvalidArgument, match="empty batch"):
        await plane.predict(served, np.zeros((0, 4, 4, 1), np.uint8))
    with pytest.raises(InvalidArgument, match="NaN"):
        await plane.predict(served, np.full((1, 4, 4, 1), np.nan, np.float32))
    out = await plane.predict(served, np.zeros((3, 4, 4, 1), np.uint8), top=2)
    assert out.probabilities.shape == (3, 3) and np.allclose(out.probabilities.sum(axis=1), 1.0)
    assert out.top is not None and out.top.indices.shape == (3, 2)
    assert (await plane.predict(served, np.zeros((1, 4, 4, 1), np.uint8))).top is None
    with pytest.raises(InvalidArgument, match="version must be >= 0"):
        plane.resolve("tiny", -1)
    await repo.close()
