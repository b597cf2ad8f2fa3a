"""One measured point of the serving benchmark: a load generator's run against a target,
checked against the server's own counts; ONNX Runtime in this process; the start-up time."""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import harness
from bench.loadgen import (
    MODEL_INFER,
    PREDICT,
    V2,
    BenchError,
    Call,
    LoadResult,
    PerfAnalyzer,
    echo_status,
    h2load,
    perf_analyzer,
)
from bench.report import H1, HTTP_PA_TARGETS, Point, Report, loadavg, percentile
from bench.triton_peer import TritonServer
from harness import ROOT, Child, ServerProcess, one_model_repository
from serving.core.runtime import ModelRuntime, RuntimeOptions

METHOD_NAME = {PREDICT: "Predict", MODEL_INFER: "ModelInfer"}
REST_INFER = re.compile(r"/v2/models/[^/]+(/versions/\d+)?/infer")


def start_server(
    repository: Path,
    server_args: Sequence[str],
    log_path: Path,
    root: Path = ROOT,
    *,
    http_port: int = 0,
) -> ServerProcess:
    """`python -m serving` run from `root` (another checkout's `serving` package, for A/B), not
    waited for. The REST port is always given (0: off): the server's default one would clash
    between the servers a run starts."""
    server = ServerProcess(
        repository, ["--log-level", "warning", *server_args], log_path=log_path, root=root,
        http_port=http_port,
    )  # fmt: skip
    return server.start(wait_ready=False)


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
        proc: Child,
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
        proc: Child,
        metrics_port: int | None,
        sample: Child | None = None,
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
        proc: Child | TritonServer,
        metrics_port: int | None,
    ) -> Point:
        """One perf_analyzer point on the server (`metrics_port` given: its counts are checked),
        on the echo server (its own counts) or on Triton (`proc` a TritonServer: its counts).
        Targets in HTTP_PA_TARGETS run over HTTP (`port` the REST port)."""
        streaming = target.endswith("stream")
        protocol = "http" if target in HTTP_PA_TARGETS else "grpc"
        method = "ModelStreamInfer" if streaming else "ModelInfer"
        tag = f"{target.replace(' ', '-')}-b{batch}-c{concurrency}"
        rss, streams, connections = 0.0, math.nan if isinstance(proc, TritonServer) else 0.0, 0

        def sample() -> None:  # at most once a second: a scrape costs the server some CPU
            nonlocal rss, streams, connections
            rss = max(rss, proc.memory_mb())
            connections = max(connections, established(port))
            if streaming and not isinstance(proc, TritonServer):  # Triton has no such gauge
                now = (
                    open_streams(metrics_port, method)
                    if metrics_port
                    else float(echo_status(port)["streams"])  # type: ignore[arg-type]
                )
                streams = max(streams, now)

        before_cpu = proc.cpu_seconds()
        triton_before = proc.counts(model) if isinstance(proc, TritonServer) else {}
        before = scrape(metrics_port) if metrics_port else {}
        echo_before = self._echo_answered(port) if not metrics_port and not triton_before else {}
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
            protocol=protocol,
        )
        cpu = proc.cpu_seconds() - before_cpu
        proc.check_alive()
        point = Point(target, batch, concurrency, loadgen="perf_analyzer")
        if isinstance(proc, TritonServer):
            after = proc.counts(model)
            t = {k: after[k] - triton_before[k] for k in after}
            served = int(t["success"])
            if t["failure"] or served < result.requests or not result.requests:
                raise BenchError(
                    f"{target}: perf_analyzer measured {result.requests} answers, Triton "
                    f"counted {served} successes and {t['failure']:.0f} failures"
                )
            if t["executions"]:
                point.mean_batch = t["inferences"] / t["executions"]
        elif metrics_port:
            d = delta(scrape(metrics_port), before)
            served = self._check_served(d, method, result.requests, target, protocol)
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
        d: dict[tuple[str, ...], float],
        method: str,
        reported: int,
        target: str,
        protocol: str = "grpc",
    ) -> int:
        """perf_analyzer's run: every call the server counted was OK (its metadata, config and
        statistics calls too), and it counted at least the answers perf_analyzer measured."""
        ok = d.get(("requests", method, "OK", protocol), 0.0)
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
    name: str | None = None,
) -> Point:
    """ONNX Runtime alone: `sessions` threads, each running its own session in a loop (with
    several sessions, each on one thread: the best of ONNX Runtime on this machine, and so the
    ceiling the server's ratios are taken against). One session has the server's thread
    settings, or one intra-op thread with `single_threaded`. `name`: the row's target instead
    of the one these settings give."""
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
    target = name or target
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
            server = start_server(repo, server_args, logs / f"startup-{i}.log", root)
            try:
                seconds = server.wait_health(timeout=60, interval=0.005)
                report.startup_s.append(seconds)
                if i == repeats - 1:
                    time.sleep(1.0)
                    report.idle_rss_one_model_mb = server.running.memory_mb()
            finally:
                server.stop(20)
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
