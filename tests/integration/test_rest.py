"""The REST API (KServe v2 REST, Triton's binary and classification extensions, our /v1 routes)
on a real server over loopback, with tritonclient.http, plain HTTP and curl."""

from __future__ import annotations

import http.client
import io
import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from aiohttp import web
from PIL import Image
from tritonclient.utils import InferenceServerException

from harness import ServerProcess, scrape, write_tiny_model
from serving.core.dataplane import DataPlane, Limits
from serving.metrics import Metrics
from serving.rest.app import RestApi, RestLimits
from tests.helpers import SCALE, expected_probabilities
from training import datasets

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def rest(trained_repo: Path) -> Iterator[ServerProcess]:
    with ServerProcess(trained_repo, http=True) as proc:
        yield proc


@pytest.fixture(scope="module")
def triton(rest: ServerProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(f"127.0.0.1:{rest.http_port}")


@pytest.fixture(scope="module")
def test_images() -> tuple[np.ndarray, np.ndarray]:
    ds = datasets.load("fashion_mnist", allow_download=False)
    return ds.x_test[:64], ds.y_test[:64]


def routes_of(app: web.Application) -> set[tuple[str, str]]:
    """(method, path template) of every route the app serves, for the OpenAPI check."""
    out = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("formatter") or info.get("path")
        if route.method != "HEAD" and path:
            out.add((route.method, path))
    return out


def call(
    url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def error_of(body: bytes) -> str:
    answer = json.loads(body)
    assert set(answer) == {"error"}, answer
    return str(answer["error"])


def infer_json(inputs: Any, **extra: Any) -> bytes:
    return json.dumps({"inputs": inputs, **extra}).encode()


# ------------------------------------------------------------------ tritonclient.http


def test_model_config_and_statistics_with_tritonclient(
    rest: ServerProcess, triton: httpclient.InferenceServerClient
) -> None:
    """Triton's model configuration and statistics extensions over HTTP: the same messages the
    gRPC RPCs answer, in protobuf's JSON mapping (what Triton's clients parse)."""
    from google.protobuf import json_format

    from serving.pb.inference import grpc_predict_v2_pb2 as v2
    from serving.pb.inference import grpc_predict_v2_pb2_grpc as v2_grpc
    from serving.pb.inference import model_config_pb2 as v2config

    x = np.zeros((2, 28, 28, 1), np.float32)
    request = httpclient.InferInput("image", list(x.shape), "FP32")
    request.set_data_from_numpy(x, binary_data=True)
    triton.infer("fashion", [request])
    with rest.channel() as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        grpc_config = stub.ModelConfig(v2.ModelConfigRequest(name="fashion"), timeout=30).config
        grpc_stats = stub.ModelStatistics(v2.ModelStatisticsRequest(name="fashion"), timeout=30)
    config = triton.get_model_config("fashion")
    assert json_format.ParseDict(config, v2config.ModelConfig()) == grpc_config
    assert config["max_batch_size"] == grpc_config.max_batch_size and config["input"][0]["dims"]
    version_config = triton.get_model_config("fashion", model_version="1")
    assert json_format.ParseDict(version_config, v2config.ModelConfig()) == grpc_config

    stats = triton.get_inference_statistics("fashion")
    parsed = json_format.ParseDict(stats, v2.ModelStatisticsResponse())
    (ours,) = parsed.model_stats
    (theirs,) = grpc_stats.model_stats
    assert (ours.name, ours.version) == ("fashion", "1")
    # Counted by the one data plane for both protocols (the gRPC call came after this one's).
    assert 2 <= ours.inference_count <= theirs.inference_count
    every = json_format.ParseDict(triton.get_inference_statistics(), v2.ModelStatisticsResponse())
    assert "fashion" in {m.name for m in every.model_stats}
    for path in (
        "/v2/models/nope/config",
        "/v2/models/nope/stats",
        "/v2/models/fashion/versions/9/config",
    ):
        status, _, body = call(f"{rest.http_url}{path}")
        assert status == 404, (path, body)
        assert "not found" in error_of(body) or "no version 9" in error_of(body), path


def test_perf_analyzer_over_http(rest: ServerProcess) -> None:
    """Triton's own load generator, over HTTP (it reads the model's config from .../config)."""
    import subprocess

    from bench.loadgen import setup_perf_analyzer

    pa, why = setup_perf_analyzer()
    assert pa is not None, why
    before = scrape(rest.metrics_port).total(
        "cnnserve_requests_total", method="ModelInfer", code="OK", protocol="http"
    )
    done = subprocess.run(
        [
            str(pa.binary), "-m", "fashion", "-i", "http", "-u", f"127.0.0.1:{rest.http_port}",
            "-b", "4", "--input-data", "zero", "--concurrency-range", "2",
            "--measurement-mode", "count_windows", "--measurement-request-count", "50",
            "--stability-percentage", "100", "--max-trials", "5",
        ],
        capture_output=True, text=True, timeout=300, check=False, env=pa.env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Throughput:" in done.stdout and "Server:" in done.stdout, done.stdout[-3000:]
    after = scrape(rest.metrics_port).total(
        "cnnserve_requests_total", method="ModelInfer", code="OK", protocol="http"
    )
    assert after - before >= 50


def test_health_and_metadata_with_tritonclient(triton: httpclient.InferenceServerClient) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("fashion") and triton.is_model_ready("fashion", "1")
    assert not triton.is_model_ready("nope")
    server = triton.get_server_metadata()
    assert server["name"] == "cnnserve" and "binary_tensor_data" in server["extensions"]
    meta = triton.get_model_metadata("fashion")
    assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 28, 28, 1]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    with pytest.raises(InferenceServerException) as err:
        triton.get_model_metadata("nope")
    assert err.value.status() == "404" and "not found" in err.value.message()


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
@pytest.mark.parametrize("dtype", ["UINT8", "FP32"])
def test_infer_equals_in_process_onnx_runtime(  # noqa: PLR0917  (fixtures and parameters)
    triton: httpclient.InferenceServerClient,
    reference: ort.InferenceSession,
    test_images: tuple[np.ndarray, np.ndarray],
    binary_in: bool,
    binary_out: bool,
    dtype: str,
) -> None:
    x = test_images[0][:8]
    expected = expected_probabilities(reference, x)
    data = x if dtype == "UINT8" else x.astype(np.float32) * SCALE
    inp = httpclient.InferInput("image", list(x.shape), dtype)
    inp.set_data_from_numpy(data, binary_data=binary_in)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=binary_out)
    result = triton.infer("fashion", [inp], outputs=[out], request_id="r-7")
    got = result.as_numpy("probabilities")
    assert got.dtype == np.float32 and got.shape == (8, 10)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    response = result.get_response()
    assert response["model_version"] == "1" and response["id"] == "r-7"


def test_infer_without_outputs_answers_binary(
    triton: httpclient.InferenceServerClient, reference: ort.InferenceSession
) -> None:
    """No outputs named: tritonclient asks for binary_data_output, the whole output as bytes."""
    x = np.full((2, 28, 28, 1), 128, np.uint8)
    inp = httpclient.InferInput("image", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    result = triton.infer("fashion", [inp], model_version="1")
    assert "binary_data_size" in result.get_response()["outputs"][0]["parameters"]
    expected = expected_probabilities(reference, x)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("binary_out", [True, False])
def test_classification_parameter(
    triton: httpclient.InferenceServerClient,
    reference: ort.InferenceSession,
    test_images: tuple[np.ndarray, np.ndarray],
    binary_out: bool,
) -> None:
    x = test_images[0][:4]
    probabilities = expected_probabilities(reference, x)
    inp = httpclient.InferInput("image", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=binary_out, class_count=3)
    got = triton.infer("fashion", [inp], outputs=[out]).as_numpy("probabilities")
    assert got.shape == (4, 3)
    names = datasets.load("fashion_mnist", allow_download=False).class_names
    for row, p in zip(got, probabilities, strict=True):
        entries = [(e.decode() if isinstance(e, bytes) else e).split(":", 2) for e in row]
        best = np.argsort(-p)[:3]
        assert [int(i) for _, i, _ in entries] == best.tolist()
        assert [label for _, _, label in entries] == [names[i] for i in best]
        np.testing.assert_allclose([float(s) for s, _, _ in entries], p[best], atol=1e-6)


# ------------------------------------------------------------------ our own API


def test_classify_raw_bytes_and_multipart(
    rest: ServerProcess, test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = test_images
    pngs = []
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(x[i, :, :, 0], mode="L").save(buf, format="PNG")
        pngs.append(buf.getvalue())
    status, _, body = call(f"{rest.http_url}/v1/models/fashion/classify?top_k=2", "POST", pngs[0])
    assert status == 200, body
    one = json.loads(body)
    assert one["model"] == "fashion" and one["version"] == 1
    assert len(one["classifications"]) == 1 and len(one["classifications"][0]["top"]) == 2
    boundary = "cnnserve-boundary"
    form = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{i}.png"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode()
            + png
            + b"\r\n"
            for i, png in enumerate(pngs)
        )
        + f"--{boundary}--\r\n".encode()
    )
    status, _, body = call(
        f"{rest.http_url}/v1/models/fashion/classify",
        "POST",
        form,
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert status == 200, body
    many = json.loads(body)["classifications"]
    assert len(many) == 3 and many[0]["top"][0] == one["classifications"][0]["top"][0]
    correct = sum(c["top"][0]["index"] == y[i] for i, c in enumerate(many))
    assert correct >= 2
    status, _, body = call(f"{rest.http_url}/v1/models/fashion/classify", "POST", b"not an image")
    assert status == 400 and "image 0" in error_of(body)


def test_summary_and_models(rest: ServerProcess) -> None:
    status, _, body = call(f"{rest.http_url}/v1/models/fashion/summary")
    assert status == 200
    summary = json.loads(body)
    assert summary["total_parameters"] == 93_322
    assert [layer["name"] for layer in summary["layers"]][:2] == ["conv1", "pool1"]
    status, _, body = call(f"{rest.http_url}/v1/models")
    assert status == 200
    models = json.loads(body)["models"]
    rollout = models[0].pop("rollout")
    assert models == [
        {"name": "fashion", "default_version": 1,
         "versions": [{"version": 1, "state": "READY", "reason": "", "role": "stable"}],
         "precision": "fp32"}
    ]  # fmt: skip
    # No rollout.yaml: no policy, the newest ready version answers (README, Retrain without fear).
    assert (rollout["state"], rollout["stable"], rollout["candidate"]) == ("none", 0, 0)
    assert rollout["file"].endswith("/fashion/rollout.yaml")
    status, _, body = call(f"{rest.http_url}/v1/models/nope/summary")
    assert status == 404 and "available models: fashion" in error_of(body)


# ------------------------------------------------------------------ bad input


IMAGE = {"name": "image", "datatype": "UINT8", "shape": [1, 28, 28, 1]}


@pytest.mark.parametrize(
    ("body", "headers", "expected"),
    [
        (b"{not json", {}, "not valid JSON"),
        (b'["inputs"]', {}, "must be a JSON object"),
        (infer_json([]), {}, "a list of one tensor"),
        (infer_json([{**IMAGE, "datatype": "BYTES", "data": ["a"] * 784}]), {}, "'BYTES' not accepted"),
        (infer_json([{**IMAGE, "datatype": "INT64", "data": [0] * 784}]), {}, "expected FP32 or UINT8"),
        (infer_json([{**IMAGE, "data": [0] * 783}]), {}, "needs 784 values in 'data', received 783"),
        (infer_json([{**IMAGE, "data": ["x"] * 784}]), {}, "must hold UINT8 numbers"),
        (infer_json([{**IMAGE, "data": [300] * 784}]), {}, "whole numbers 0..255"),
        (infer_json([{**IMAGE, "shape": [1, 14, 14, 4], "data": [0] * 784}]), {}, "expected [N, 28, 28, 1]"),
        (infer_json([{**IMAGE, "name": "pixels", "data": [0] * 784}]), {}, "unknown input 'pixels'"),
        (infer_json([{**IMAGE, "shape": "1x28", "data": []}]), {}, "'shape' must be a list"),
        (infer_json([{**IMAGE, "parameters": {"binary_data_size": 784}}]), {"Inference-Header-Content-Length": "9999"}, "the body has"),
        (infer_json([{**IMAGE, "data": [0] * 784}], outputs=[{"name": "logits"}]), {}, "unknown output 'logits'"),
        (infer_json([{**IMAGE, "data": [0] * 784}], outputs=[{"name": "probabilities", "parameters": {"classification": 0}}]), {}, "must be a whole number >= 1"),
    ],
)  # fmt: skip
def test_bad_requests_are_400_with_what_was_expected(
    rest: ServerProcess, body: bytes, headers: dict[str, str], expected: str
) -> None:
    status, answer_headers, answer = call(
        f"{rest.http_url}/v2/models/fashion/infer", "POST", body, headers
    )
    assert status == 400, answer
    assert answer_headers["Content-Type"].startswith("application/json")
    assert expected in error_of(answer)


def test_binary_data_that_does_not_fit_its_shape(rest: ServerProcess) -> None:
    head = infer_json([{**IMAGE, "parameters": {"binary_data_size": 700}}])
    status, _, answer = call(
        f"{rest.http_url}/v2/models/fashion/infer",
        "POST",
        head + b"\x00" * 700,
        {"Inference-Header-Content-Length": str(len(head))},
    )
    assert status == 400 and "needs 784 bytes, received 700" in error_of(answer)


def test_unknown_model_version_and_route_are_404(rest: ServerProcess) -> None:
    body = infer_json([{**IMAGE, "data": [0] * 784}])
    for path in ("/v2/models/nope/infer", "/v2/models/fashion/versions/9/infer"):
        status, _, answer = call(rest.http_url + path, "POST", body)
        assert status == 404, answer
    status, _, answer = call(f"{rest.http_url}/v2/models/fashion/versions/x/infer", "POST", body)
    assert status == 400 and "not a version number" in error_of(answer)
    status, _, answer = call(f"{rest.http_url}/v3/whatever")
    assert status == 404 and "/openapi.json" in error_of(answer)
    status, _, answer = call(f"{rest.http_url}/v2/models/fashion/infer")  # GET
    assert status == 405 and "allowed: POST" in error_of(answer)


def test_requests_are_counted_by_protocol(rest: ServerProcess) -> None:
    call(f"{rest.http_url}/v2/models/nope/ready")
    counted = scrape(rest.metrics_port)
    total = "cnnserve_requests_total"
    assert counted.total(total, protocol="http", method="ModelInfer", code="OK") > 0
    assert counted.total(total, protocol="http", method="ModelInfer", code="INVALID_ARGUMENT") > 0
    assert counted.total(total, protocol="http", method="ModelReady", code="NOT_FOUND") >= 1
    assert counted.total(total, protocol="http", code="INTERNAL") == 0
    assert counted.total(total, protocol="http", code="UNKNOWN") == 0


# ------------------------------------------------------------------ limits, slow senders, tokens


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A tiny model behind a 1 MiB body limit and request data budget, a 1 s read timeout and
    a token."""
    repo = tmp_path_factory.mktemp("rest-small") / "models"
    write_tiny_model(repo / "tiny" / "1" / "model.onnx")
    args = ["--max-message-mb", "1", "--max-inflight-mb", "1", "--http-read-timeout-s", "1"]
    with ServerProcess(repo, args, env={"CNNSERVE_AUTH_TOKEN": TOKEN}, http=True) as proc:
        yield proc


AUTH = {"Authorization": f"Bearer {TOKEN}"}
TINY = infer_json([{"name": "image", "datatype": "UINT8", "shape": [1, 4, 4, 1], "data": [7] * 16}])


def alive(proc: ServerProcess) -> bool:
    status, _, _ = call(f"{proc.http_url}/v2/models/tiny/infer", "POST", TINY, AUTH)
    return status == 200


def test_token_is_required_but_health_stays_open(small: ServerProcess) -> None:
    url = f"{small.http_url}/v2/models/tiny/infer"
    status, headers, body = call(url, "POST", TINY)
    assert status == 401 and "missing" in error_of(body) and headers["WWW-Authenticate"] == "Bearer"
    status, _, body = call(url, "POST", TINY, {"Authorization": "Bearer wrong"})
    assert status == 401 and "invalid bearer token" in error_of(body)
    assert call(f"{small.http_url}/v2/health/ready")[0] == 200
    assert call(f"{small.http_url}/openapi.json")[0] == 200
    assert call(f"{small.http_url}/v1/models")[0] == 401
    assert alive(small)


def test_body_over_the_limit_is_413(small: ServerProcess) -> None:
    url = f"{small.http_url}/v2/models/tiny/infer"
    status, _, body = call(url, "POST", b"x" * (1024 * 1024 + 1), AUTH)
    assert status == 413 and "over the limit of 1,048,576" in error_of(body)
    # Without a Content-Length (chunked): cut off as it arrives.
    conn = http.client.HTTPConnection("127.0.0.1", small.http_port, timeout=30)
    chunks = (b"x" * 65536 for _ in range(40))
    conn.request("POST", "/v2/models/tiny/infer", body=chunks, headers=AUTH, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and "over the limit" in error_of(response.read())
    conn.close()
    assert alive(small)


def test_slow_body_is_answered_408_and_the_server_goes_on(small: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", small.http_port), timeout=30) as sock:
        sock.sendall(
            b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(TINY)}\r\n\r\n".encode()
            + TINY[:10]
        )
        # Other clients are answered while this one dawdles.
        assert alive(small)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer
    assert "did not arrive within 1 s" in error_of(body)
    assert alive(small)


def test_overload_is_refused_503_before_the_body_is_read(small: ServerProcess) -> None:
    """A body on its way holds twice its declared length of the budget from its headers on:
    600 kB declared, 1.2 MB held of the 1 MiB budget (it alone may pass it), so the next
    request is refused unread, and answered at once, while the first one still dawdles."""
    with socket.create_connection(("127.0.0.1", small.http_port), timeout=30) as sock:
        sock.sendall(
            b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {TOKEN}\r\nContent-Length: 600000\r\n\r\n".encode()
        )
        deadline = time.monotonic() + 30  # until the server holds the reservation
        while scrape(small.metrics_port).total("cnnserve_inflight_bytes") < 1_200_000:
            assert time.monotonic() < deadline, "the reservation was never held"
            time.sleep(0.05)
        status, headers, body = call(f"{small.http_url}/v2/models/tiny/infer", "POST", TINY, AUTH)
        assert status == 503, body
        assert headers["Retry-After"] == "1" and "--max-inflight-mb" in error_of(body)
        while sock.recv(65536):  # the slow one: 408 once its read timeout passes
            pass
    assert alive(small)
    counted = scrape(small.metrics_port)
    assert counted.total("cnnserve_rejected_total", reason="memory") >= 1


# ------------------------------------------------------------------ the OpenAPI document


def test_openapi_document_and_server_routes_agree(rest: ServerProcess) -> None:
    status, _, body = call(f"{rest.http_url}/openapi.json")
    assert status == 200
    doc = json.loads(body)
    documented = {
        (method.upper(), path.replace("{model_name}", "{model}").replace("{model_version}", "{v}"))
        for path, ops in doc["paths"].items()
        for method in ops
    }
    api = RestApi(
        DataPlane(None, Limits()),  # type: ignore[arg-type]  # routes only, nothing is called
        Metrics(),
        ready=lambda: True,
        admission=None,  # type: ignore[arg-type]
        limits=RestLimits(1, 1.0),
        token=None,
        version="test",
    )
    assert routes_of(api.app()) == documented


def test_schemathesis_finds_no_server_error(rest: ServerProcess) -> None:
    """A short fuzz from the document (the long one is `make fuzz`): no 5xx but 503."""
    import subprocess

    from harness import PYTHON, ROOT

    done = subprocess.run(
        [PYTHON, "-m", "harness.fuzz_rest", "--url", rest.http_url, "--max-examples", "5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert call(f"{rest.http_url}/v2/health/ready")[0] == 200


# ------------------------------------------------------------------ the README's curl examples


def readme_console_steps() -> list[tuple[str, str]]:
    """(command, shown output) of every `$ ` line of the README's console blocks that talk to
    the REST port."""
    from harness import ROOT

    text = (ROOT / "README.md").read_text()
    steps: list[tuple[str, str]] = []
    for block in text.split("```console\n")[1:]:
        body = block.split("```", 1)[0]
        if "localhost:8000" not in body:
            continue
        for chunk in body.split("$ ")[1:]:
            command, _, output = chunk.partition("\n")
            steps.append((command, output))
    return steps


def skeleton(value: Any) -> Any:
    """A JSON value with what differs from model to model masked: numbers, numeric strings,
    labels, classification strings and the versions a repository holds; keys, lengths, types
    and every other string kept."""
    if isinstance(value, dict):
        masked = {"label", "versions"}
        return {k: f"<{k}>" if k in masked else skeleton(v) for k, v in value.items()}
    if isinstance(value, list):
        return [skeleton(v) for v in value]
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return "<number>"
    if isinstance(value, str) and (value.isdigit() or value.count(":") == 2):
        return "<masked>"
    return value


def test_readme_curl_examples_run_as_shown(
    rest: ServerProcess, tmp_path: Path, test_images: tuple[np.ndarray, np.ndarray]
) -> None:
    import subprocess

    x, y = test_images
    for label, name in ((9, "ankle-boot.png"), (1, "trouser.png")):
        Image.fromarray(x[int(np.flatnonzero(y == label)[0]), :, :, 0], mode="L").save(
            tmp_path / name
        )
    steps = readme_console_steps()
    assert len(steps) >= 5, steps
    for command, shown in steps:
        assert "curl" in command or "python3" in command, command
        done = subprocess.run(
            ["bash", "-c", command.replace("localhost:8000", f"127.0.0.1:{rest.http_port}")],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, (command, done.stderr)
        if not shown.strip():
            assert not done.stdout.strip(), (command, done.stdout)
            continue
        if shown.lstrip().startswith("{"):
            assert skeleton(json.loads(done.stdout)) == skeleton(json.loads(shown)), command
        else:
            assert done.stdout == shown, command
