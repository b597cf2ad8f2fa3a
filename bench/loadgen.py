"""What the serving benchmark sends and how: request bodies, the real answers the echo server
replays, and the load generators (h2load, perf_analyzer), each run checked for what it got."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import resource
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from harness import PYTHON, ROOT, Child, ProcessFailed, free_port
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.inference import grpc_predict_v2_pb2 as v2

BENCH = ROOT / "bench"
PREDICT = "/cnnserve.v1.CnnServe/Predict"
V2 = "/inference.GRPCInferenceService/"
MODEL_INFER = V2 + "ModelInfer"
MODEL_STREAM_INFER = V2 + "ModelStreamInfer"
APIS = {"cnnserve": PREDICT, "v2": MODEL_INFER}
ECHO_STATUS = "/cnnserve.bench.Echo/Answered"


class BenchError(SystemExit):
    """A run that cannot be trusted: the benchmark stops, loudly."""

    def __init__(self, message: str) -> None:
        super().__init__(f"\nBENCHMARK FAILED: {message}\n")


# ================================================================================== payloads


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message: compressed-flag 0, 4-byte big-endian length, body."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def request_bytes(api: str, model: str, input_name: str, x: np.ndarray, version: str = "") -> bytes:
    if api == "cnnserve":
        return pb.PredictRequest(
            model=model,
            images=pb.Tensor(dtype=pb.DATA_TYPE_FLOAT32, shape=x.shape, data=x.tobytes()),
        ).SerializeToString()
    request = v2.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name=input_name, datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request.SerializeToString()


@dataclass(frozen=True)
class RestAnswer:
    """The real server's answer to a REST request, which the echo server sends back."""

    body: bytes
    header_length: int | None  # binary tensor extension: where the JSON ends; None: JSON only


GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")


@dataclass(frozen=True)
class Call:
    """What h2load sends to one target at one batch size, and how its answers are checked."""

    url: str
    payload: Path
    headers: tuple[str, ...] = GRPC_HEADERS
    h1: bool = False  # HTTP/1.1 (keep-alive) instead of HTTP/2
    answer_bytes: int | None = None  # HTTP/1.1: every answer's body has exactly this size


def rest_request(kind: str, input_name: str, x: np.ndarray) -> tuple[bytes, tuple[str, ...]]:
    """A KServe v2 REST infer body and its headers. binary: Triton's binary tensor extension as
    tritonclient.http sends it with binary_data=True (a JSON header, then the tensor's raw
    bytes; the output asked back as raw bytes too); json: the tensor as JSON numbers, answered
    as JSON."""
    tensor: dict[str, object] = {"name": input_name, "datatype": "FP32", "shape": list(x.shape)}
    if kind == "json":
        body = json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()
        return body, ("content-type: application/json",)
    head = json.dumps({
        "inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
        "parameters": {"binary_data_output": True},
    }).encode()  # fmt: skip
    return head + x.tobytes(), (
        "content-type: application/octet-stream",
        f"inference-header-content-length: {len(head)}",
    )


def real_rest_response(
    url: str, body: bytes, headers: Sequence[str], expected: np.ndarray
) -> RestAnswer:
    """The server's REST answer to `body`, checked: 200, and the same probabilities as its
    gRPC ModelInfer answer to the same input (`expected`), or the benchmark fails."""
    request = urllib.request.Request(
        url, data=body, method="POST", headers=dict(h.split(": ", 1) for h in headers)
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer: bytes = response.read()
            length = response.headers.get("Inference-Header-Content-Length")
    except urllib.error.HTTPError as exc:
        raise BenchError(f"{url}: HTTP {exc.code}: {exc.read()[:500]!r}") from None
    n = int(length) if length is not None else len(answer)
    output = json.loads(answer[:n])["outputs"][0]
    if length is not None:
        got = np.frombuffer(answer[n:], dtype="<f4")
    else:
        got = np.asarray(output["data"], dtype=np.float32)
    if got.size != expected.size or not np.allclose(
        got.reshape(expected.shape), expected, rtol=1e-5, atol=1e-6
    ):
        raise BenchError(f"{url}: the REST answer differs from the gRPC one: {answer[:300]!r}")
    return RestAnswer(answer, None if length is None else n)


def real_response(target: str, method: str, body: bytes) -> bytes:
    """The server's serialized answer to `body` (what the echo server will send back)."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(method, None, None)  # bytes in, bytes out
        response: bytes = call(body, timeout=30)
    return response


def real_stream_response(target: str, method: str, body: bytes) -> bytes:
    """The server's serialized answer to `body` as the one message of a ModelStreamInfer
    stream (the echo server sends it back with each request's id spliced in)."""
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(method, None, None)  # bytes in, bytes out
        answers: list[bytes] = list(call(iter([body]), timeout=30))
    if len(answers) != 1 or v2.ModelStreamInferResponse.FromString(answers[0]).error_message:
        raise BenchError(f"{method}: expected one answer without error, got {answers!r:.300}")
    return answers[0]


# ================================================================================== the echo server


def start_echo(
    workdir: Path,
    tag: str,
    *,
    response: bytes | None = None,
    unary: dict[str, bytes] | None = None,
    streams: dict[str, bytes] | None = None,
    http: dict[str, RestAnswer] | None = None,
    http_port: int = 0,
    parse: bool = False,
) -> tuple[Child, int]:
    """bench/echo_server.py answering with canned bytes: `response` to any unary method not
    in `unary` (h2load posts to one path), `unary[method]` to that method, and each message of
    a `streams[method]` stream with those bytes (the request's id copied in); over HTTP/1.1 on
    `http_port`, a POST to a path of `http` with the real server's answer to it. `parse`: the
    inference methods parse each request and build their answer (echo_server.py --parse)."""
    port = free_port()
    cmd = [PYTHON, str(BENCH / "echo_server.py"), "--port", str(port)]
    if parse:
        cmd.append("--parse")
    for i, (route, answer) in enumerate((http or {}).items()):
        body_file = workdir / f"echo{tag}-http{i}.bin"
        body_file.write_bytes(answer.body)
        length = "" if answer.header_length is None else f"@{answer.header_length}"
        cmd += ["--http", f"{route}={body_file}{length}"]
    if http_port:
        cmd += ["--http-port", str(http_port)]
    if response is not None:
        path = workdir / f"echo-response{tag}.bin"
        path.write_bytes(response)
        cmd += ["--response", str(path)]
    for flag, canned in (("--unary", unary or {}), ("--stream", streams or {})):
        for method, body in canned.items():
            path = workdir / f"echo{tag}-{method.rsplit('/', 1)[1]}.bin"
            path.write_bytes(body)
            cmd += [flag, f"{method}={path}"]
    proc = Child(cmd, workdir / f"echo-server{tag}.log", name="echo server")
    try:
        proc.wait_logged(f"port {port}", timeout=30)
    except ProcessFailed as exc:
        proc.stop()
        raise BenchError(f"echo server did not start: {exc}") from None
    return proc, port


def echo_status(port: int) -> dict[str, object]:
    """The echo server's counts: {"answered": {method: messages}, "streams": open now}."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        raw: bytes = channel.unary_unary(ECHO_STATUS, None, None)(b"", timeout=10)
    status: dict[str, object] = json.loads(raw)
    return status


# ================================================================================== load generators


@dataclass
class LoadResult:
    requests: int
    succeeded: int
    seconds: float
    latencies_ms: list[float]
    cpu_s: float  # user + system of h2load
    output: str


def wait_sampling(
    proc: subprocess.Popen[bytes],
    sample: Callable[[], None],
    every: float,
    timeout: float | None = None,
) -> resource.struct_rusage:
    """Wait for `proc`, calling `sample` every `every` seconds meanwhile (the first time
    `every` seconds after the start); its rusage. Past `timeout` seconds it is killed (a load
    generator whose server died can wait for answers forever) and BenchError raised."""
    next_sample = time.perf_counter() + every
    give_up = None if timeout is None else time.perf_counter() + timeout
    while True:
        if give_up is not None and time.perf_counter() > give_up:
            proc.kill()
            proc.wait()
            raise BenchError(f"{proc.args!r} did not finish within {timeout:.0f} s: killed")
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage
        if time.perf_counter() >= next_sample:
            sample()
            next_sample = time.perf_counter() + every
        time.sleep(min(every, 0.05))


def h2load(
    url: str,
    payload: Path,
    requests: int,
    concurrency: int,
    log_path: Path,
    *,
    sample: Child | None = None,
    headers: Sequence[str] = GRPC_HEADERS,
    h1: bool = False,
    answer_bytes: int | None = None,
) -> tuple[LoadResult, float]:
    """Closed loop: `concurrency` connections, each with one request in flight, until
    `requests` are answered (over HTTP/2, or HTTP/1.1 keep-alive with `h1`). With
    `answer_bytes`, the answers' bodies must add up to exactly that many bytes each. Returns
    the result and the largest VmRSS of `sample` seen."""
    cmd = [
        "h2load", "-n", str(requests), "-c", str(concurrency), "-m", "1", "-t", "1",
        "-d", str(payload), *[arg for h in headers for arg in ("-H", h)],
        *(["--h1"] if h1 else []), "--log-file", str(log_path), url,
    ]  # fmt: skip
    out_path = log_path.with_suffix(".out")
    log_path.unlink(missing_ok=True)  # h2load appends to its log file
    rss = 0.0

    def sample_rss() -> None:
        nonlocal rss
        if sample is not None:
            rss = max(rss, sample.memory_mb())

    with out_path.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        usage = wait_sampling(proc, sample_rss, every=0.05)
    text = out_path.read_text()
    if proc.returncode != 0:
        raise BenchError(f"h2load exited with {proc.returncode}: {' '.join(cmd)}\n{text}")
    finished = re.search(r"finished in ([\d.]+)(s|ms|us)", text)
    counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", text)
    if not finished or not counts:
        raise BenchError(f"cannot read h2load's output:\n{text}")
    scale = {"s": 1.0, "ms": 1e-3, "us": 1e-6}[finished.group(2)]
    latencies = [
        int(line.split("\t")[2]) / 1000.0
        for line in log_path.read_text().splitlines()
        if line.count("\t") >= 2
    ]
    result = LoadResult(
        requests=int(counts.group(2)),
        succeeded=int(counts.group(3)),
        seconds=float(finished.group(1)) * scale,
        latencies_ms=latencies,
        cpu_s=usage.ru_utime + usage.ru_stime,
        output=text,
    )
    if result.succeeded != requests or result.requests != requests or len(latencies) != requests:
        raise BenchError(
            f"h2load: {result.succeeded} of {requests} requests got HTTP 200, {len(latencies)} "
            f"logged ({url}):\n{text}"
        )
    if answer_bytes is not None:
        data = re.search(r"traffic: .*\((\d+)\) data", text)
        if not data or int(data.group(1)) != requests * answer_bytes:
            raise BenchError(
                f"h2load: answers of {requests} x {answer_bytes:,} bytes expected, "
                f"{data.group(1) if data else '?'} bytes of bodies came ({url}):\n{text}"
            )
    return result, rss


@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    lib: Path  # libcudart and libb64, for LD_LIBRARY_PATH
    version: str = ""

    def env(self) -> dict[str, str]:
        paths = [str(self.lib), os.environ.get("LD_LIBRARY_PATH", "")]
        return {**os.environ, "LD_LIBRARY_PATH": ":".join(p for p in paths if p)}


def setup_perf_analyzer() -> tuple[PerfAnalyzer | None, str]:
    """bench/perf_analyzer.sh --setup (idempotent; downloads once into the user's cache)."""
    try:
        done = subprocess.run(
            ["bash", str(BENCH / "perf_analyzer.sh"), "--setup"],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return None, "bench/perf_analyzer.sh --setup timed out"
    found = dict(
        line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("bin ", "lib "))
    )
    if done.returncode != 0 or "bin" not in found or "lib" not in found:
        return None, f"bench/perf_analyzer.sh --setup failed: {done.stderr.strip()[-500:]}"
    pa = PerfAnalyzer(Path(found["bin"]), Path(found["lib"]))
    shown = subprocess.run(
        [str(pa.binary), "--version"], capture_output=True, text=True, env=pa.env(), check=False
    )
    version = re.search(r"Version (\S+)", shown.stdout + shown.stderr)
    return PerfAnalyzer(pa.binary, pa.lib, version.group(1) if version else "?"), ""


@dataclass
class PaResult:
    requests: int  # in the measurement windows
    seconds: float  # of the measurement windows
    images_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_s: float  # user + system of perf_analyzer, its whole run
    output: str


def perf_analyzer(
    pa: PerfAnalyzer,
    *,
    target: str,
    model: str,
    version: str,
    batch: int,
    concurrency: int,
    streaming: bool,
    window_ms: int,
    log_path: Path,
    sample: Callable[[], None],
    protocol: str = "grpc",
) -> PaResult:
    """One perf_analyzer point: three time windows of `window_ms` (the first three are taken
    as stable whatever they show: --stability-percentage 1000, --max-trials 3), zero inputs.
    Streaming: concurrency N with --max-threads N is N streams, one message in flight on each
    (one stream per worker thread); unary: N threads, each with one synchronous call. `protocol`
    http (`-i http`, `target` the REST port): KServe v2 over HTTP with binary tensors."""
    csv_path = log_path.with_suffix(".csv")
    csv_path.unlink(missing_ok=True)
    cmd = [
        str(pa.binary), "-m", model, "-x", version, "-u", target, "-i", protocol,
        "-b", str(batch), "--input-data", "zero", "--concurrency-range", str(concurrency),
        "--measurement-mode", "time_windows", "-p", str(window_ms),
        "--stability-percentage", "1000", "--max-trials", "3", "-f", str(csv_path),
    ]  # fmt: skip
    if streaming:
        cmd += ["--streaming", "--max-threads", str(concurrency)]
    with log_path.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=pa.env())
        # Three windows of at most --max-trials 3 each, and generous room for start-up.
        usage = wait_sampling(
            proc,
            sample,
            every=min(1.0, max(0.05, window_ms / 2000)),
            timeout=60 + 20 * window_ms / 1000,
        )
    text = log_path.read_text()
    if proc.returncode != 0 or not csv_path.exists():
        raise BenchError(f"perf_analyzer exited with {proc.returncode}: {' '.join(cmd)}\n{text}")
    with csv_path.open() as f:
        row = next(csv.DictReader(f))
    count = re.search(r"Client:\s*\n\s*Request count: (\d+)", text)
    if count is None:
        raise BenchError(f"cannot read perf_analyzer's output:\n{text}")
    images_per_s = float(row["Inferences/Second"])
    requests = int(count.group(1))
    return PaResult(
        requests=requests,
        seconds=requests * batch / images_per_s if images_per_s else math.nan,
        images_per_s=images_per_s,
        p50_ms=float(row["p50 latency"]) / 1000,
        p99_ms=float(row["p99 latency"]) / 1000,
        cpu_s=usage.ru_utime + usage.ru_stime,
        output=text,
    )
