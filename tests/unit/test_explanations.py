"""serving.core.explanations and DataPlane.explain, in process on tiny real graphs: occlusion's
positions and heat against a loop of plain ONNX Runtime runs, admission holding the whole batch,
the cap, bad input, and the graphs Grad-CAM is refused for (and why)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harness import write_tiny_cnn, write_tiny_model
from serving.core import explanations
from serving.core.admission import Admission, request_cost
from serving.core.dataplane import DataPlane, Limits
from serving.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from tests.helpers import SCALE, cpu_session, repository


def test_positions_cover_every_pixel() -> None:
    assert explanations.positions(28, 4, 2) == list(range(0, 25, 2))  # 13, flush at 24
    assert (
        explanations.positions(32, 4, 2)[-1] == 28 and len(explanations.positions(32, 4, 2)) == 15
    )
    assert explanations.positions(10, 4, 4) == [0, 4, 6]  # one more, flush with the far edge
    assert explanations.occlusion_images(28, 28, 4, 2) == 170  # what batching is for
    assert explanations.occlusion_images(32, 32, 4, 2) == 226
    assert explanations.occlusion_grid((28, 28, 1), 0, 0) == (4, 2)
    assert explanations.occlusion_grid((3, 5, 1), 0, 0) == (3, 2)  # the default capped
    with pytest.raises(
        InvalidArgument, match=r"patch of 29 pixels is larger than the image \(28x28\)"
    ):
        explanations.occlusion_grid((28, 28, 1), 29, 0)


def test_resize_bilinear_is_half_pixel_with_clamped_edges() -> None:
    values = np.array([[0.0, 1.0], [2.0, 3.0]])
    out = explanations.resize_bilinear(values, 4, 4)
    # Output pixel centres fall at -0.25, 0.25, 0.75, 1.25 of the input: edges clamp.
    assert out[0].tolist() == [0.0, 0.25, 0.75, 1.0]
    assert out[:, 0].tolist() == [0.0, 0.5, 1.5, 2.0]
    assert np.array_equal(explanations.resize_bilinear(values, 2, 2), values)


def loop_heat(path: Path, x: np.ndarray, cls: int, patch: int, stride: int) -> np.ndarray:
    """Occlusion as a plain loop: one ONNX Runtime run per patched image."""
    session = cpu_session(path)
    _, h, w, _ = x.shape
    base = session.run(None, {"image": x})[0][0, cls]
    total, count = np.zeros((h, w)), np.zeros((h, w))
    for r in explanations.positions(h, patch, stride):
        for c in explanations.positions(w, patch, stride):
            patched = x.copy()
            patched[0, r : r + patch, c : c + patch, :] = 0
            fall = base - session.run(None, {"image": patched})[0][0, cls]
            total[r : r + patch, c : c + patch] += fall
            count[r : r + patch, c : c + patch] += 1
    return total / count


async def test_occlusion_equals_a_loop_and_holds_its_whole_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_tiny_cnn(tmp_path / "tiny" / "1" / "model.onnx", h=9, w=9, c=2, classes=3)
    repo = repository(tmp_path, max_versions=1)
    await repo.scan()
    held: list[tuple[int, int]] = []
    admission = Admission(1 << 40, 1 << 20)
    admit = admission.admit

    def spy(model: str, queue: object, images: int, nbytes: int):  # type: ignore[no-untyped-def]
        held.append((images, nbytes))
        return admit(model, queue, images, nbytes)  # type: ignore[arg-type]

    monkeypatch.setattr(admission, "admit", spy)
    explained: list[tuple[str, str]] = []
    plane = DataPlane(
        repo, Limits(), admission=admission, on_explain=lambda *a: explained.append(a)
    )
    served = plane.resolve("tiny")
    pixels = np.random.default_rng(3).integers(0, 256, (9, 9, 2), dtype=np.uint8)
    got = await plane.explain(served, pixels[None], tensor=True, patch=3, stride=2, class_index=1)
    x = pixels[None].astype(np.float32) * SCALE
    assert got.heat.shape == (9, 9) and got.heat.dtype == np.float32
    np.testing.assert_allclose(got.heat, loop_heat(path, x, 1, 3, 2), rtol=0, atol=1e-6)
    assert (got.method, got.patch, got.stride, got.class_index, got.images) == (
        "occlusion", 3, 2, 1, 17,
    )  # fmt: skip
    assert np.array_equal(got.image, pixels)
    # One admission for the whole batch: 4x4 positions and the unchanged image.
    assert held == [(17, request_cost(17, 9 * 9 * 2, 4, 3) + 2 * 0)]
    assert admission.held_bytes == 0 and explained == [("tiny", "occlusion")]
    assert plane.stats.get("tiny", 1).inference_count == 17


async def test_cap_bad_input_and_graphs_without_grad_cam(tmp_path: Path) -> None:
    write_tiny_model(tmp_path / "mlp" / "1" / "model.onnx", h=6, w=6, classes=3)
    write_tiny_cnn(tmp_path / "pooled" / "1" / "model.onnx", h=9, w=9, c=1)
    repo = repository(tmp_path, max_versions=1)
    await repo.scan()
    plane = DataPlane(repo, Limits(max_explain_images=20))
    mlp = plane.resolve("mlp")
    pixels = np.full((6, 6, 1), 200, np.uint8)
    # Occlusion works for any model, the MLP included: 2x2 positions (patch 4, stride 2) + 1.
    assert (await plane.explain(mlp, pixels, method="occlusion")).images == 5
    with pytest.raises(ResourceExhausted) as refused:
        await plane.explain(mlp, pixels, patch=1, stride=1)
    assert refused.value.message == (
        "occlusion with patch 1 and stride 1 on 6x6 runs 37 images, over the cap of 20 per "
        "explanation (--max-explain-images); use a larger stride or patch"
    )
    with pytest.raises(FailedPrecondition) as failed:
        await plane.explain(mlp, pixels, method="grad_cam")
    assert failed.value.message.startswith(
        "grad_cam needs a convolution layer and this model has none (its layers: flatten, dense)"
    )
    with pytest.raises(FailedPrecondition) as failed:
        await plane.explain(plane.resolve("pooled"), np.zeros((9, 9), np.uint8), method="grad_cam")
    assert "after conv1, a MaxPool comes where a flatten should" in failed.value.message
    for kwargs, message in (
        (
            {"method": "lime"},
            "unknown explanation method 'lime'; expected one of: occlusion, grad_cam",
        ),
        ({"class_index": 3}, "class 3 is out of range: model 'mlp' v1 has 3 classes, 0..2"),
        ({"patch": 7}, "occlusion patch of 7 pixels is larger than the image (6x6); expected 1..6"),
    ):
        with pytest.raises(InvalidArgument) as bad:
            await plane.explain(mlp, pixels, **kwargs)  # type: ignore[arg-type]
        assert bad.value.message == message
    with pytest.raises(InvalidArgument) as bad:
        await plane.explain(mlp, np.zeros((1, 6, 5, 1), np.float32), tensor=True)
    assert bad.value.message == (
        "an image of shape [1, 6, 5, 1] does not fit model 'mlp' v1: expected one image, "
        "[1, 6, 6, 1] or [6, 6, 1]"
    )
    assert plane.admission.held_bytes == 0
