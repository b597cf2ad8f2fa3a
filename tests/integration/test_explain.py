"""Explain on a real server with a CNN trained on real MNIST digits by our training code (and a
tiny model without a convolution): occlusion against a loop of in-process ONNX Runtime runs,
where the heat lies on real digits, gRPC and REST answering alike, refusals with what was
expected, the per-explanation cap, the metrics, and the CLI's picture."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from harness import PYTHON, ROOT, ServerProcess, write_tiny_model
from serving.client import Client
from serving.core import explanations
from tests.helpers import SCALE, cpu_session, metric
from training import datasets

CAP = 300  # --max-explain-images: the default occlusion (170 images) fits, patch 1 stride 1 not


@pytest.fixture(scope="module")
def explain_server(
    mnist_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("explain") / "models"
    shutil.copytree(mnist_repo / "mnist", repo / "mnist")
    write_tiny_model(repo / "tiny" / "1" / "model.onnx", h=8, w=8, classes=3)
    with ServerProcess(repo, ["--max-explain-images", str(CAP)], http=True) as proc:
        yield proc


@pytest.fixture(scope="module")
def digits() -> datasets.Dataset:
    return datasets.load("mnist", allow_download=False)


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels[:, :, 0], mode="L").save(out, format="PNG")
    return out.getvalue()


def post(url: str, body: bytes, content_type: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def array_of(obj: dict[str, Any]) -> np.ndarray:
    import base64

    data = base64.b64decode(obj["base64"])
    return np.frombuffer(data, dtype=obj["dtype"]).reshape(obj["shape"])


def test_occlusion_equals_a_loop_of_onnx_runtime_runs(
    explain_server: ServerProcess, mnist_repo: Path, digits: datasets.Dataset
) -> None:
    session = cpu_session(mnist_repo / "mnist" / "1" / "model.onnx")
    with Client(explain_server.target) as client:
        for i in (0, 1):
            pixels = digits.x_test[i]
            got = client.explain("mnist", png(pixels))
            x = pixels[None].astype(np.float32) * SCALE
            probabilities = session.run(None, {"image": x})[0][0]
            cls = int(probabilities.argmax())
            assert (got.class_index, got.label) == (cls, digits.class_names[cls])
            assert got.probability == pytest.approx(float(probabilities[cls]), abs=1e-6)
            assert (got.method, got.patch, got.stride, got.images) == ("occlusion", 4, 2, 170)
            assert np.array_equal(got.image, pixels)
            total, count = np.zeros((28, 28)), np.zeros((28, 28))
            for r in range(0, 25, 2):
                for c in range(0, 25, 2):
                    patched = x.copy()
                    patched[0, r : r + 4, c : c + 4] = 0.0
                    fall = probabilities[cls] - session.run(None, {"image": patched})[0][0, cls]
                    total[r : r + 4, c : c + 4] += fall
                    count[r : r + 4, c : c + 4] += 1
            assert got.heat.shape == (28, 28) and got.heat.dtype == np.float32
            np.testing.assert_allclose(got.heat, total / count, rtol=0, atol=1e-6)
            # Another class, another patch: the same loop's numbers.
            other = client.explain("mnist", pixels, class_index=(cls + 1) % 10, patch=7, stride=7)
            assert other.images == 17 and other.class_index == (cls + 1) % 10


def test_where_the_heat_lies_on_real_digits(
    explain_server: ServerProcess, digits: datasets.Dataset
) -> None:
    """Occlusion's positive heat lies mostly on the strokes (a patch over the background changes
    nothing but where it touches a stroke). Grad-CAM's map is conv3's 3x3 grid resized to
    28x28, too coarse to follow a stroke: it puts more of its mass on the strokes than their
    share of the image would (the digit's middle, not the corners), for most digits."""
    occlusion_on_strokes, cam_over_share = [], []
    with Client(explain_server.target) as client:
        for pixels in digits.x_test[:60]:
            strokes = pixels[:, :, 0] > 0
            heat = np.maximum(client.explain("mnist", pixels).heat, 0)
            occlusion_on_strokes.append(heat[strokes].sum() / heat.sum())
            cam = client.explain("mnist", pixels, method="grad_cam").heat
            assert cam.min() >= 0
            if cam.sum() > 0:
                cam_over_share.append(cam[strokes].sum() / cam.sum() > strokes.mean())
    assert min(occlusion_on_strokes) > 0.5, occlusion_on_strokes
    assert np.mean(cam_over_share) >= 0.75, np.mean(cam_over_share)


def test_rest_answers_as_grpc_and_counts_by_method(
    explain_server: ServerProcess, digits: datasets.Dataset
) -> None:
    pixels = digits.x_test[3]
    url = f"{explain_server.http_url}/v1/models/mnist/explain"
    before = {
        m: metric(explain_server, "cnnserve_explanations_total", model="mnist", method=m)
        for m in explanations.METHODS
    }
    with Client(explain_server.target) as client:
        for method in explanations.METHODS:
            want = client.explain("mnist", pixels, method=method)
            tensor = json.dumps(
                {"datatype": "UINT8", "shape": [1, 28, 28, 1], "data": pixels.ravel().tolist()}
            ).encode()
            boundary = "explainboundary"
            form = (
                (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                    f'filename="d.png"\r\nContent-Type: image/png\r\n\r\n'
                ).encode()
                + png(pixels)
                + f"\r\n--{boundary}--\r\n".encode()
            )
            for body, kind in (
                (png(pixels), "image/png"),
                (tensor, "application/json"),
                (form, f"multipart/form-data; boundary={boundary}"),
            ):
                status, answer = post(f"{url}?method={method}", body, kind)
                assert status == 200, answer
                assert answer["method"] == method and answer["class_index"] == want.class_index
                assert answer["label"] == want.label and answer["images"] == want.images
                assert np.array_equal(array_of(answer["heat"]), want.heat)
                assert np.array_equal(array_of(answer["image"]), pixels)
    for method in explanations.METHODS:  # one gRPC and three REST calls each
        after = metric(explain_server, "cnnserve_explanations_total", model="mnist", method=method)
        assert after - before[method] == 4


def test_refusals_say_what_was_expected(
    explain_server: ServerProcess, digits: datasets.Dataset
) -> None:
    pixels = digits.x_test[0]
    with Client(explain_server.target) as client:
        cases: list[tuple[dict[str, Any], grpc.StatusCode, str]] = [
            ({"method": "lime"}, grpc.StatusCode.INVALID_ARGUMENT,
             "unknown explanation method 'lime'; expected one of: occlusion, grad_cam"),
            ({"class_index": 10}, grpc.StatusCode.INVALID_ARGUMENT,
             "class 10 is out of range: model 'mnist' v1 has 10 classes, 0..9"),
            ({"patch": 29}, grpc.StatusCode.INVALID_ARGUMENT,
             "occlusion patch of 29 pixels is larger than the image (28x28); expected 1..28"),
            ({"patch": 1, "stride": 1}, grpc.StatusCode.RESOURCE_EXHAUSTED,
             f"occlusion with patch 1 and stride 1 on 28x28 runs 785 images, over the cap of "
             f"{CAP} per explanation (--max-explain-images); use a larger stride or patch"),
        ]  # fmt: skip
        for kwargs, code, message in cases:
            with pytest.raises(grpc.RpcError) as info:
                client.explain("mnist", pixels, **kwargs)
            assert (info.value.code(), info.value.details()) == (code, message)
        with pytest.raises(grpc.RpcError) as info:
            client.explain("mnist", np.zeros((1, 28, 27, 1), np.float32))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == (
            "an image of shape [1, 28, 27, 1] does not fit model 'mnist' v1: expected one "
            "image, [1, 28, 28, 1] or [28, 28, 1]"
        )
        # Occlusion works for any model; Grad-CAM needs a convolution, and says so.
        assert client.explain("tiny", np.zeros((8, 8), np.uint8)).images == 10
        with pytest.raises(grpc.RpcError) as info:
            client.explain("tiny", np.zeros((8, 8), np.uint8), method="grad_cam")
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert info.value.details() == (
            "grad_cam needs a convolution layer and this model has none (its layers: flatten, "
            "dense); occlusion works for every model"
        )
    base = explain_server.http_url
    for query, status, message in (
        ("tiny/explain?method=grad_cam", 409, "grad_cam needs a convolution layer"),
        ("mnist/explain?patch=1&stride=1", 413, "over the cap of 300 per explanation"),
        ("mnist/explain?class=ten", 400, "class must be a whole number >= 0, got 'ten'"),
        ("mnist/explain?method=lime", 400, "unknown explanation method 'lime'"),
    ):
        got, answer = post(f"{base}/v1/models/{query}", png(pixels), "image/png")
        assert got == status and message in answer["error"], answer
    got, answer = post(
        f"{base}/v1/models/mnist/explain",
        json.dumps({"datatype": "UINT8", "shape": [28, 28], "data": [0] * 784}).encode(),
        "application/json",
    )
    assert got == 400 and "expected one image, [1, 28, 28, 1] or [28, 28, 1]" in answer["error"]


def test_cli_draws_the_map_over_the_image(
    explain_server: ServerProcess, digits: datasets.Dataset, tmp_path: Path
) -> None:
    image = tmp_path / "digit.png"
    image.write_bytes(png(digits.x_test[0]))
    for method in explanations.METHODS:
        out = tmp_path / f"{method}.png"
        command = [
            PYTHON, "-m", "serving.client", "--target", explain_server.target, "explain",
            str(image), "--model", "mnist", "--method", method, "--out", str(out),
        ]  # fmt: skip
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        assert f"wrote {out}" in done.stdout and f"class {digits.y_test[0]}; " in done.stdout
        picture = Image.open(out)
        assert picture.format == "PNG" and picture.width >= 560 and picture.height >= 280
    done = subprocess.run(
        [PYTHON, "-m", "serving.client", "--target", explain_server.target, "explain",
         str(image), "--model", "tiny", "--method", "grad_cam", "--out", str(tmp_path / "x.png")],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1 and "FAILED_PRECONDITION" in done.stderr
    assert not (tmp_path / "x.png").exists()
