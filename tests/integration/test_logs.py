"""Logs of a real server: one JSON object per line with --log-format json, a readable line per
event by default, and no per-request lines unless --log-level debug."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from harness import ServerProcess, copy_repository
from serving.pb.cnnserve.v1 import cnnserve_pb2 as pb
from serving.pb.cnnserve.v1 import cnnserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow


def failing_predict(target: str) -> None:
    """One call that fails on purpose (unknown model): a request event, not a server event."""
    image = np.zeros((1, 28, 28, 1), dtype=np.uint8)
    tensor = pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=image.shape, data=image.tobytes())
    with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.CnnServeStub(channel).Predict(
            pb.PredictRequest(model="no-such-model", images=tensor), timeout=30
        )
    assert err.value.code() is grpc.StatusCode.NOT_FOUND


def test_json_logs_one_object_per_line(trained_repo: Path, tmp_path: Path) -> None:
    repo = copy_repository(trained_repo, tmp_path / "models")
    broken = repo / "broken" / "1" / "model.onnx"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"this is not an ONNX file")
    server = ServerProcess(repo, extra_args=["--log-format", "json"])
    with server:
        failing_predict(server.target)
    assert server.proc is not None and server.proc.returncode == 0, server.logs()

    lines = server.logs().splitlines()
    entries: list[dict[str, Any]] = []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON line: {line!r}\n{server.logs()}")
        assert isinstance(entry, dict)
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
        entries.append(entry)
    events = {e["event"]: e for e in entries if "event" in e}

    started = events["server_started"]
    assert started["port"] == server.port and started["metrics_port"] == server.metrics_port
    assert "batching on" in started["message"]

    ready = events["model_ready"]
    assert (ready["model"], ready["version"], ready["level"]) == ("fashion", 1, "info")
    assert ready["seconds"] > 0 and ready["provider"] == "CPUExecutionProvider"
    assert ready["message"].startswith("model fashion v1 ready in ")

    refused = events["model_refused"]
    assert (refused["model"], refused["version"], refused["level"]) == ("broken", 1, "error")
    assert refused["reason"] and refused["seconds"] >= 0
    assert "exception" not in refused  # an expected refusal is one line, not a traceback

    assert {"server_stopping", "server_stopped"} <= events.keys()
    # Requests are logged at debug only: the failed call left no trace at the default level.
    assert not [e for e in entries if "no-such-model" in e["message"]], entries


def test_text_logs_read_as_sentences(server: ServerProcess) -> None:
    failing_predict(server.target)
    lines = server.logs().splitlines()
    ready = [line for line in lines if " model fashion v1 ready in " in line]
    assert len(ready) == 1 and "INFO" in ready[0] and "CPUExecutionProvider" in ready[0], lines
    assert any("listening on 127.0.0.1:" in line for line in lines), lines
    assert not any(line.lstrip().startswith("{") for line in lines), lines
    assert not any("no-such-model" in line for line in lines), lines
