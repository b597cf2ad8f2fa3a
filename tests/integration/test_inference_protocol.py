"""The Open Inference Protocol (KServe v2 gRPC) on the real server, through Triton's own client
(`tritonclient[grpc]`) and through raw grpcio stubs of our protos.

tritonclient runs in a spawned worker process (see tests/integration/triton_client.py: its protos
and ours cannot live in one process); the raw-stub tests use serving.pb.inference here.
"""

from __future__ import annotations

import ast
import multiprocessing
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import ServerProcess, scrape
from serving import tensors
from serving.config import Settings
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.cnnserve.v1 import cnnserve_pb2_grpc as pb_grpc
from serving.pb.inference import grpc_predict_v2_pb2 as v2
from serving.pb.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from serving.pb.inference import model_config_pb2 as v2config
from tests.helpers import SCALE, expected_probabilities
from tests.integration import triton_client
from training import datasets

MODEL = "fashion"
SERVICE = "inference.GRPCInferenceService"
T = TypeVar("T")


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def triton() -> Iterator[Callable[..., Any]]:
    """Run a function of tests.integration.triton_client in a fresh (spawned) process."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:

        def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
            return pool.submit(fn, *args, **kwargs).result(timeout=120)

        yield call


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Real Fashion-MNIST test images, uint8 NHWC."""
    return datasets.load("fashion_mnist", allow_download=False).x_test[:32]


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> v2_grpc.GRPCInferenceServiceStub:
    return v2_grpc.GRPCInferenceServiceStub(channel)


def rpc_error(call: Callable[..., Any], request: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=30)
    err: Any = info.value
    return err.code(), err.details() or ""


def our_api_error(channel: grpc.Channel, model: str, x: np.ndarray) -> tuple[str, str]:
    """The same mistake made through our own API (cnnserve.v1 Predict)."""
    dtype = pb.DATA_TYPE_UINT8 if x.dtype == np.uint8 else pb.DATA_TYPE_FLOAT32
    tensor = pb.Tensor(dtype=dtype, shape=x.shape, data=x.tobytes())
    code, message = rpc_error(
        pb_grpc.CnnServeStub(channel).Predict, pb.PredictRequest(model=model, images=tensor)
    )
    return str(code), message


# ------------------------------------------------------------------ through tritonclient


def test_health_through_tritonclient(server: ServerProcess, triton: Callable[..., Any]) -> None:
    got = triton(triton_client.health, server.target, [MODEL, "no-such-model"])
    assert got == {"live": True, "ready": True, "models": {MODEL: True, "no-such-model": False}}
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", MODEL, SERVICE):  # what ServerReady / ModelReady must agree with
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING, service


def test_metadata_config_and_index_through_tritonclient(
    server: ServerProcess, triton: Callable[..., Any]
) -> None:
    got = triton(triton_client.metadata, server.target, MODEL)
    assert got["server"] == {
        "name": "cnnserve",
        "version": metadata.version("cnnserve"),
        "extensions": ["classification", "model_configuration", "statistics"],
    }
    model = got["model"]
    # int64 fields come back as strings from protobuf's JSON form
    assert model["name"] == MODEL and model["versions"] == ["1"]
    assert model["platform"] == "onnxruntime_onnx"
    assert model["inputs"] == [
        {"name": "image", "datatype": "FP32", "shape": ["-1", "28", "28", "1"]}
    ]
    assert model["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": ["-1", "10"]}
    ]

    config = got["config"]
    assert config["name"] == MODEL
    assert (config["platform"], config["backend"]) == ("onnxruntime_onnx", "onnxruntime")
    assert config["max_batch_size"] == Settings().max_request_batch
    assert config["input"] == [
        {
            "name": "image",
            "data_type": "TYPE_FP32",
            "format": "FORMAT_NHWC",
            "dims": ["28", "28", "1"],
        }
    ]
    assert config["output"] == [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": ["10"]}]
    assert "dynamic_batching" in config  # batching is on by default
    params = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert params["accepted_input_datatypes"] == "FP32,UINT8"
    assert params["dataset"] == "fashion_mnist"
    assert config["instance_group"][0]["kind"] == "KIND_CPU"

    assert got["index"] == [{"name": MODEL, "version": "1", "state": "READY"}]


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
@pytest.mark.parametrize("batch", [1, 32])
def test_infer_equals_in_process_onnxruntime(
    *,
    server: ServerProcess,
    triton: Callable[..., Any],
    reference: ort.InferenceSession,
    images: np.ndarray,
    dtype: type[np.generic],
    batch: int,
) -> None:
    x = images[:batch] if dtype is np.uint8 else images[:batch].astype(np.float32) * SCALE
    got = triton(triton_client.infer, server.target, MODEL, x, request_id=f"req-{batch}")
    assert got["output"].dtype == np.float32
    assert np.array_equal(got["output"], expected_probabilities(reference, x))  # bit for bit
    response = got["response"]
    assert (response["model_name"], response["model_version"]) == (MODEL, "1")
    assert response["id"] == f"req-{batch}"
    assert response["outputs"][0]["datatype"] == "FP32"


def test_classification_parameter(
    server: ServerProcess,
    triton: Callable[..., Any],
    reference: ort.InferenceSession,
    images: np.ndarray,
) -> None:
    x = images[:5]
    got = triton(triton_client.infer, server.target, MODEL, x, class_count=3)
    strings = got["output"]
    assert strings.shape == (5, 3)
    assert got["response"]["outputs"][0]["datatype"] == "BYTES"
    expected = expected_probabilities(reference, x)
    names = datasets.CLASS_NAMES["fashion_mnist"]
    for row, probabilities in zip(strings, expected, strict=True):
        parsed = [item.decode().split(":", 2) for item in row]  # Triton's "score:index:label"
        indices = [int(i) for _, i, _ in parsed]
        assert indices == np.argsort(-probabilities)[:3].tolist()
        assert [label for _, _, label in parsed] == [names[i] for i in indices]
        for (score, _, _), i in zip(parsed, indices, strict=True):
            assert score == f"{float(probabilities[i]):f}"


def test_errors_through_tritonclient(
    server: ServerProcess, triton: Callable[..., Any], channel: grpc.Channel, images: np.ndarray
) -> None:
    x = images[:2]
    # The same codes and messages as our own API: both come from the one data plane.
    unknown = triton(triton_client.infer_error, server.target, "no-such-model", x)
    assert unknown[0] == "StatusCode.NOT_FOUND"
    assert unknown == our_api_error(channel, "no-such-model", x)
    assert "available models: fashion" in unknown[1]

    flat = x.reshape(2, 28, 28)
    wrong_shape = triton(triton_client.infer_error, server.target, MODEL, flat)
    assert wrong_shape[0] == "StatusCode.INVALID_ARGUMENT"
    assert wrong_shape == our_api_error(channel, MODEL, flat)

    status, message = triton(triton_client.infer_error, server.target, MODEL, x.astype(np.float64))
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert "'FP64' not accepted; expected FP32 or UINT8" in message

    status, message = triton(triton_client.infer_error, server.target, MODEL, x, output="logits")
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert "unknown output 'logits'" in message and "'probabilities'" in message


def test_statistics_count_what_was_served(
    server: ServerProcess, triton: Callable[..., Any], images: np.ndarray
) -> None:
    def stats() -> dict[str, Any]:
        (only,) = triton(triton_client.statistics, server.target, MODEL)
        return only  # type: ignore[no-any-return]

    def count(d: dict[str, Any], *path: str) -> int:
        value: Any = d
        for key in path:
            value = value.get(key, {})
        return int(value or 0)  # protobuf's JSON leaves zeros out and writes uint64 as strings

    before = stats()
    triton(triton_client.infer, server.target, MODEL, images[:3])
    triton(triton_client.infer_error, server.target, MODEL, images[:3].reshape(3, 784))
    after = stats()

    assert (after["name"], after["version"]) == (MODEL, "1")
    delta = {
        key: count(after, *path) - count(before, *path)
        for key, path in {
            "inferences": ("inference_count",),
            "executions": ("execution_count",),
            "success": ("inference_stats", "success", "count"),
            "fail": ("inference_stats", "fail", "count"),
            "queue": ("inference_stats", "queue", "count"),
            "compute_infer": ("inference_stats", "compute_infer", "count"),
        }.items()
    }
    # The batcher may share the 3 images out over the free runs: one or two executions.
    assert delta.pop("executions") in (1, 2), delta
    assert delta == {
        "inferences": 3,
        "success": 1,
        "fail": 1,
        "queue": 1,
        "compute_infer": 1,
    }
    assert count(after, "inference_stats", "success", "ns") > count(
        before, "inference_stats", "success", "ns"
    )
    assert int(after["last_inference"]) >= int(before.get("last_inference", 0))
    # perf_analyzer refuses statistics whose three compute counts differ
    inference = after["inference_stats"]
    assert count(inference, "compute_input", "count") == count(inference, "compute_infer", "count")
    assert count(inference, "compute_output", "count") == count(inference, "compute_infer", "count")
    batch3 = [b for b in after["batch_stats"] if b["batch_size"] == "3"]
    assert batch3 and count(batch3[0], "compute_infer", "count") >= 1
    # no name: every ready version of every model
    assert [(s["name"], s["version"]) for s in triton(triton_client.statistics, server.target)] == [
        (MODEL, "1")
    ]


def test_metrics_label_the_rpc_by_its_name(
    server: ServerProcess, triton: Callable[..., Any], images: np.ndarray
) -> None:
    def requests() -> dict[tuple[str, str, str], float]:
        by = scrape(server.metrics_port).by("cnnserve_requests_total", "model", "method", "code")
        return {(m, rpc, code): value for (m, rpc, code), value in by.items()}

    before = requests()
    triton(triton_client.infer, server.target, MODEL, images[:1])
    triton(triton_client.infer_error, server.target, "no-such-model", images[:1])
    after = requests()
    for key in ((MODEL, "ModelInfer", "OK"), ("_unknown", "ModelInfer", "NOT_FOUND")):
        assert after[key] - before.get(key, 0.0) == 1.0, key


# ------------------------------------------------------------------ raw grpcio stubs


def infer_request(x: np.ndarray, *, raw: bool, **kwargs: Any) -> v2.ModelInferRequest:
    datatype = "UINT8" if x.dtype == np.uint8 else "FP32"
    request = v2.ModelInferRequest(model_name=MODEL, **kwargs)
    tensor = request.inputs.add(name="image", datatype=datatype, shape=x.shape)
    if raw:
        request.raw_input_contents.append(x.tobytes())
    elif datatype == "UINT8":
        tensor.contents.uint_contents.extend(x.ravel().tolist())
    else:
        tensor.contents.fp32_contents.extend(x.ravel().tolist())
    return request


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
def test_typed_contents_through_raw_stub(
    stub: v2_grpc.GRPCInferenceServiceStub,
    reference: ort.InferenceSession,
    images: np.ndarray,
    dtype: type[np.generic],
) -> None:
    x = images[:4] if dtype is np.uint8 else images[:4].astype(np.float32) * SCALE
    response = stub.ModelInfer(infer_request(x, raw=False, model_version="1"), timeout=30)
    (output,) = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("probabilities", "FP32", [4, 10])
    got = tensors.decode(response.raw_output_contents[0], "FP32", (4, 10))
    assert np.array_equal(got, expected_probabilities(reference, x))
    assert (response.model_name, response.model_version) == (MODEL, "1")


def test_malformed_requests_through_raw_stub(
    stub: v2_grpc.GRPCInferenceServiceStub, images: np.ndarray
) -> None:
    x = images[:2]
    both = infer_request(x, raw=True)
    both.inputs[0].contents.uint_contents.extend(x.ravel().tolist())
    short = infer_request(x, raw=True)
    short.raw_input_contents[0] = x.tobytes()[:-1]
    few = infer_request(x, raw=False)
    del few.inputs[0].contents.uint_contents[-1]
    big = infer_request(x, raw=False)
    big.inputs[0].contents.uint_contents[0] = 256
    cases = {
        "contents must be empty when raw_input_contents is used": both,
        "needs 1,568 bytes, received 1,567": short,
        "needs 1,568 values in contents.uint_contents": few,
        "UINT8 contents hold values above 255": big,
        "not a version number": infer_request(x, raw=True, model_version="latest"),
        "unknown input 'pixels'": v2.ModelInferRequest(
            model_name=MODEL, inputs=[v2.ModelInferRequest.InferInputTensor(name="pixels")]
        ),
    }
    for expected, request in cases.items():
        code, message = rpc_error(stub.ModelInfer, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (expected, message)
        assert expected in message

    code, message = rpc_error(stub.ModelInfer, infer_request(x, raw=True, model_version="7"))
    assert code == grpc.StatusCode.NOT_FOUND and "no version 7" in message
    code, _ = rpc_error(stub.ModelStatistics, v2.ModelStatisticsRequest(name="no-such-model"))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = rpc_error(stub.ModelConfig, v2.ModelConfigRequest(name="no-such-model"))
    assert code == grpc.StatusCode.NOT_FOUND


def test_service_is_discoverable_by_reflection(channel: grpc.Channel) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    database = ProtoReflectionDescriptorDatabase(channel)
    assert SERVICE in set(database.get_services())
    service = DescriptorPool(database).FindServiceByName(SERVICE)  # pulls model_config.proto too
    assert {m.name for m in service.methods} == set(
        v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    )
    assert service.methods_by_name["ModelConfig"].output_type.fields_by_name["config"].message_type


# ------------------------------------------------------------------ wire compatibility


def _triton_descriptor(module: str) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto inside one of tritonclient's generated modules, read from its
    source (importing it here would clash with serving.pb.inference)."""
    path = Path(
        str(metadata.distribution("tritonclient").locate_file(f"tritonclient/grpc/{module}"))
    )
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, bytes)
        ):
            return descriptor_pb2.FileDescriptorProto.FromString(node.args[0].value)
    raise AssertionError(f"no serialized descriptor in {path}")


def _ours(module: Any) -> descriptor_pb2.FileDescriptorProto:
    fdp = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(fdp)
    return fdp


def _messages(
    fdp: descriptor_pb2.FileDescriptorProto,
) -> dict[str, descriptor_pb2.DescriptorProto]:
    out: dict[str, descriptor_pb2.DescriptorProto] = {}

    def walk(messages: Any, prefix: str) -> None:
        for m in messages:
            out[prefix + m.name] = m
            walk(m.nested_type, f"{prefix}{m.name}.")

    walk(fdp.message_type, f".{fdp.package}.")
    return out


def _enums(fdp: descriptor_pb2.FileDescriptorProto) -> dict[str, dict[str, int]]:
    enums = {f".{fdp.package}.{e.name}": {v.name: v.number for v in e.value} for e in fdp.enum_type}
    for name, m in _messages(fdp).items():
        enums |= {f"{name}.{e.name}": {v.name: v.number for v in e.value} for e in m.enum_type}
    return enums


def test_protos_are_wire_compatible_with_tritonclient() -> None:
    ours = [_ours(v2), _ours(v2config)]
    theirs = [_triton_descriptor("service_pb2.py"), _triton_descriptor("model_config_pb2.py")]
    assert {f.package for f in ours} == {f.package for f in theirs} == {"inference"}
    our_messages = {k: m for f in ours for k, m in _messages(f).items()}
    their_messages = {k: m for f in theirs for k, m in _messages(f).items()}

    def shape(m: descriptor_pb2.DescriptorProto) -> dict[int, tuple[Any, ...]]:
        oneof = [o.name for o in m.oneof_decl]
        return {
            f.number: (
                f.name,
                f.type,
                f.label,
                f.type_name,
                oneof[f.oneof_index] if f.HasField("oneof_index") else None,
            )
            for f in m.field
        }

    for name, message in our_messages.items():
        assert name in their_messages, name
        mine, triton = shape(message), shape(their_messages[name])
        for number, field in mine.items():
            assert triton.get(number) == field, (name, number)
        # A field of Triton's that we leave out must have its number reserved.
        reserved = {n for r in message.reserved_range for n in range(r.start, r.end)}
        assert set(triton) - set(mine) <= reserved, name

    their_enums = {k: e for f in theirs for k, e in _enums(f).items()}
    for name, values in {k: e for f in ours for k, e in _enums(f).items()}.items():
        assert their_enums[name] == values, name

    (service,) = ours[0].service
    (their_service,) = theirs[0].service
    assert service.name == their_service.name == "GRPCInferenceService"
    their_methods = {m.name: m for m in their_service.method}
    for method in service.method:
        triton_method = their_methods[method.name]
        assert (method.input_type, method.output_type) == (
            triton_method.input_type,
            triton_method.output_type,
        )
        # Streaming as Triton's (ModelStreamInfer both ways; the others unary).
        assert (method.client_streaming, method.server_streaming) == (
            triton_method.client_streaming,
            triton_method.server_streaming,
        ), method.name
    assert any(m.name == "ModelStreamInfer" and m.client_streaming for m in service.method)
