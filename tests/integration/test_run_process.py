"""The run process behind a real server: batches run in a second process, a run process killed
under load costs no call (its runs go again in the server) and is replaced, and the server's
stop ends it."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from harness import ServerProcess
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.cnnserve.v1 import cnnserve_pb2_grpc as pb_grpc
from tests.helpers import expected_probabilities, metric, wait_for

pytestmark = pytest.mark.slow


def run_processes(server: ServerProcess) -> list[int]:
    assert server.proc is not None
    pids = []
    for task in Path(f"/proc/{server.proc.pid}/task").glob("*/children"):
        for pid in task.read_text().split():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"serving.core.run_child" in cmdline:
                pids.append(int(pid))
    return pids


def predict(channel: grpc.Channel, x: np.ndarray) -> np.ndarray:
    request = pb.PredictRequest(
        model="fashion",
        images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=x.shape, data=x.tobytes()),
    )
    reply = pb_grpc.CnnServeStub(channel).Predict(request, timeout=60)
    return np.frombuffer(reply.probabilities.data, np.float32).reshape(len(x), -1)


def test_a_killed_run_process_costs_no_call_and_is_replaced(
    trained_repo: Path, reference: ort.InferenceSession
) -> None:
    rng = np.random.default_rng(7)
    inputs = [rng.integers(0, 256, (1 + i % 40, 28, 28, 1), dtype=np.uint8) for i in range(240)]
    with ServerProcess(trained_repo, extra_args=["--run-process", "on"]) as server:
        server.running.wait_logged("up to 2 runs at once, in the run process", 30)
        first = wait_for("the run process", lambda: run_processes(server) or None)
        assert len(first) == 1
        assert metric(server, "cnnserve_run_process_up") == 1
        assert metric(server, "cnnserve_run_process_restarts_total") == 0

        def call(i: int) -> np.ndarray:
            if i == 60:
                os.kill(first[0], signal.SIGKILL)
            with grpc.insecure_channel(server.target) as channel:
                return predict(channel, inputs[i])

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(call, range(len(inputs))))
        for x, y in zip(inputs, answers, strict=True):
            np.testing.assert_allclose(y, expected_probabilities(reference, x), atol=1e-5)
        server.running.wait_logged(f"run process {first[0]} exited", 30)
        server.running.wait_logged("started again with 1 models", 30)
        assert metric(server, "cnnserve_run_process_restarts_total") == 1
        assert metric(server, "cnnserve_run_process_up") == 1
        second = wait_for("a new run process", lambda: run_processes(server) or None)
        assert second != first
        with grpc.insecure_channel(server.target) as channel:
            x = inputs[-1]
            np.testing.assert_allclose(
                predict(channel, x), expected_probabilities(reference, x), atol=1e-5
            )
        assert server.stop() == 0
    with pytest.raises(ProcessLookupError):
        os.kill(second[0], 0)


def test_off_runs_in_threads(trained_repo: Path, reference: ort.InferenceSession) -> None:
    with ServerProcess(trained_repo, extra_args=["--run-process", "off"]) as server:
        server.running.wait_logged("in worker threads", 30)
        assert run_processes(server) == []
        assert metric(server, "cnnserve_run_process_up") == 0
        x = np.zeros((3, 28, 28, 1), np.uint8)
        np.testing.assert_allclose(
            predict(server.channel(), x), expected_probabilities(reference, x), atol=1e-5
        )
