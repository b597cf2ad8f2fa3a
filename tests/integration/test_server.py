"""The real server on loopback, called through the generated stubs and our client."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from harness import PYTHON, ROOT, ServerProcess, copy_repository, write_tiny_model
from serving import tensors
from serving.client import Client, format_summary
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.cnnserve.v1 import cnnserve_pb2_grpc as pb_grpc
from tests.helpers import SCALE, expected_probabilities, metric, wait_for
from training import datasets


@pytest.fixture(scope="module")
def test_images() -> tuple[np.ndarray, np.ndarray]:
    """Real Fashion-MNIST test images (uint8 NHWC) and labels."""
    ds = datasets.load("fashion_mnist", allow_download=False)
    return ds.x_test[:256], ds.y_test[:256]


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[pb_grpc.CnnServeStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.CnnServeStub(channel)


def tensor(x: np.ndarray) -> pb.Tensor:
    dtype = pb.DATA_TYPE_UINT8 if x.dtype == np.uint8 else pb.DATA_TYPE_FLOAT32
    return pb.Tensor(dtype=dtype, shape=x.shape, data=x.tobytes())


def code_of(call: object, request: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)  # type: ignore[operator]
    err = info.value
    return err.code(), err.details() or ""  # type: ignore[attr-defined]


@pytest.mark.parametrize("batch", [1, 32, 256])
def test_predict_uint8_equals_in_process_onnxruntime(
    stub: pb_grpc.CnnServeStub,
    reference: ort.InferenceSession,
    test_images: tuple[np.ndarray, np.ndarray],
    batch: int,
) -> None:
    x = test_images[0][:batch]
    response = stub.Predict(
        pb.PredictRequest(model="fashion", images=tensor(x), top_k=3), timeout=30
    )
    got = tensors.decode(response.probabilities.data, "FP32", response.probabilities.shape)
    expected = expected_probabilities(reference, x)
    assert np.array_equal(got, expected)  # bit for bit
    assert response.model == "fashion" and response.version == 1
    assert len(response.classifications) == batch
    best = [c.top[0].index for c in response.classifications]
    assert best == expected.argmax(axis=1).tolist()
    assert response.classifications[0].top[0].label in datasets.CLASS_NAMES["fashion_mnist"]
    assert len(response.classifications[0].top) == 3


def test_predict_float32_and_accuracy(
    reference: ort.InferenceSession,
    server: ServerProcess,
    test_images: tuple[np.ndarray, np.ndarray],
) -> None:
    x, y = test_images
    with Client(server.target) as client:
        result = client.predict("fashion", x.astype(np.float32) * SCALE)
    assert result.probabilities is not None
    assert np.array_equal(result.probabilities, expected_probabilities(reference, x))
    accuracy = float((np.array([i[0] for i in result.indices]) == y).mean())
    assert accuracy >= 0.7, accuracy


def test_concurrent_predictions_are_routed_back_correctly(
    server: ServerProcess,
    reference: ort.InferenceSession,
    test_images: tuple[np.ndarray, np.ndarray],
) -> None:
    """Dynamic batching mixes callers' images into one run: each must get its own rows back."""
    x = test_images[0]
    expected = expected_probabilities(reference, x)
    with Client(server.target) as client, ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: client.predict("fashion", x[i : i + 1]), range(len(x))))
    got = np.concatenate([r.probabilities for r in results if r.probabilities is not None])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert [r.indices[0][0] for r in results] == expected.argmax(axis=1).tolist()


def test_classify_png_and_jpeg_files(
    server: ServerProcess, tmp_path: Path, test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = test_images
    files = []
    for i in range(20):
        img = Image.fromarray(x[i, :, :, 0], mode="L")
        if i % 2:
            img = img.convert("RGB").resize((56, 56))  # bigger and in colour: the server converts
            path = tmp_path / f"{i}.jpg"
            img.save(path, quality=95)
        else:
            path = tmp_path / f"{i}.png"
            img.save(path)
        files.append(path)
    with Client(server.target) as client:
        result = client.classify("fashion", files, top_k=2)
    assert len(result.labels) == 20 and all(len(t) == 2 for t in result.labels)
    correct = sum(result.indices[i][0] == y[i] for i in range(20))
    assert correct >= 12, correct  # a one-epoch model on real images, some resized/JPEG'd
    # The PNGs are lossless at the model's size: exactly what Predict says for the same pixels.
    with Client(server.target) as client:
        direct = client.predict("fashion", x[0:20:2])
    assert [result.indices[i][0] for i in range(0, 20, 2)] == [d[0] for d in direct.indices]


def test_classify_cli(
    server: ServerProcess, tmp_path: Path, test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    path = tmp_path / "shoe.png"
    Image.fromarray(test_images[0][0, :, :, 0], mode="L").save(path)
    done = subprocess.run(
        [
            PYTHON,
            "-m",
            "serving.client",
            "--target",
            server.target,
            "classify",
            "--model",
            "fashion",
            str(path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{path}: ") and "(" in done.stdout
    missing = subprocess.run(
        [PYTHON, "-m", "serving.client", "--target", server.target, "summary", "--model", "nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 1
    assert (
        missing.stderr.strip()
        == "error: NOT_FOUND: model 'nope' not found; available models: fashion"
    )


def test_parameter_summary_equals_keras(server: ServerProcess) -> None:
    with Client(server.target) as client:
        s = client.summary("fashion")
    assert [layer.parameters for layer in s.layers] == [320, 0, 18_496, 0, 36_928, 0, 36_928, 650]
    assert [layer.kind for layer in s.layers] == [
        "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Conv2D", "Flatten", "Dense", "Dense",
    ]  # fmt: skip
    assert s.total_parameters == s.trainable_parameters == s.keras_parameters == 93_322
    assert s.layers[0].formula == "(3*3*1 + 1) * 32 = 320"
    assert s.layers[6].formula == "(576 + 1) * 64 = 36,928"
    assert list(s.layers[2].output_shape) == [11, 11, 64]
    assert s.dense_neuron_parameters == 785
    assert "Total params: 93,322" in format_summary(s)


def test_list_and_metadata(server: ServerProcess) -> None:
    with Client(server.target) as client:
        models = client.list_models().models
        md = client.metadata("fashion")
    assert [(m.name, m.default_version, [v.state for v in m.versions]) for m in models] == [
        ("fashion", 1, ["READY"])
    ]
    assert md.dataset == "fashion_mnist" and md.execution_provider == "CPUExecutionProvider"
    assert list(md.inputs[0].shape) == [-1, 28, 28, 1] and md.inputs[0].name == "image"
    assert list(md.outputs[0].shape) == [-1, 10] and md.outputs[0].name == "probabilities"
    assert md.class_names[0] == "T-shirt/top" and 0.7 <= md.test_accuracy <= 1.0
    assert md.properties["keras_parameters"] == "93322"
    assert json.loads(md.properties["class_names"]) == list(md.class_names)


def test_errors_have_the_right_codes(stub: pb_grpc.CnnServeStub) -> None:
    good = np.zeros((2, 28, 28, 1), np.uint8)
    code, msg = code_of(stub.Predict, pb.PredictRequest(model="nope", images=tensor(good)))
    assert code == grpc.StatusCode.NOT_FOUND and "available models: fashion" in msg
    code, msg = code_of(
        stub.Predict, pb.PredictRequest(model="fashion", version=7, images=tensor(good))
    )
    assert code == grpc.StatusCode.NOT_FOUND and "ready versions: 1" in msg
    code, msg = code_of(
        stub.Predict,
        pb.PredictRequest(model="fashion", images=tensor(np.zeros((2, 32, 32, 3), np.uint8))),
    )
    assert (
        code == grpc.StatusCode.INVALID_ARGUMENT
        and "[2, 32, 32, 3]" in msg
        and "expected [N, 28, 28, 1]" in msg
    )
    code, msg = code_of(
        stub.Predict,
        pb.PredictRequest(model="fashion", images=tensor(np.zeros((28, 28, 1), np.uint8))),
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "expected [N, 28, 28, 1]" in msg
    bad_len = pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[1, 28, 28, 1], data=b"\0" * 783)
    code, msg = code_of(stub.Predict, pb.PredictRequest(model="fashion", images=bad_len))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "needs 784 bytes, received 783" in msg
    bad_type = pb.Tensor(dtype=pb.DATA_TYPE_UNSPECIFIED, shape=[1, 28, 28, 1], data=b"\0" * 784)
    code, msg = code_of(stub.Predict, pb.PredictRequest(model="fashion", images=bad_type))
    assert (
        code == grpc.StatusCode.INVALID_ARGUMENT
        and "expected DATA_TYPE_UINT8 or DATA_TYPE_FLOAT32" in msg
    )
    too_many = tensor(np.zeros((1025, 28, 28, 1), np.uint8))
    code, msg = code_of(stub.Predict, pb.PredictRequest(model="fashion", images=too_many))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "over the limit of 1024" in msg
    code, msg = code_of(stub.Predict, pb.PredictRequest(images=tensor(good)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no model named" in msg
    images = [pb.Image(encoded=b"\x89PNG\r\n\x1a\n broken"), pb.Image(encoded=b"")]
    code, msg = code_of(stub.Classify, pb.ClassifyRequest(model="fashion", images=images))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("image 0: cannot decode")
    ok_png = io.BytesIO()
    Image.new("L", (28, 28)).save(ok_png, format="PNG")
    images = [pb.Image(encoded=ok_png.getvalue()), pb.Image(encoded=b"junk")]
    code, msg = code_of(stub.Classify, pb.ClassifyRequest(model="fashion", images=images))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("image 1:")
    # The server is still fine after all of that.
    assert (
        stub.Predict(pb.PredictRequest(model="fashion", images=tensor(good)), timeout=30).version
        == 1
    )


def test_deadline_is_honoured(stub: pb_grpc.CnnServeStub, server: ServerProcess) -> None:
    big = tensor(np.zeros((1024, 28, 28, 1), np.uint8))
    codes = set()
    for _ in range(5):
        try:
            stub.Predict(pb.PredictRequest(model="fashion", images=big), timeout=0.001)
            codes.add(grpc.StatusCode.OK)
        except grpc.RpcError as err:
            codes.add(err.code())
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
    assert server.proc is not None and server.proc.poll() is None
    assert stub.Predict(
        pb.PredictRequest(model="fashion", images=tensor(np.zeros((1, 28, 28, 1), np.uint8))),
        timeout=30,
    )


def test_health_per_model_and_reflection(server: ServerProcess) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "liveness", "fashion", "cnnserve.v1.CnnServe"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"cnnserve.v1.CnnServe", "grpc.health.v1.Health"} <= services


def test_message_size_limit(trained_repo: Path) -> None:
    with (
        ServerProcess(trained_repo, ["--max-message-mb", "1"]) as proc,
        grpc.insecure_channel(proc.target) as channel,
    ):
        stub = pb_grpc.CnnServeStub(channel)
        big = tensor(np.zeros((400, 28, 28, 1), np.float32))  # 1.25 MB
        code, msg = code_of(stub.Predict, pb.PredictRequest(model="fashion", images=big))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, msg
        ok = tensor(np.zeros((100, 28, 28, 1), np.float32))
        assert (
            len(
                stub.Predict(
                    pb.PredictRequest(model="fashion", images=ok), timeout=30
                ).classifications
            )
            == 100
        )


def test_reload_picks_new_version_and_refuses_corrupt(trained_repo: Path, tmp_path: Path) -> None:
    repo = copy_repository(trained_repo, tmp_path / "models")
    with ServerProcess(repo) as proc, Client(proc.target) as client:
        x = np.zeros((1, 28, 28, 1), np.uint8)
        assert client.predict("fashion", x).version == 1
        shutil.copytree(repo / "fashion" / "1", repo / "fashion" / "2")
        proc.signal(signal.SIGHUP)
        wait_for("v2 to serve", lambda: client.list_models().models[0].default_version == 2)
        assert client.predict("fashion", x).version == 2
        assert client.predict("fashion", x, version=1).version == 1  # still loaded on request

        (repo / "fashion" / "3").mkdir()
        data = (repo / "fashion" / "1" / "model.onnx").read_bytes()
        (repo / "fashion" / "3" / "model.onnx").write_bytes(data[: len(data) // 2])  # truncated
        proc.signal(signal.SIGHUP)
        wait_for(
            "v3 FAILED",
            lambda: any(v.state == "FAILED" for v in client.list_models().models[0].versions),
        )
        status = {v.version: v for v in client.list_models().models[0].versions}
        assert "model.onnx" in status[3].reason
        assert client.predict("fashion", x).version == 2  # the old version keeps serving
        assert client.health("fashion") == "SERVING"
    assert "model fashion v3 refused" in proc.logs()


def test_parameter_summary_follows_the_version_that_serves(tmp_path: Path) -> None:
    """Versions unloaded and loaded again, with other graphs under the same name and number:
    each summary is of the graph that serves now, never one remembered from before."""
    repo = tmp_path / "models"
    write_tiny_model(repo / "tiny" / "1" / "model.onnx", classes=3)
    with ServerProcess(repo, ["--max-versions", "1"]) as proc, Client(proc.target) as client:
        assert client.summary("tiny").total_parameters == 16 * 3 + 3
        for version, classes in [(2, 5), (1, 7)]:
            shutil.rmtree(repo / "tiny")
            write_tiny_model(repo / "tiny" / str(version) / "model.onnx", classes=classes)
            proc.signal(signal.SIGHUP)
            wait_for(
                f"v{version} to serve",
                lambda v=version: client.list_models().models[0].default_version == v,  # type: ignore[misc]
            )
            s = client.summary("tiny")
            assert (s.version, s.total_parameters) == (version, 16 * classes + classes)


def test_sigterm_lets_inflight_calls_finish(trained_repo: Path) -> None:
    proc = ServerProcess(
        trained_repo,
        ["--grace-seconds", "30", "--max-request-batch", "8192", "--max-queue-images", "1000000"],
    ).start()
    x = np.zeros((8192, 28, 28, 1), np.uint8)  # a few hundred ms of compute per call
    results: list[str] = []

    def call(client: Client) -> None:
        try:
            client.predict("fashion", x, omit_probabilities=True)
            results.append("OK")
        except grpc.RpcError as err:
            results.append(err.code().name)

    with Client(proc.target, max_message_mb=16) as client:
        client.predict("fashion", x[:1])
        threads = [threading.Thread(target=call, args=(client,)) for _ in range(6)]
        for t in threads:
            t.start()
        wait_for(
            "6 calls in flight",
            lambda: metric(proc, "cnnserve_inflight_requests", method="Predict") == 6,
        )
        proc.signal(signal.SIGTERM)
        wait_for("the drain in the log", lambda: "shutting down" in proc.logs())
        # Without the client's retries: they would go on for about 1.5 s, and on a loaded
        # machine the six calls could be over by then, gRPC stopping, the last try CANCELLED.
        with Client(proc.target, retry=None) as once, pytest.raises(grpc.RpcError) as refused:
            once.predict("fashion", x[:1])
        for t in threads:
            t.join(60)
        assert proc.proc is not None
        assert proc.proc.wait(60) == 0
    assert results == ["OK"] * 6, proc.logs()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
