"""The CUDA execution provider, end to end: the runtime, then the real server over both APIs.

These run only where onnxruntime-gpu sees a GPU (`make test-gpu` on such a machine); CI has
none, so there they are skipped with the reason. On the CPU the reference is computed by plain
in-process ONNX Runtime; CUDA's convolutions add up in another order, so the comparison is
"close and the same class", not bit for bit.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import ServerProcess
from serving import tensors
from serving.client import Client
from serving.core.runtime import ModelRuntime, RuntimeOptions
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.cnnserve.v1 import cnnserve_pb2_grpc as pb_grpc
from serving.pb.inference import grpc_predict_v2_pb2 as v2
from serving.pb.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from serving.pb.inference import model_config_pb2 as v2config
from tests.conftest import FASHION_DIR
from tests.helpers import SCALE, expected_probabilities
from training import datasets

CUDA = "CUDAExecutionProvider"
pytestmark = pytest.mark.skipif(
    CUDA not in ort.get_available_providers(),
    reason=f"needs onnxruntime-gpu and a GPU (available: {ort.get_available_providers()})",
)
ATOL = 1e-5  # full float32 (no TF32); cuDNN sums convolutions in another order than the CPU


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    """The first 1,000 Fashion-MNIST test images (uint8 NHWC) and labels, from the Debian
    package's test files alone (the GPU machine is not sent the 26 MB of training images)."""
    found = {p.name.split("-")[1]: p for p in FASHION_DIR.glob("t10k-*-idx*-ubyte*")}
    x, y = datasets.read_idx_split(found["images"], found["labels"])
    return x[:1000], y[:1000]


@pytest.fixture(scope="module")
def expected(reference: ort.InferenceSession, images: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return expected_probabilities(reference, images[0])


@pytest.fixture(scope="module")
def cuda_server(trained_repo: Path) -> Iterator[ServerProcess]:
    with ServerProcess(trained_repo, ["--provider", "cuda"]) as proc:
        yield proc


def assert_matches(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    assert np.array_equal(got.argmax(axis=1), want.argmax(axis=1))


@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
def test_runtime_runs_on_cuda_and_matches_cpu(
    fashion_model: Path,
    images: tuple[np.ndarray, np.ndarray],
    expected: np.ndarray,
    batch: int,
) -> None:
    runtime = ModelRuntime(fashion_model, RuntimeOptions(provider="cuda"))
    assert runtime.provider == CUDA and runtime.fixed_batch == 64
    x = runtime.prepare(images[0][:batch])
    assert_matches(runtime.run(x), expected[:batch])


def test_server_reports_cuda_everywhere(cuda_server: ServerProcess) -> None:
    with Client(cuda_server.target) as client:
        assert client.metadata("fashion").execution_provider == CUDA
    with cuda_server.channel() as channel:
        config = v2_grpc.GRPCInferenceServiceStub(channel).ModelConfig(
            v2.ModelConfigRequest(name="fashion"), timeout=30
        )
    assert config.config.parameters["execution_provider"].string_value == CUDA
    assert config.config.instance_group[0].kind == v2config.ModelInstanceGroup.KIND_GPU
    url = f"http://127.0.0.1:{cuda_server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    info = [
        s.labels
        for f in text_string_to_metric_families(text)
        if f.name == "cnnserve_model_info"
        for s in f.samples
    ]
    providers = {i["model"]: i["provider"] for i in info}
    assert "fashion" in providers and set(providers.values()) == {CUDA}


@pytest.mark.parametrize("batch", [1, 32, 256])
def test_predict_over_grpc_on_cuda(
    cuda_server: ServerProcess,
    images: tuple[np.ndarray, np.ndarray],
    expected: np.ndarray,
    batch: int,
) -> None:
    x = images[0][:batch]
    with cuda_server.channel() as channel:
        response = pb_grpc.CnnServeStub(channel).Predict(
            pb.PredictRequest(
                model="fashion",
                images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=x.shape, data=x.tobytes()),
            ),
            timeout=30,
        )
    got = tensors.decode(response.probabilities.data, "FP32", (batch, 10))
    assert_matches(got, expected[:batch])


def test_open_inference_protocol_on_cuda(
    cuda_server: ServerProcess, images: tuple[np.ndarray, np.ndarray], expected: np.ndarray
) -> None:
    x = images[0][:16].astype(np.float32) * SCALE
    request = v2.ModelInferRequest(model_name="fashion")
    request.inputs.add(name="image", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    with cuda_server.channel() as channel:
        response = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    got = tensors.decode(response.raw_output_contents[0], "FP32", (16, 10))
    assert_matches(got, expected[:16])


def test_concurrent_callers_are_batched_on_cuda_and_routed_back(
    cuda_server: ServerProcess, images: tuple[np.ndarray, np.ndarray], expected: np.ndarray
) -> None:
    x, y = images
    with Client(cuda_server.target) as client, ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: client.predict("fashion", x[i : i + 1]), range(len(x))))
    got = np.concatenate([r.probabilities for r in results if r.probabilities is not None])
    assert_matches(got, expected)
    accuracy = float((got.argmax(axis=1) == y).mean())
    assert accuracy >= 0.7, accuracy


def test_bad_input_on_cuda_is_invalid_argument_and_server_lives(
    cuda_server: ServerProcess, images: tuple[np.ndarray, np.ndarray]
) -> None:
    with cuda_server.channel() as channel:
        stub = pb_grpc.CnnServeStub(channel)
        bad = pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[1, 27, 28, 1], data=bytes(27 * 28))
        with pytest.raises(grpc.RpcError) as info:
            stub.Predict(pb.PredictRequest(model="fashion", images=bad), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        x = images[0][:1]
        ok = pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=x.shape, data=x.tobytes())
        assert stub.Predict(pb.PredictRequest(model="fashion", images=ok), timeout=30).model
