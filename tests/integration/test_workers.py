"""`--workers N`: several server processes on one port, one /metrics that sums them."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness import ServerProcess
from serving.cores import worker_cpu_sets
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.cnnserve.v1 import cnnserve_pb2_grpc as pb_grpc
from tests.helpers import LISTEN, metric, tcp_sockets

pytestmark = pytest.mark.slow


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        out += [int(c) for c in task.read_text().split()]
    return out


def listening_sockets(port: int) -> int:
    """Sockets in LISTEN state on `port` (gRPC listens on IPv4-mapped IPv6 addresses)."""
    return len(tcp_sockets(port, LISTEN))


def serving_over_fresh_connections(server: ServerProcess, times: int) -> bool:
    for _ in range(times):
        # A new channel is a new TCP connection: the kernel may hand it to either worker.
        with grpc.insecure_channel(server.target) as channel:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                .status
            )
            if status != health_pb2.HealthCheckResponse.SERVING:
                return False
    return True


def test_workers_share_the_port_and_one_metrics_endpoint_sums_them(tiny_repo: Path) -> None:
    server = ServerProcess(tiny_repo, extra_args=["--workers", "2"]).start()
    try:
        assert server.proc is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            len(children(server.proc.pid)) == 2
            and listening_sockets(server.port) == 2
            and serving_over_fresh_connections(server, 8)
        ):
            time.sleep(0.2)
        workers = children(server.proc.pid)
        assert len(workers) == 2 and listening_sockets(server.port) == 2, server.logs()
        # Each worker on cores of its own, where the supervisor's cores can be cut in two.
        expected = worker_cpu_sets(2)
        if expected is not None:
            pinned = sorted(sorted(os.sched_getaffinity(pid)) for pid in workers)
            assert pinned == sorted(expected), server.logs()

        x = np.arange(2 * 16, dtype=np.uint8).reshape(2, 4, 4, 1)
        request = pb.PredictRequest(
            model="tiny",
            images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=x.shape, data=x.tobytes()),
        )
        answers = []
        for _ in range(30):
            with grpc.insecure_channel(server.target) as channel:
                answers.append(pb_grpc.CnnServeStub(channel).Predict(request, timeout=30))
        assert all(a.model == "tiny" and len(a.classifications) == 2 for a in answers)
        probabilities = {a.probabilities.data for a in answers}
        assert len(probabilities) == 1  # every worker runs the same model the same way

        # One scrape, every worker's counts: summed counters, live gauges.
        ok = {"model": "tiny", "method": "Predict", "code": "OK"}
        assert metric(server, "cnnserve_requests_total", **ok) == 30
        assert metric(server, "cnnserve_batch_size_sum", model="tiny") == 60
        assert metric(server, "cnnserve_inflight_requests", method="Predict") == 0
        assert metric(server, "cnnserve_model_state", model="tiny", state="READY") == 1

        server.signal(signal.SIGHUP)  # passed on: each worker rescans, and keeps serving
        time.sleep(0.5)
        assert serving_over_fresh_connections(server, 4)
        assert server.stop() == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    finally:
        server.stop()


def wait_workers(server: ServerProcess, n: int, timeout: float = 60) -> list[int]:
    assert server.proc is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = children(server.proc.pid)
        if len(pids) == n:
            return pids
        time.sleep(0.1)
    raise AssertionError(f"not {n} workers within {timeout}s:\n{server.logs()}")


def test_a_worker_that_dies_is_replaced_and_its_gauges_dropped(tiny_repo: Path) -> None:
    server = ServerProcess(tiny_repo, extra_args=["--workers", "2"]).start()
    try:
        first, second = wait_workers(server, 2)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and first in children(server.proc.pid):  # type: ignore[union-attr]
            time.sleep(0.1)  # until the supervisor has reaped it
        replacement = set(wait_workers(server, 2)) - {second}
        assert len(replacement) == 1 and first not in replacement
        assert f"worker {first} exited with -9: starting another" in server.logs()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.logs().count("listening on") < 3:
            time.sleep(0.2)  # the replacement is up
        assert serving_over_fresh_connections(server, 8)
        # Two live workers' model-state gauges, not three: the dead one's were dropped.
        assert metric(server, "cnnserve_model_state", model="tiny", state="READY") == 1
        assert server.stop() == 0
    finally:
        server.stop()


def test_a_crash_loop_takes_the_server_down(tiny_repo: Path) -> None:
    """More than MAX_RESTARTS exits in a minute: the supervisor stops the others and exits 1,
    for the orchestrator to restart it whole."""
    server = ServerProcess(tiny_repo, extra_args=["--workers", "2"]).start()
    try:
        assert server.proc is not None
        killed: set[int] = set()
        deadline = time.monotonic() + 90
        while len(killed) < 4 and time.monotonic() < deadline:
            alive = [p for p in children(server.proc.pid) if p not in killed]
            if alive:
                os.kill(alive[0], signal.SIGKILL)
                killed.add(alive[0])
            time.sleep(0.2)
        assert server.proc.wait(30) == 1
        assert len(killed) == 4
        assert "4 exits in 60 s: stopping the others" in server.logs()
        assert not any(Path(f"/proc/{pid}").exists() for pid in killed)
    finally:
        server.stop()
