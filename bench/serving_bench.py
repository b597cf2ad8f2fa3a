"""Serving benchmark: cnnserve over gRPC against its two limits, measured in one run.

    make bench                                   # or: .venv/bin/python bench/serving_bench.py
    .venv/bin/python bench/serving_bench.py --models models --model mnist --duration 5
    .venv/bin/python bench/serving_bench.py --smoke --out /tmp/bench   # seconds, for the tests

What runs, one after the other (never two at once, so each has the machine to itself):
1. start-up: `python -m serving` over a repository of the one model, timed from process start
   to the health service's SERVING (polled), and its resident memory (VmRSS) once idle;
2. unary calls: the server over the whole models folder, loaded by `h2load` (nghttp2's native
   HTTP/2 load generator, so the client is not the bottleneck) posting pre-encoded gRPC frames
   to our `cnnserve.v1.CnnServe/Predict` and to the Open Inference Protocol's
   `inference.GRPCInferenceService/ModelInfer`: batch 1 at concurrency 1, 4, 16, 64 and batch 32
   at concurrency 1, 4 (concurrency C = C connections with one request in flight each);
3. streams: Triton's `perf_analyzer` (native, C++) on `ModelStreamInfer` with `--streaming`,
   batch 1 and 8 over 1, 16 and 64 streams, one message in flight on each (perf_analyzer opens
   one stream per worker thread and starts min(concurrency, --max-threads) threads, so
   --max-threads is set to the concurrency; the server's cnnserve_inflight_streams gauge,
   sampled during each run, is reported beside it), and the same tool on unary `ModelInfer` at
   the same points, so that streams are compared with unary calls by one load generator;
4. a do-nothing grpc.aio server (bench/echo_server.py) answering the same requests with the
   same response bytes, under the same load from the same tool (h2load for h2load's rows,
   perf_analyzer unary and streaming for perf_analyzer's): the floor of the Python gRPC stack;
5. REST: KServe v2 `POST /v2/models/{name}/infer` on the same server's HTTP/1.1 port, loaded by
   `h2load --h1` (keep-alive, one connection per request in flight) at the points of the gRPC
   h2load rows, with Triton's binary tensor extension (the FP32 tensor's raw bytes after a JSON
   header, as tritonclient.http sends it) and, at batch 1, JSON tensors; against h2load's gRPC
   ModelInfer row at the same point and an aiohttp route of the echo server (the HTTP floor);
6. ONNX Runtime in this process on the same model file, at each batch size: one session with
   the server's thread settings, one single-threaded session per core side by side, and at
   batch 1 one single-threaded session alone; the best is the ceiling the ratios are taken
   against.

h2load does not read grpc-status trailers, so every run is checked against the server's own
count: `cnnserve_requests_total{code="OK"}` (of the run's method and protocol, grpc or http) must
grow by exactly the number of requests sent, or the benchmark fails; a REST run must also get a
200 for each request and answers of exactly the size of the answer checked before (the same
probabilities as the gRPC answer to the same input); a perf_analyzer run must leave no other
code than OK and at least as many OK answers as it reports (it sends more than it measures). Server CPU comes from
/proc/<pid>/stat (utime + stime, all threads), the load generator's from its rusage. Outputs
(bench/results/ by default): results.csv, report.md, report.png, the server logs, h2load's
per-request logs and perf_analyzer's outputs; `--publish` copies the report and the plot to
bench/REPORT.md and bench/report.png.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import json
import math
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

import harness
from harness import free_port
from harness.server import terminate
from serving import config
from serving.core.runtime import ModelRuntime, RuntimeOptions
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.inference import grpc_predict_v2_pb2 as v2

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_MB = 1024 * 1024

PREDICT = "/cnnserve.v1.CnnServe/Predict"
V2 = "/inference.GRPCInferenceService/"
MODEL_INFER = V2 + "ModelInfer"
MODEL_STREAM_INFER = V2 + "ModelStreamInfer"
APIS = {"cnnserve": PREDICT, "v2": MODEL_INFER}
METHOD_NAME = {PREDICT: "Predict", MODEL_INFER: "ModelInfer"}
REST_INFER = re.compile(r"/v2/models/[^/]+(/versions/\d+)?/infer")
ECHO_STATUS = "/cnnserve.bench.Echo/Answered"
# perf_analyzer's rows: target -> (streaming, the echo target it is compared with)
PA_TARGETS = {"v2 pa": (False, "echo pa"), "v2 stream": (True, "echo stream")}
# REST rows (KServe v2 over HTTP/1.1, h2load --h1): target -> (body kind, its echo target)
REST_TARGETS = {"rest": ("binary", "echo http"), "rest json": ("json", "echo http json")}
REST_KINDS = {kind: target for target, (kind, _) in REST_TARGETS.items()}
H1 = "h2load --h1"  # the REST rows' load generator, as named in the table
ECHO_TARGETS = ("echo", "echo pa", "echo stream", "echo http", "echo http json")


class BenchError(SystemExit):
    """A run that cannot be trusted: the benchmark stops, loudly."""

    def __init__(self, message: str) -> None:
        super().__init__(f"\nBENCHMARK FAILED: {message}\n")


# ================================================================================== processes


class Process:
    """A child process we measure through /proc."""

    def __init__(
        self,
        cmd: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.cmd = list(cmd)
        self.log_path = log_path
        self.started = time.perf_counter()
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tree(self) -> list[int]:
        """This process and its descendants (the workers of `--workers N`)."""
        pids, i = [self.pid], 0
        while i < len(pids):
            for task in Path(f"/proc/{pids[i]}/task").glob("*/children"):
                with contextlib.suppress(OSError):
                    pids += [int(c) for c in task.read_text().split()]
            i += 1
        return pids

    def cpu_seconds(self) -> float:
        """utime + stime of the process and its descendants (every thread), in seconds."""
        total = 0
        for pid in self.tree():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                parts = stat[stat.rindex(")") + 2 :].split()
                total += int(parts[11]) + int(parts[12])
        return total / CLK_TCK

    def memory_mb(self, key: str = "VmRSS") -> float:
        """VmRSS (or another /proc/<pid>/status figure) of the process and its descendants."""
        total = 0
        for pid in self.tree():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
        return total / 1024 if total else math.nan

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(
                f"{self.cmd[:4]} exited with {self.proc.returncode}:\n{self.logs()[-3000:]}"
            )

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> None:
        terminate(self.proc, timeout)
        self._log.close()


def wait_serving(target: str, proc: Process, timeout: float, interval: float = 0.005) -> float:
    """Poll the health service until SERVING; returns seconds since the process started."""
    deadline = time.perf_counter() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.perf_counter() < deadline:
            proc.check_alive()
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter() - proc.started
            except grpc.RpcError:
                pass
            time.sleep(interval)
    raise BenchError(f"server not SERVING within {timeout:.0f}s:\n{proc.logs()[-3000:]}")


def start_server(
    repository: Path,
    server_args: Sequence[str],
    log_path: Path,
    root: Path = ROOT,
    *,
    http_port: int = 0,
) -> tuple[Process, int, int]:
    """`python -m serving` run from `root` (another checkout's `serving` package, for A/B).
    The REST port is always given (0: off): the server's default one would clash between the
    servers a run starts."""
    port, metrics_port = free_port(), free_port()
    cmd = [
        PYTHON, "-m", "serving", "--model-repository", str(repository), "--host", "127.0.0.1",
        "--port", str(port), "--metrics-port", str(metrics_port), "--http-port", str(http_port),
        "--poll-seconds", "0", "--log-level", "warning", *server_args,
    ]  # fmt: skip
    return Process(cmd, log_path, cwd=root), port, metrics_port


def start_echo(
    workdir: Path,
    tag: str,
    *,
    response: bytes | None = None,
    unary: dict[str, bytes] | None = None,
    streams: dict[str, bytes] | None = None,
    http: dict[str, RestAnswer] | None = None,
    http_port: int = 0,
) -> tuple[Process, int]:
    """bench/echo_server.py answering with canned bytes: `response` to any unary method not
    in `unary` (h2load posts to one path), `unary[method]` to that method, and each message of
    a `streams[method]` stream with those bytes (the request's id copied in); over HTTP/1.1 on
    `http_port`, a POST to a path of `http` with the real server's answer to it."""
    port = free_port()
    cmd = [PYTHON, str(BENCH / "echo_server.py"), "--port", str(port)]
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
    proc = Process(cmd, workdir / f"echo-server{tag}.log")
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline:
        proc.check_alive()
        if f"port {port}" in proc.logs():
            return proc, port
        time.sleep(0.02)
    raise BenchError("echo server did not start")


def echo_status(port: int) -> dict[str, object]:
    """The echo server's counts: {"answered": {method: messages}, "streams": open now}."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        raw: bytes = channel.unary_unary(ECHO_STATUS, None, None)(b"", timeout=10)
    status: dict[str, object] = json.loads(raw)
    return status


# ================================================================================== metrics


def scrape(metrics_port: int) -> dict[tuple[str, ...], float]:
    """The samples the checks read: requests by (method, code, protocol), batch-size sum and
    count."""
    metrics = harness.scrape(metrics_port)
    out: dict[tuple[str, ...], float] = {
        ("requests", method, code, protocol): value
        for (method, code, protocol), value in metrics.by(
            "cnnserve_requests_total", "method", "code", "protocol"
        ).items()
    }
    for name in ("cnnserve_batch_size_sum", "cnnserve_batch_size_count"):
        out[(name,)] = metrics.total(name)
    return out


def open_streams(metrics_port: int, method: str) -> float:
    """`cnnserve_inflight_streams{method=...}` now."""
    value = harness.scrape(metrics_port).get("cnnserve_inflight_streams", method=method)
    return math.nan if value is None else value


def established(port: int) -> int:
    """TCP connections established to 127.0.0.1:`port` now: the server's ends, from
    /proc/net/tcp and tcp6 (gRPC's sockets are IPv6 ones with IPv4-mapped addresses)."""
    local = {f"0100007F:{port:04X}", f"0000000000000000FFFF00000100007F:{port:04X}"}
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                parts = line.split(None, 4)
                if parts[1] in local and parts[3] == "01":
                    count += 1
    return count


def delta(
    after: dict[tuple[str, ...], float], before: dict[tuple[str, ...], float]
) -> dict[tuple[str, ...], float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}


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


# ================================================================================== results


@dataclass
class Point:
    # cnnserve | v2 | <api>-<variant> | echo (h2load, unary); v2 pa | echo pa (perf_analyzer,
    # unary); v2 stream | echo stream (perf_analyzer, ModelStreamInfer); in-process (ORT's
    # threads) | in-process 1t (one single-threaded session) | in-process xN (N such sessions)
    target: str
    batch: int
    concurrency: int  # requests in flight (for streams: streams, one message in flight on each)
    loadgen: str = "-"  # h2load | perf_analyzer | - (in-process)
    streams: float = math.nan  # most streams open at once during the run (the server's gauge)
    connections: float = math.nan  # most TCP connections to the target during the run
    requests: int = 0
    seconds: float = 0.0
    images_per_s: float = 0.0
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    mean_batch: float = math.nan  # images per ONNX Runtime run, from the server's histogram
    server_cpu_us_per_image: float = math.nan
    server_cores: float = math.nan  # average CPU cores the server (or in-process ORT) used
    loadgen_cores: float = math.nan
    loadgen_cpu_us_per_request: float = math.nan
    rss_mb_max: float = math.nan
    vs_in_process: float = math.nan
    vs_echo: float = math.nan
    vs_unary: float = math.nan  # stream rows: over perf_analyzer's unary row at the same point
    vs_grpc: float = math.nan  # REST rows: over h2load's gRPC v2 (else cnnserve) row, same point


@dataclass
class Report:
    started: str
    settings: dict[str, object]
    points: list[Point] = field(default_factory=list)
    startup_s: list[float] = field(default_factory=list)
    idle_rss_one_model_mb: float = math.nan
    idle_rss_mb: float = math.nan
    load_rss_mb: float = math.nan
    load_hwm_mb: float = math.nan
    loadavg_start: str = ""
    loadavg_end: str = ""
    notes: list[str] = field(default_factory=list)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else math.nan


# ================================================================================== load generator


@dataclass
class LoadResult:
    requests: int
    succeeded: int
    seconds: float
    latencies_ms: list[float]
    cpu_s: float  # user + system of h2load
    output: str


def wait_sampling(
    proc: subprocess.Popen[bytes], sample: Callable[[], None], every: float
) -> resource.struct_rusage:
    """Wait for `proc`, calling `sample` every `every` seconds meanwhile (the first time
    `every` seconds after the start); its rusage."""
    next_sample = time.perf_counter() + every
    while True:
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
    sample: Process | None = None,
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
) -> PaResult:
    """One perf_analyzer point: three time windows of `window_ms` (the first three are taken
    as stable whatever they show: --stability-percentage 1000, --max-trials 3), zero inputs.
    Streaming: concurrency N with --max-threads N is N streams, one message in flight on each
    (one stream per worker thread); unary: N threads, each with one synchronous call."""
    csv_path = log_path.with_suffix(".csv")
    csv_path.unlink(missing_ok=True)
    cmd = [
        str(pa.binary), "-m", model, "-x", version, "-u", target, "-i", "grpc",
        "-b", str(batch), "--input-data", "zero", "--concurrency-range", str(concurrency),
        "--measurement-mode", "time_windows", "-p", str(window_ms),
        "--stability-percentage", "1000", "--max-trials", "3", "-f", str(csv_path),
    ]  # fmt: skip
    if streaming:
        cmd += ["--streaming", "--max-threads", str(concurrency)]
    with log_path.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=pa.env())
        usage = wait_sampling(proc, sample, every=min(1.0, max(0.05, window_ms / 2000)))
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


# ================================================================================== runs


def call_of(url: str) -> tuple[str, str]:
    """The server's method and protocol labels of the calls h2load makes to `url`."""
    path = url[url.index("/", len("http://")) :]
    if path in METHOD_NAME:
        return METHOD_NAME[path], "grpc"
    if REST_INFER.fullmatch(path):
        return "ModelInfer", "http"
    raise BenchError(f"{url}: no server method known for this path")


@dataclass
class Options:
    duration: float
    warmup: float
    out: Path


class Runner:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.logs = options.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def load(
        self,
        target: str,
        *,
        call: Call,
        batch: int,
        concurrency: int,
        proc: Process,
        metrics_port: int | None,
    ) -> Point:
        """Warm up (which also sizes the measured run), then measure one point."""
        tag = f"{target.replace(' ', '-')}-b{batch}-c{concurrency}"
        warm_n = max(concurrency * 4, 40 if batch == 1 else 8)
        warm, _ = self._run(call, warm_n, concurrency, tag + "-warmup", proc=proc,
                            metrics_port=metrics_port)  # fmt: skip
        rate = warm.requests / max(warm.seconds, 1e-3)
        if self.options.warmup > warm.seconds:  # warm up for at least --warmup seconds
            extra = int(rate * (self.options.warmup - warm.seconds))
            if extra > concurrency:
                warm, _ = self._run(call, extra, concurrency, tag + "-warmup2", proc=proc,
                                    metrics_port=metrics_port)  # fmt: skip
                rate = warm.requests / max(warm.seconds, 1e-3)
        n = max(concurrency * 10, int(rate * self.options.duration))
        before_cpu = proc.cpu_seconds()
        before = scrape(metrics_port) if metrics_port else {}
        result, rss = self._run(call, n, concurrency, tag, proc=proc, metrics_port=None,
                                sample=proc)  # fmt: skip
        cpu = proc.cpu_seconds() - before_cpu
        loadgen = H1 if call.h1 else "h2load"
        point = Point(target, batch, concurrency, loadgen=loadgen, connections=concurrency)
        if metrics_port:
            d = delta(scrape(metrics_port), before)
            self._check(d, call.url, n)
            if d.get(("cnnserve_batch_size_count",)):
                point.mean_batch = (
                    d[("cnnserve_batch_size_sum",)] / d[("cnnserve_batch_size_count",)]
                )
        images = result.requests * batch
        point.requests = result.requests
        point.seconds = result.seconds
        point.images_per_s = images / result.seconds
        point.p50_ms = percentile(result.latencies_ms, 50)
        point.p99_ms = percentile(result.latencies_ms, 99)
        point.server_cpu_us_per_image = cpu / images * 1e6
        point.server_cores = cpu / result.seconds
        point.loadgen_cores = result.cpu_s / result.seconds
        point.loadgen_cpu_us_per_request = result.cpu_s / result.requests * 1e6
        point.rss_mb_max = rss
        print(
            f"  {tag:<22} {point.images_per_s:>9,.0f} img/s  p50 {point.p50_ms:6.2f} ms  "
            f"p99 {point.p99_ms:6.2f} ms  server {point.server_cores:.2f} cores  "
            f"{loadgen} {point.loadgen_cores:.2f} cores  batch {point.mean_batch:.1f}",
            flush=True,
        )
        return point

    def _run(
        self,
        call: Call,
        n: int,
        concurrency: int,
        tag: str,
        *,
        proc: Process,
        metrics_port: int | None,
        sample: Process | None = None,
    ) -> tuple[LoadResult, float]:
        before = scrape(metrics_port) if metrics_port else {}
        result = h2load(
            call.url, call.payload, n, concurrency, self.logs / f"h2load-{tag}.log",
            sample=sample, headers=call.headers, h1=call.h1, answer_bytes=call.answer_bytes,
        )  # fmt: skip
        proc.check_alive()
        if metrics_port:
            self._check(delta(scrape(metrics_port), before), call.url, n)
        return result

    @staticmethod
    def _check(d: dict[tuple[str, ...], float], url: str, sent: int) -> None:
        """Every request sent must be counted OK by the server, under the protocol it came
        by, and nothing else."""
        method, protocol = call_of(url)
        key = ("requests", method, "OK", protocol)
        ok = d.get(key, 0.0)
        other = {k: v for k, v in d.items() if k[0] == "requests" and k != key}
        if ok != sent or other:
            raise BenchError(
                f"{url}: sent {sent} requests, the server counted {ok:.0f} {method} OK "
                f"over {protocol}"
                + (f" and also {other}" if other else "")
                + " (cnnserve_requests_total): answers were not all successful"
            )

    def load_pa(
        self,
        target: str,
        *,
        pa: PerfAnalyzer,
        port: int,
        model: str,
        version: str,
        batch: int,
        concurrency: int,
        proc: Process,
        metrics_port: int | None,
    ) -> Point:
        """One perf_analyzer point on the server (`metrics_port` given: its counts are checked)
        or on the echo server (its own counts)."""
        streaming = target.endswith("stream")
        method = "ModelStreamInfer" if streaming else "ModelInfer"
        tag = f"{target.replace(' ', '-')}-b{batch}-c{concurrency}"
        rss, streams, connections = 0.0, 0.0, 0

        def sample() -> None:  # at most once a second: a scrape costs the server some CPU
            nonlocal rss, streams, connections
            rss = max(rss, proc.memory_mb())
            connections = max(connections, established(port))
            if streaming:
                now = (
                    open_streams(metrics_port, method)
                    if metrics_port
                    else float(echo_status(port)["streams"])  # type: ignore[arg-type]
                )
                streams = max(streams, now)

        before_cpu = proc.cpu_seconds()
        before = scrape(metrics_port) if metrics_port else {}
        echo_before = self._echo_answered(port) if not metrics_port else {}
        result = perf_analyzer(
            pa,
            target=f"127.0.0.1:{port}",
            model=model,
            version=version,
            batch=batch,
            concurrency=concurrency,
            streaming=streaming,
            window_ms=max(100, round(self.options.duration * 1000 / 3)),
            log_path=self.logs / f"pa-{tag}.out",
            sample=sample,
        )
        cpu = proc.cpu_seconds() - before_cpu
        proc.check_alive()
        point = Point(target, batch, concurrency, loadgen="perf_analyzer")
        if metrics_port:
            d = delta(scrape(metrics_port), before)
            served = self._check_served(d, method, result.requests, target)
            if d.get(("cnnserve_batch_size_count",)):
                point.mean_batch = (
                    d[("cnnserve_batch_size_sum",)] / d[("cnnserve_batch_size_count",)]
                )
        else:
            answered = self._echo_answered(port)
            served = answered.get(V2 + method, 0) - echo_before.get(V2 + method, 0)
            if served < result.requests:
                raise BenchError(
                    f"{target}: perf_analyzer counted {result.requests} answers, the echo "
                    f"server sent {served}"
                )
        # CPU over the whole perf_analyzer run, divided by what was served in it (it sends
        # before and after its windows too); cores: that CPU per image at the windows' rate.
        images = served * batch
        point.requests = result.requests
        point.seconds = result.seconds
        point.images_per_s = result.images_per_s
        point.p50_ms, point.p99_ms = result.p50_ms, result.p99_ms
        point.server_cpu_us_per_image = cpu / images * 1e6
        point.server_cores = cpu / images * result.images_per_s
        point.loadgen_cpu_us_per_request = result.cpu_s / served * 1e6
        point.loadgen_cores = result.cpu_s / served * result.images_per_s / batch
        point.rss_mb_max = rss
        point.connections = connections
        if streaming:
            point.streams = streams
        print(
            f"  {tag:<22} {point.images_per_s:>9,.0f} img/s  p50 {point.p50_ms:6.2f} ms  "
            f"p99 {point.p99_ms:6.2f} ms  server {point.server_cores:.2f} cores  "
            f"perf_analyzer {point.loadgen_cores:.2f} cores  batch {point.mean_batch:.1f}"
            + (f"  streams {streams:.0f}" if streaming else "")
            + f"  connections {connections}",
            flush=True,
        )
        return point

    @staticmethod
    def _echo_answered(port: int) -> dict[str, int]:
        answered = echo_status(port)["answered"]
        assert isinstance(answered, dict)
        return {str(k): int(v) for k, v in answered.items()}

    @staticmethod
    def _check_served(
        d: dict[tuple[str, ...], float], method: str, reported: int, target: str
    ) -> int:
        """perf_analyzer's run: every call the server counted was OK (its metadata, config and
        statistics calls too), and it counted at least the answers perf_analyzer measured."""
        ok = d.get(("requests", method, "OK", "grpc"), 0.0)
        failed = {k: v for k, v in d.items() if k[0] == "requests" and k[2] != "OK"}
        if failed or ok < reported or not reported:
            raise BenchError(
                f"{target}: perf_analyzer measured {reported} answers, the server counted "
                f"{ok:.0f} {method} OK"
                + (f" and also {failed}" if failed else "")
                + " (cnnserve_requests_total): answers were not all successful"
            )
        return int(ok)


def in_process(
    model_path: Path,
    options: RuntimeOptions,
    x: np.ndarray,
    *,
    sessions: int,
    seconds: float,
    single_threaded: bool = False,
) -> Point:
    """ONNX Runtime alone: `sessions` threads, each running its own session in a loop (with
    several sessions, each on one thread: the best of ONNX Runtime on this machine, and so the
    ceiling the server's ratios are taken against). One session has the server's thread
    settings, or one intra-op thread with `single_threaded`."""
    batch = len(x)
    threads_each = options.intra_op_threads if sessions == 1 and not single_threaded else 1
    runtimes = [
        ModelRuntime(model_path, RuntimeOptions(
            provider=options.provider, intra_op_threads=threads_each,
            inter_op_threads=options.inter_op_threads, warmup_batch_sizes=(batch,)))
        for _ in range(sessions)
    ]  # fmt: skip
    latencies: list[list[float]] = [[] for _ in runtimes]
    start = threading.Barrier(len(runtimes) + 1)
    stop = threading.Event()

    def loop(rt: ModelRuntime, lat: list[float]) -> None:
        for _ in range(20):
            rt.run(x)
        start.wait()
        while not stop.is_set():
            t0 = time.perf_counter()
            rt.run(x)
            lat.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=loop, args=(rt, lat)) for rt, lat in zip(runtimes, latencies, strict=True)]  # fmt: skip
    for t in threads:
        t.start()
    start.wait()
    cpu0, t0 = time.process_time(), time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    all_ms = [v * 1000 for lat in latencies for v in lat]
    runs = len(all_ms)
    target = (
        f"in-process x{sessions}"
        if sessions > 1
        else "in-process 1t"
        if single_threaded
        else "in-process"
    )
    point = Point(target, batch, sessions, requests=runs, seconds=elapsed)
    point.images_per_s = runs * batch / elapsed
    point.p50_ms, point.p99_ms = percentile(all_ms, 50), percentile(all_ms, 99)
    point.server_cpu_us_per_image = cpu / (runs * batch) * 1e6
    point.server_cores = cpu / elapsed
    point.mean_batch = batch
    print(
        f"  {target + f'-b{batch}':<22} {point.images_per_s:>9,.0f} img/s  "
        f"p50 {point.p50_ms:6.3f} ms  p99 {point.p99_ms:6.3f} ms  {point.server_cores:.2f} cores",
        flush=True,
    )
    return point


@contextlib.contextmanager
def one_model_repository(models: Path, model: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="cnnserve-bench-") as tmp:
        repo = Path(tmp) / "models"
        repo.mkdir()
        (repo / model).symlink_to((models / model).resolve())
        yield repo


def measure_startup(
    models: Path,
    model: str,
    server_args: Sequence[str],
    *,
    repeats: int,
    logs: Path,
    report: Report,
    root: Path = ROOT,
) -> None:
    with one_model_repository(models, model) as repo:
        for i in range(repeats):
            proc, port, _ = start_server(repo, server_args, logs / f"startup-{i}.log", root)
            try:
                seconds = wait_serving(f"127.0.0.1:{port}", proc, timeout=60)
                report.startup_s.append(seconds)
                if i == repeats - 1:
                    time.sleep(1.0)
                    report.idle_rss_one_model_mb = proc.memory_mb()
            finally:
                proc.stop()
    print(
        f"start-up to SERVING with one model: {', '.join(f'{s:.2f}' for s in report.startup_s)} s; "
        f"idle RSS {report.idle_rss_one_model_mb:.0f} MB",
        flush=True,
    )


def wait_quiet(limit: float, max_wait: float) -> None:
    if max_wait <= 0:
        return
    deadline = time.monotonic() + max_wait
    while float(loadavg().split()[0]) >= limit and time.monotonic() < deadline:
        print(f"load average {loadavg()}: waiting for it to fall below {limit}", flush=True)
        time.sleep(20)


# ================================================================================== report


def _is_echo(p: Point) -> bool:
    return p.target in ECHO_TARGETS


def _mode(p: Point) -> str:
    return "stream" if p.target.endswith("stream") else "unary"


def ordered(points: list[Point]) -> list[Point]:
    """Table order: h2load's rows (our APIs, the variants, echo; REST, its echo),
    perf_analyzer's (unary, then
    streams; ours, then echo), in-process; then batch and concurrency (the runs themselves are
    interleaved point by point)."""

    def rank(p: Point) -> tuple[int, str, int, int]:
        if p.target.startswith("in-process"):
            kind, name = 9, ""
        elif p.loadgen == "perf_analyzer":
            kind, name = 5 + _is_echo(p), {"unary": "0", "stream": "1"}[_mode(p)]
        elif p.loadgen == H1:
            kind, name = 3 + _is_echo(p), p.target
        elif _is_echo(p):
            kind, name = 2, ""
        elif p.target in APIS:
            kind, name = 0, {"cnnserve": "0", "v2": "1"}[p.target]
        else:
            kind, name = 1, p.target
        return (kind, name, p.batch, p.concurrency)

    return sorted(points, key=rank)


def echo_of(p: Point) -> str | None:
    """The echo target a row is compared with: the same load generator, protocol, kind of
    call and payloads."""
    if _is_echo(p) or p.target.startswith("in-process"):
        return None
    if p.target in PA_TARGETS:
        return PA_TARGETS[p.target][1]
    if p.target in REST_TARGETS:
        return REST_TARGETS[p.target][1]
    return "echo" if p.loadgen == "h2load" else None


def add_ratios(points: list[Point]) -> None:
    ceiling: dict[int, float] = {}
    for p in points:
        if p.target.startswith("in-process"):
            ceiling[p.batch] = max(ceiling.get(p.batch, 0.0), p.images_per_s)
    echo = {(p.target, p.batch, p.concurrency): p.images_per_s for p in points if _is_echo(p)}
    unary = {(p.batch, p.concurrency): p.images_per_s for p in points if p.target == "v2 pa"}
    grpc_api = "v2" if any(p.target == "v2" for p in points) else "cnnserve"
    grpc = {(p.batch, p.concurrency): p.images_per_s for p in points if p.target == grpc_api}
    for p in points:
        if p.target.startswith("in-process"):
            continue
        if p.batch in ceiling:
            p.vs_in_process = p.images_per_s / ceiling[p.batch]
        key = (echo_of(p), p.batch, p.concurrency)
        if key in echo:
            p.vs_echo = p.images_per_s / echo[key]
        if p.target == "v2 stream" and (p.batch, p.concurrency) in unary:
            p.vs_unary = p.images_per_s / unary[p.batch, p.concurrency]
        if p.target in REST_TARGETS and (p.batch, p.concurrency) in grpc:
            p.vs_grpc = p.images_per_s / grpc[p.batch, p.concurrency]


def write_csv(points: list[Point], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f.name for f in fields(Point)])
        for p in points:
            writer.writerow(
                [round(v, 4) if isinstance(v, float) else v for v in asdict(p).values()]
            )


def _fmt(value: float, spec: str, suffix: str = "") -> str:
    return "-" if math.isnan(value) else format(value, spec) + suffix


def markdown_table(points: list[Point]) -> str:
    head = (
        "| target | load gen. | batch | conc. | streams | conn. | images/s | p50 ms | p99 ms | "
        "mean server batch | server CPU µs/image | server cores | load-gen. cores | "
        "load-gen. CPU µs/request | vs in-process | vs echo | vs unary | vs gRPC |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for p in points:
        conc = f"{p.concurrency} sess." if p.target.startswith("in-process") else str(p.concurrency)
        rows.append(
            f"| {p.target} | {p.loadgen} | {p.batch} | {conc} | {_fmt(p.streams, '.0f')} | "
            f"{_fmt(p.connections, '.0f')} | {p.images_per_s:,.0f} | {_fmt(p.p50_ms, '.2f')} | "
            f"{_fmt(p.p99_ms, '.2f')} | {_fmt(p.mean_batch, '.1f')} | "
            f"{_fmt(p.server_cpu_us_per_image, '.0f')} | {_fmt(p.server_cores, '.2f')} | "
            f"{_fmt(p.loadgen_cores, '.2f')} | {_fmt(p.loadgen_cpu_us_per_request, '.0f')} | "
            f"{_fmt(p.vs_in_process * 100, '.0f', '%')} | {_fmt(p.vs_echo * 100, '.0f', '%')} | "
            f"{_fmt(p.vs_unary, '.2f', 'x')} | {_fmt(p.vs_grpc, '.2f', 'x')} |"
        )
    return head + "\n".join(rows) + "\n"


def _find(points: list[Point], target: str, batch: int, conc: int) -> Point | None:
    return next(
        (p for p in points if p.target == target and p.batch == batch and p.concurrency == conc),
        None,
    )


def targets(report: Report, apis: Sequence[str]) -> list[str]:
    """The issue's targets, each as one line: met or not, with the figures of this one run."""
    lines: list[str] = []
    pts = report.points

    def mark(ok: bool) -> str:
        return "met" if ok else "**not met**"

    served = [*apis, *sorted({p.target for p in pts if p.loadgen == "h2load"
                               and p.target not in apis and not _is_echo(p)})]  # fmt: skip
    best32 = max((p.images_per_s for p in pts
                  if p.target.startswith("in-process") and p.batch == 32), default=math.nan)  # fmt: skip
    for api in served:
        p = _find(pts, api, 32, 4)
        if p is not None:
            lines.append(
                f"- {api}, unary batch 32 at concurrency 4 ≥ 80% of in-process ONNX Runtime's "
                f"best ({best32:,.0f} images/s): {p.images_per_s:,.0f} images/s = "
                f"{p.vs_in_process:.0%} — {mark(p.vs_in_process >= 0.80)}"
            )
    stream = _find(pts, "v2 stream", 1, 16)
    if stream is not None:
        unary = _find(pts, "v2 pa", 1, 16)
        single = _find(pts, "in-process 1t", 1, 1)
        x_unary = stream.images_per_s / unary.images_per_s if unary else math.nan
        of_single = stream.images_per_s / single.images_per_s if single else math.nan
        ok = x_unary >= 3.0 and of_single >= 0.30 and stream.p99_ms <= 5.0
        lines.append(
            f"- batch 1 over 16 streams (ModelStreamInfer, perf_analyzer; {stream.streams:.0f} "
            "streams seen open) ≥ 3.0x our unary batch 1 at concurrency 16, ≥ 30% of one "
            f"single-threaded in-process session, p99 ≤ 5 ms: {stream.images_per_s:,.0f} "
            f"images/s = {x_unary:.2f}x unary ModelInfer under the same load generator "
            f"({unary.images_per_s if unary else math.nan:,.0f} images/s), "
            f"{of_single:.0%} of one single-threaded session "
            f"({single.images_per_s if single else math.nan:,.0f} images/s), p99 "
            f"{stream.p99_ms:.2f} ms — {mark(ok)}"
        )
        h2 = [(api, q) for api in apis if (q := _find(pts, api, 1, 16)) is not None]
        if h2:
            lines.append(
                "  - against h2load's unary rows at concurrency 16 instead (another load "
                "generator, for reference): "
                + ", ".join(
                    f"{api} {q.images_per_s:,.0f} images/s ({stream.images_per_s / q.images_per_s:.2f}x)"
                    for api, q in h2
                )
            )
    for api in served:
        p = _find(pts, api, 1, 16)
        e = _find(pts, "echo", 1, 16)
        if p is not None and e is not None:
            lines.append(
                f"- {api}, unary batch 1 at concurrency 16 ≥ 70% of the echo server's (h2load "
                f"both): {p.images_per_s:,.0f} against {e.images_per_s:,.0f} images/s = "
                f"{p.vs_echo:.0%} — {mark(p.vs_echo >= 0.70)}"
            )
    p, e = _find(pts, "v2 pa", 1, 16), _find(pts, "echo pa", 1, 16)
    if p is not None and e is not None:
        lines.append(
            "- v2, unary batch 1 at concurrency 16 ≥ 70% of the echo server's (perf_analyzer "
            f"both): {p.images_per_s:,.0f} against {e.images_per_s:,.0f} images/s = "
            f"{p.vs_echo:.0%} — {mark(p.vs_echo >= 0.70)}"
        )
    if report.startup_s:
        s = statistics.median(report.startup_s)
        lines.append(
            f"- ready ≤ 2 s after process start (one model): median {s:.2f} s "
            f"(max {max(report.startup_s):.2f}) — {mark(s <= 2)}"
        )
    if not math.isnan(report.idle_rss_one_model_mb):
        lines.append(
            f"- idle RSS ≤ 200 MB (one model): {report.idle_rss_one_model_mb:.0f} MB — "
            f"{mark(report.idle_rss_one_model_mb <= 200)}"
        )
    return lines


def rest_lines(report: Report) -> list[str]:
    """Each REST row's ratios in words: against gRPC, its echo floor and ONNX Runtime."""
    lines = []
    for p in report.points:
        if p.target not in REST_TARGETS:
            continue
        kind = REST_TARGETS[p.target][0]
        lines.append(
            f"- {kind}, batch {p.batch} at concurrency {p.concurrency}: "
            f"{p.images_per_s:,.0f} images/s = {_fmt(p.vs_grpc, '.2f', 'x')} gRPC ModelInfer, "
            f"{_fmt(p.vs_echo * 100, '.0f', '%')} of `{REST_TARGETS[p.target][1]}`, "
            f"{_fmt(p.vs_in_process * 100, '.0f', '%')} of in-process ONNX Runtime; "
            f"server {_fmt(p.server_cpu_us_per_image, '.0f')} µs CPU an image, p99 "
            f"{_fmt(p.p99_ms, '.2f')} ms"
        )
    return lines


def plot(points: list[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({p.batch for p in points})
    fig, axes = plt.subplots(len(batches), 2, figsize=(11, 4 * len(batches)), squeeze=False)
    styles = {"cnnserve": "o-", "v2": "s-", "echo": "^--", "v2 pa": "s:", "echo pa": "^:",
              "v2 stream": "D-", "echo stream": "v--", "rest": "P-", "echo http": "<--",
              "rest json": "X-", "echo http json": ">--"}  # fmt: skip
    styles.update({p.target: "d-." for p in points if "-w" in p.target})
    colors = {t: f"C{i % 10}" for i, t in enumerate(styles)}  # one colour per target throughout
    for row, batch in zip(axes, batches, strict=True):
        for target, style in styles.items():
            series = sorted(
                (p for p in points if p.target == target and p.batch == batch),
                key=lambda p: p.concurrency,
            )
            if not series:
                continue
            conc = [p.concurrency for p in series]
            row[0].plot(conc, [p.images_per_s for p in series], style, label=target,
                        color=colors[target])  # fmt: skip
            row[1].plot(conc, [p.p99_ms for p in series], style, label=target,
                        color=colors[target])  # fmt: skip
        for p in points:
            if p.target.startswith("in-process") and p.batch == batch:
                row[0].axhline(p.images_per_s, linestyle=":", color="grey")
                row[0].annotate(
                    f"{p.target} ({p.images_per_s:,.0f})",
                    (1, p.images_per_s),
                    fontsize=8,
                    color="grey",
                    va="bottom",
                )
        for ax, ylabel in zip(row, ["images/s", "p99 latency (ms)"], strict=True):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency (requests in flight; streams: one message each)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"batch {batch}: {ylabel.split(' ')[0]}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        row[0].set_ylim(bottom=0)
        row[1].set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: Report, apis: Sequence[str], command: str, path: Path) -> str:
    pts = report.points

    def cores(tool: str) -> str:
        values = [
            p.loadgen_cores for p in pts if p.loadgen == tool and not math.isnan(p.loadgen_cores)
        ]
        return f"{min(values):.2f}..{max(values):.2f}" if values else "-"

    s = report.settings
    rest = rest_lines(report)
    if rest:
        rest = ["## REST (KServe v2 over HTTP/1.1)", "", *rest, ""]
    text = [
        "# Serving benchmark",
        "",
        f"Run {report.started} on {s['machine']}; load average at start {report.loadavg_start}, "
        f"at end {report.loadavg_end} (the end figure counts this benchmark's own processes). "
        f"Command: `{command}`",
        "",
        f"Model `{s['model']}` ({s['input_shape']}, float32 requests of {s['request_bytes']}) from "
        f"`{s['models']}`; server flags: `{s['server_args'] or '(defaults)'}` "
        f"(intra-op threads {s['intra_op_threads']}, inter-op {s['inter_op_threads']}, batching "
        f"{s['batching']}, max batch {s['max_batch_size']}, max delay {s['max_queue_delay_ms']} ms).",
        "",
        "Load, closed loop, the targets one right after the other at each point:",
        "",
        f"- **h2load** (unary; `cnnserve`, `v2`, their variants, `echo`): one connection per "
        f"request in flight, {s['duration']} s per point after a warm-up; latencies are h2load's "
        "per-request times, end of response included; every run checked against the server's "
        '`cnnserve_requests_total{code="OK"}` (exactly the requests sent). Inputs: uniform '
        "random pixels in [0, 1).",
        f"- **perf_analyzer** {s.get('perf_analyzer', '')} (`v2 pa`, `echo pa`: unary ModelInfer, "
        "synchronous, one thread per call in flight; `v2 stream`, `echo stream`: ModelStreamInfer "
        "with `--streaming --max-threads N` at concurrency N, which is N streams with one message "
        "in flight on each): three measurement windows of "
        f"{s['duration']}/3 s, figures perf_analyzer's own over them (p50/p99 from its per-request "
        "times); zero inputs (its random FP32 bytes include NaN, which the server refuses). "
        "`streams`: the most streams open at once during the run, from the server's "
        '`cnnserve_inflight_streams{method="ModelStreamInfer"}` gauge (the echo server\'s own '
        "count for echo), sampled during the run (once a second); `conn.`: the most TCP connections open to the "
        "target (perf_analyzer's gRPC client puts up to 6 of its clients on one connection; "
        "h2load's rows: its `-c`). Server and load-generator CPU: over the whole perf_analyzer "
        "run, divided by the images (calls) the server counted in it, and cores = that CPU per "
        "image at the windows' rate. Checked: no code but OK in the server's counts, and at least "
        "as many OK answers as perf_analyzer measured.",
        "",
        f"- **h2load --h1** (REST: `rest`, `rest json`, `echo http`, `echo http json`): KServe "
        "v2 `POST /v2/models/{name}/infer` to the same server's REST port (aiohttp, same process "
        "and data plane), HTTP/1.1 keep-alive, one connection per request in flight like the "
        "gRPC rows, same points. `rest`: Triton's binary tensor extension as tritonclient.http "
        "sends it (`application/octet-stream`, `Inference-Header-Content-Length`, a JSON header "
        "then the FP32 tensor's raw bytes, the same bytes as the gRPC rows' tensors; the output "
        "asked back as raw bytes, `binary_data_output`); `rest json`: the tensor as JSON "
        f"numbers, answered as JSON (batch 1 only). Bodies: {s.get('rest_request_bytes') or '-'}. "
        "Checked like the gRPC rows: the server's "
        '`cnnserve_requests_total{method="ModelInfer",code="OK",protocol="http"}` grows by '
        "exactly the requests sent and nothing else moves, h2load counts a 200 for each, and the "
        "answers' bodies add up to exactly the requests times the size of the answer checked "
        "before the run (the same probabilities as the gRPC answer to the same input).",
        "",
        markdown_table(pts),
        "`vs in-process`: images/s over the best in-process ORT figure at the same batch size "
        "(the best of one session with ONNX Runtime's default threads, one single-threaded "
        "session (`in-process 1t`, batch 1), and one single-threaded session per core side by "
        "side). `vs echo`: over the do-nothing grpc.aio server at the same batch and concurrency, "
        "under the same load generator and the same kind of call (h2load unary against h2load "
        "unary, perf_analyzer unary against perf_analyzer unary, streams against streams). "
        "`vs unary`: a stream row over perf_analyzer's unary `v2 pa` row at the same batch and "
        "concurrency. `vs gRPC`: a REST row over h2load's gRPC `v2` (ModelInfer) row at the same "
        "batch and concurrency: the same server, request and answer over HTTP/1.1 and aiohttp "
        "instead of HTTP/2 and grpc.aio. A REST row's `vs echo` is over `echo http` (`echo http "
        "json` for `rest json`): bench/echo_server.py's aiohttp route, on the event loop of its "
        "grpc.aio server as in the real server, reading the whole body and answering with the "
        "real server's answer bytes and headers, under the same h2load --h1 load: the floor of "
        "aiohttp and the loopback on this machine. `server CPU`: the server process's utime + "
        "stime over the run, all threads; for in-process rows, this process's ORT threads.",
        "",
        *rest,
        "## Targets",
        "",
        *targets(report, apis),
        "",
        "## Start-up, memory, load generators",
        "",
        f"- start-up to SERVING, one model, {len(report.startup_s)} starts: "
        + ", ".join(f"{v:.2f} s" for v in report.startup_s),
        f"- VmRSS: one model idle {report.idle_rss_one_model_mb:.0f} MB; the benchmark server "
        f"({s['models_served']}) idle {report.idle_rss_mb:.0f} MB, under load up to "
        f"{report.load_rss_mb:.0f} MB (VmHWM {report.load_hwm_mb:.0f} MB)",
        f"- h2load used {cores('h2load')} CPU cores (one thread; {cores(H1)} with --h1), "
        "perf_analyzer "
        f"{cores('perf_analyzer')} (a thread per call in flight or per stream); their CPU per "
        f"request is in the table. On this {os.cpu_count()}-core machine they share the CPUs "
        "with the server.",
        *[f"- {n}" for n in report.notes],
        "",
        "![throughput and p99 against concurrency](report.png)",
        "",
    ]
    body = "\n".join(text)
    path.write_text(body)
    return body


# ================================================================================== main


def pick_model(models: Path, wanted: str | None) -> str:
    names = sorted(p.name for p in models.iterdir() if p.is_dir() and not p.name.startswith("."))
    if wanted:
        if wanted not in names:
            raise BenchError(
                f"no model {wanted!r} in {models} (found {', '.join(names) or 'none'})"
            )
        return wanted
    if not names:
        raise BenchError(f"no models in {models}: train one first (make train)")
    return "mnist" if "mnist" in names else names[0]


def newest_version(models: Path, model: str) -> Path:
    versions = [int(p.name) for p in (models / model).iterdir() if p.name.isdigit()]
    if not versions:
        raise BenchError(f"{models / model}: no version folders")
    return models / model / str(max(versions)) / "model.onnx"


def main(argv: Sequence[str] | None = None) -> int:
    default_models = (
        Path("/tmp/shared-models") if Path("/tmp/shared-models").is_dir() else Path("models")
    )
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--models",
        type=Path,
        default=default_models,
        help=f"model repository to serve (default {default_models})",
    )
    p.add_argument("--model", help="model to load (default: mnist when present, else the first)")
    p.add_argument("--apis", default="cnnserve,v2", help="comma-separated: cnnserve, v2")
    p.add_argument(
        "--duration",
        type=float,
        default=4.0,
        help="seconds per measured point (the default run takes about 4.5 minutes)",
    )
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up per point")
    p.add_argument("--batch1", default="1,4,16,64", help="concurrencies at batch 1")
    p.add_argument("--batch32", default="1,4", help="concurrencies at batch 32")
    p.add_argument(
        "--stream-batches",
        default="1,8",
        help="batch sizes of perf_analyzer's rows (streams and unary; empty: none)",
    )
    p.add_argument(
        "--streams",
        default="1,16,64",
        help="perf_analyzer's concurrencies: streams (one message in flight on each), and "
        "unary calls in flight",
    )
    p.add_argument(
        "--no-perf-analyzer", action="store_true", help="skip perf_analyzer's rows (streams)"
    )
    p.add_argument("--startups", type=int, default=3, help="start-up measurements")
    p.add_argument("--server-args", default="", help="extra flags for python -m serving")
    p.add_argument(
        "--rest",
        default="binary,json",
        help="REST rows (h2load --h1, the batch sizes and concurrencies of the gRPC rows): "
        "binary (Triton's binary tensor extension), json (JSON tensors, batch 1 only); empty: none",
    )
    p.add_argument("--no-echo", action="store_true", help="skip the echo server")
    p.add_argument(
        "--workers-compare",
        type=int,
        default=2,
        metavar="N",
        help="also measure our API with --workers N (0: skip)",
    )
    p.add_argument("--no-in-process", action="store_true", help="skip in-process ORT")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=FLAGS",
        help="also measure the server with these extra flags, point by point beside the "
        "default one (an A/B in one run), e.g. runs2='--concurrent-runs 2'",
    )
    p.add_argument(
        "--server-root",
        type=Path,
        default=ROOT,
        help="folder whose serving/ package runs (A/B against another checkout)",
    )
    p.add_argument("--out", type=Path, default=BENCH / "results")
    p.add_argument(
        "--publish",
        action="store_true",
        help="copy report.md and report.png to bench/REPORT.md and bench/report.png",
    )
    p.add_argument(
        "--quiet-load",
        type=float,
        default=1.5,
        help="wait for the 1-minute load average to fall below this ...",
    )
    p.add_argument(
        "--quiet-wait", type=float, default=0.0, help="... for at most this many seconds"
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a few short points only: checks the tooling, measures nothing",
    )
    args = p.parse_args(argv)  # fmt: skip

    if shutil.which("h2load") is None:
        raise BenchError("h2load not found: apt-get install nghttp2-client")
    if args.smoke:
        args.duration, args.warmup, args.startups, args.workers_compare = 0.3, 0.0, 1, 0
        args.batch1, args.batch32 = "1,4", "1"
        args.stream_batches, args.streams = "1", "4"
    apis = [a for a in args.apis.split(",") if a]
    if unknown := set(apis) - set(APIS):
        raise BenchError(f"unknown API(s) {sorted(unknown)}; choose from {', '.join(APIS)}")
    if not apis:
        raise BenchError("--apis: at least one gRPC API (the REST rows are compared with it)")
    rest_kinds = [k for k in args.rest.split(",") if k]
    if unknown := set(rest_kinds) - set(REST_KINDS):
        raise BenchError(f"--rest: unknown {sorted(unknown)}; choose from {', '.join(REST_KINDS)}")
    models: Path = args.models.resolve()
    model = pick_model(models, args.model)
    model_path = newest_version(models, model)
    server_args = args.server_args.split()
    settings = config.load([*server_args, "--model-repository", str(models)], environ=os.environ)
    rt_options = RuntimeOptions(
        provider=settings.provider,
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        spinning=settings.ort_spinning,
    )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(Options(args.duration, args.warmup, out))
    batches = {1: [int(c) for c in args.batch1.split(",") if c],
               32: [int(c) for c in args.batch32.split(",") if c]}  # fmt: skip
    pa_batches = [int(b) for b in args.stream_batches.split(",") if b]
    pa_concurrency = [int(c) for c in args.streams.split(",") if c]
    pa: PerfAnalyzer | None = None
    pa_skipped = ""
    if pa_batches and pa_concurrency and not args.no_perf_analyzer:
        pa, pa_skipped = setup_perf_analyzer()
        if pa is None:
            print(f"WARNING: no perf_analyzer rows (streams): {pa_skipped}", flush=True)
    if pa is None:
        pa_batches = []
    wait_quiet(args.quiet_load, args.quiet_wait)
    bench_started = time.perf_counter()

    probe = ModelRuntime(model_path, RuntimeOptions(warmup_batch_sizes=()))
    h, w, c = probe.info.input_shape
    input_name = probe.info.input_name
    del probe
    rng = np.random.default_rng(0)
    inputs = {b: rng.random((b, h, w, c), dtype=np.float32) for b in batches if batches[b]}
    zeros = {b: np.zeros((b, h, w, c), dtype=np.float32) for b in pa_batches}
    version = model_path.parent.name
    cpu_model = Path("/proc/cpuinfo").read_text()
    machine = next((ln.split(":", 1)[1].strip() for ln in cpu_model.splitlines()
                    if ln.startswith("model name")), "?")  # fmt: skip
    report = Report(
        started=datetime.datetime.now().isoformat(timespec="seconds"),
        settings={
            "machine": f"{os.cpu_count()} CPUs ({machine})",
            "model": model, "models": str(models), "input_shape": f"{h}x{w}x{c}",
            "request_bytes": ", ".join(f"batch {b}: {n:,} B" for b, n in sorted(
                {**{b: x.nbytes for b, x in inputs.items()},
                 **{b: x.nbytes for b, x in zeros.items()}}.items())),
            "perf_analyzer": pa.version if pa else "",
            "server_args": args.server_args, "intra_op_threads": settings.intra_op_threads,
            "inter_op_threads": settings.inter_op_threads, "batching": "on" if settings.batching else "off",
            "max_batch_size": settings.max_batch_size, "max_queue_delay_ms": settings.max_queue_delay_ms,
            "duration": args.duration,
            "models_served": ", ".join(sorted(q.name for q in models.iterdir() if q.is_dir())),
        },
        loadavg_start=loadavg(),
    )  # fmt: skip
    logs = runner.logs
    print(f"model {model} ({model_path}); results in {out}; load average {loadavg()}", flush=True)

    # 1. start-up and idle memory with one model
    if args.startups:
        measure_startup(
            models,
            model,
            server_args,
            repeats=args.startups,
            logs=logs,
            report=report,
            root=args.server_root.resolve(),
        )

    # 2. the server, its worker-process variant and the echo floor, all started at once and
    # measured point by point, one right after the other: a ratio compares figures taken
    # seconds apart, so a machine whose load drifts skews it less.
    responses: dict[tuple[str, int], bytes] = {}
    payloads: dict[tuple[str, int], Path] = {}
    started: list[Process] = []
    http_port = free_port() if rest_kinds else 0
    try:
        proc, port, metrics_port = start_server(
            models, server_args, logs / "server.log", args.server_root.resolve(),
            http_port=http_port,
        )  # fmt: skip
        started.append(proc)
        wait_serving(f"127.0.0.1:{port}", proc, timeout=120)
        time.sleep(1.0)
        report.idle_rss_mb = proc.memory_mb()
        for api in apis:
            for batch, x in inputs.items():
                body = request_bytes(api, model, input_name, x)
                payloads[api, batch] = out / f"payload-{api}-b{batch}.bin"
                payloads[api, batch].write_bytes(grpc_frame(body))
                responses[api, batch] = real_response(f"127.0.0.1:{port}", APIS[api], body)
        # target -> (process, what h2load sends it per batch, metrics port)
        targets_at: dict[str, tuple[Process, dict[int, Call], int | None]] = {
            api: (
                proc,
                {b: Call(f"http://127.0.0.1:{port}{APIS[api]}", payloads[api, b]) for b in inputs},
                metrics_port,
            )
            for api in apis
        }
        first = apis[0]
        rest_answers: dict[tuple[str, int], RestAnswer] = {}
        rest_calls: dict[tuple[str, int], Call] = {}
        rest_sizes: list[str] = []
        for batch, x in inputs.items():
            if not rest_kinds:
                break
            infer = v2.ModelInferResponse.FromString(real_response(
                f"127.0.0.1:{port}", MODEL_INFER, request_bytes("v2", model, input_name, x)))  # fmt: skip
            expected = np.frombuffer(infer.raw_output_contents[0], dtype="<f4")
            for kind in rest_kinds:
                if kind == "json" and batch != 1:
                    continue
                body, headers = rest_request(kind, input_name, x)
                file = out / f"payload-rest-{kind}-b{batch}.bin"
                file.write_bytes(body)
                url = f"http://127.0.0.1:{http_port}/v2/models/{model}/infer"
                answer = real_rest_response(url, body, headers, expected)
                rest_answers[kind, batch] = answer
                rest_calls[kind, batch] = Call(url, file, headers, True, len(answer.body))
                rest_sizes.append(f"{kind} batch {batch}: {len(body):,} B")
        for kind in rest_kinds:
            calls = {b: c for (k, b), c in rest_calls.items() if k == kind}
            targets_at[REST_KINDS[kind]] = (proc, calls, metrics_port)
        report.settings["rest_request_bytes"] = ", ".join(rest_sizes)
        extra: list[tuple[str, list[str], int, str]] = []  # name, flags, health checks, note
        if args.workers_compare > 1:
            n = args.workers_compare
            extra.append((f"w{n}", ["--workers", str(n)], 4 * n,
                          f"the same server with --workers {n} (processes sharing the port via "
                          "SO_REUSEPORT; h2load's connections spread over them; CPU and memory "
                          "summed over the processes)"))  # fmt: skip
        for variant in args.variant:
            name, _, flags = variant.partition("=")
            extra.append((name, flags.split(), 1, f"the same server with `{flags}`"))
        for name, flags, checks, note in extra:
            v_proc, v_port, v_metrics = start_server(
                models,
                [*server_args, *flags],
                logs / f"server-{name}.log",
                args.server_root.resolve(),
            )
            started.append(v_proc)
            for _ in range(checks):  # fresh connections: with workers, each gets some
                wait_serving(f"127.0.0.1:{v_port}", v_proc, timeout=120)
            targets_at[f"{first}-{name}"] = (
                v_proc,
                {b: Call(f"http://127.0.0.1:{v_port}{APIS[first]}", payloads[first, b])
                 for b in inputs},
                v_metrics,
            )  # fmt: skip
            report.notes.append(f"{first}-{name}: {note}")
        target = f"127.0.0.1:{port}"
        pa_unary: dict[str, bytes] = {}
        pa_infer: dict[int, bytes] = {}
        pa_stream: dict[int, bytes] = {}
        if pa is not None:  # what perf_analyzer asks before and while it measures
            pa_unary = {
                V2 + "ServerMetadata": real_response(
                    target, V2 + "ServerMetadata", v2.ServerMetadataRequest().SerializeToString()
                ),
                V2 + "ModelMetadata": real_response(
                    target, V2 + "ModelMetadata",
                    v2.ModelMetadataRequest(name=model, version=version).SerializeToString(),
                ),
                V2 + "ModelConfig": real_response(
                    target, V2 + "ModelConfig",
                    v2.ModelConfigRequest(name=model, version=version).SerializeToString(),
                ),
                V2 + "ModelStatistics": real_response(
                    target, V2 + "ModelStatistics",
                    v2.ModelStatisticsRequest(name=model, version=version).SerializeToString(),
                ),
            }  # fmt: skip
            for batch, x in zeros.items():
                body = request_bytes("v2", model, input_name, x, version=version)
                pa_infer[batch] = real_response(target, MODEL_INFER, body)
                pa_stream[batch] = real_stream_response(target, MODEL_STREAM_INFER, body)
        echo_ports: dict[int, int] = {}
        echo_procs: dict[int, Process] = {}
        # echo target -> what h2load sends it per batch
        echo_calls: dict[str, dict[int, Call]] = {"echo": {}}
        echo_calls.update({REST_TARGETS[REST_KINDS[k]][1]: {} for k in rest_kinds})
        if not args.no_echo:
            for batch in sorted(set(inputs) | set(pa_batches)):
                unary = {**pa_unary, MODEL_INFER: pa_infer[batch]} if batch in pa_infer else {}
                if first == "v2" and batch in inputs:  # h2load posts to ModelInfer too
                    unary.pop(MODEL_INFER, None)
                # one path per kind of REST body, each answered with the real server's answer
                http = {f"/{kind}/v2/models/{model}/infer": answer
                        for (kind, b), answer in rest_answers.items() if b == batch}  # fmt: skip
                echo_http_port = free_port() if http else 0
                echo, echo_port = start_echo(
                    logs,
                    f"b{batch}",
                    response=responses[first, batch] if batch in inputs else None,
                    unary=unary,
                    streams={MODEL_STREAM_INFER: pa_stream[batch]} if batch in pa_stream else {},
                    http=http,
                    http_port=echo_http_port,
                )
                started.append(echo)
                echo_procs[batch] = echo
                echo_ports[batch] = echo_port
                if batch in inputs:
                    url = f"http://127.0.0.1:{echo_port}{APIS[first]}"
                    echo_calls["echo"][batch] = Call(url, payloads[first, batch])
                for kind in rest_kinds:
                    if (kind, batch) in rest_calls:
                        call = rest_calls[kind, batch]
                        url = f"http://127.0.0.1:{echo_http_port}/{kind}/v2/models/{model}/infer"
                        echo_calls[REST_TARGETS[REST_KINDS[kind]][1]][batch] = Call(
                            url, call.payload, call.headers, True, call.answer_bytes
                        )
            report.notes.append(
                f"echo: bench/echo_server.py answering the {first} request (h2load) and "
                "perf_analyzer's ModelInfer and ModelStreamInfer requests, and its metadata, "
                "config and statistics calls, with the real server's response bytes for each "
                "(same payload both ways), no parsing (a stream's answer gets its request's id "
                "spliced in); one process per batch size"
            )
        for batch, concs in batches.items():
            for conc in concs:
                for target, (t_proc, calls, t_metrics) in targets_at.items():
                    if batch in calls:
                        report.points.append(
                            runner.load(
                                target,
                                call=calls[batch],
                                batch=batch,
                                concurrency=conc,
                                proc=t_proc,
                                metrics_port=t_metrics,
                            )
                        )
                for echo_target, calls in echo_calls.items():
                    if batch in calls and not args.no_echo:
                        report.points.append(
                            runner.load(
                                echo_target,
                                call=calls[batch],
                                batch=batch,
                                concurrency=conc,
                                proc=echo_procs[batch],
                                metrics_port=None,
                            )
                        )
        pa_targets = [*PA_TARGETS] + ([] if args.no_echo else [e for _, e in PA_TARGETS.values()])
        if pa is not None:
            for batch in pa_batches:
                for conc in pa_concurrency:
                    for pa_target in pa_targets:
                        on_echo = pa_target in ECHO_TARGETS
                        report.points.append(
                            runner.load_pa(
                                pa_target,
                                pa=pa,
                                port=echo_ports[batch] if on_echo else port,
                                model=model,
                                version=version,
                                batch=batch,
                                concurrency=conc,
                                proc=echo_procs[batch] if on_echo else proc,
                                metrics_port=None if on_echo else metrics_port,
                            )
                        )
        elif pa_skipped:
            report.notes.append(f"no perf_analyzer rows (streams): {pa_skipped}")
        report.load_rss_mb = max(
            p.rss_mb_max
            for p in report.points
            if p.target in apis or p.target in PA_TARGETS or p.target in REST_TARGETS
        )
        report.load_hwm_mb = proc.memory_mb("VmHWM")
    finally:
        for started_proc in started:
            started_proc.stop()

    # 4. ONNX Runtime alone
    if not args.no_in_process:
        seconds = max(args.duration, 0.2)
        cores = os.cpu_count() or 1
        for batch in sorted(set(inputs) | set(pa_batches)):
            x = inputs[batch] if batch in inputs else rng.random((batch, h, w, c), dtype=np.float32)
            for sessions in sorted({1, cores}):
                report.points.append(
                    in_process(model_path, rt_options, x, sessions=sessions, seconds=seconds)
                )
            if batch == 1:  # the streaming target's yardstick
                report.points.append(in_process(model_path, rt_options, x, sessions=1,
                                                seconds=seconds, single_threaded=True))  # fmt: skip

    report.loadavg_end = loadavg()
    report.notes.append(
        f"the whole benchmark took {time.perf_counter() - bench_started:.0f} s "
        f"({args.duration} s per point)"
    )
    report.points = ordered(report.points)
    add_ratios(report.points)
    write_csv(report.points, out / "results.csv")
    (out / "results.json").write_text(json.dumps(asdict(report), indent=1, default=str))
    given = list(argv if argv is not None else sys.argv[1:])
    command = " ".join([".venv/bin/python bench/serving_bench.py", *given])
    try:
        plot(report.points, out / "report.png")
    except ImportError:
        report.notes.append("no plot: matplotlib is not installed")
    markdown = write_report(report, apis, command, out / "report.md")
    print("\n" + markdown)
    if args.publish:
        shutil.copy(out / "report.md", BENCH / "REPORT.md")
        if (out / "report.png").exists():
            shutil.copy(out / "report.png", BENCH / "report.png")
        print("published bench/REPORT.md and bench/report.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
