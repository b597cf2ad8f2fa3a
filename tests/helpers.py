"""What several test files share: bounded polling, /metrics lookups on a running server, the
in-process ONNX Runtime reference, and the kernel's TCP tables. Fixtures live in conftest.py."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from harness import ServerProcess, scrape
from serving.core.repository import BatchingOptions, ModelRepository
from serving.core.runtime import RuntimeOptions

T = TypeVar("T")
SCALE = np.float32(1.0 / 255.0)  # how the server scales uint8 pixels into the model's float32

# States of a socket in /proc/net/tcp (include/net/tcp_states.h).
ESTABLISHED = "01"
LISTEN = "0A"


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.05
) -> T:
    """Poll `probe` until it returns something other than None or False, and return that
    (bounded, never a fixed sleep); AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value is not None and value is not False:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def metric(proc: ServerProcess, name: str, host: str = "127.0.0.1", **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`, from /metrics (0 when
    there are none)."""
    return scrape(proc.metrics_port, host).total(name, **labels)


def metric_or_none(proc: ServerProcess, name: str, **labels: str) -> float | None:
    """Like `metric`, but None when no sample matches (a series the server never made)."""
    return scrape(proc.metrics_port).get(name, **labels)


def cpu_session(model: Path) -> ort.InferenceSession:
    """A plain in-process ONNX Runtime session of `model` on the CPU."""
    return ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])


def session_with_outputs(model: onnx.ModelProto, values: list[str]) -> ort.InferenceSession:
    """A CPU session of `model` with the intermediate `values` added to its outputs (float32, any
    shape), to compare feature maps with."""
    for value in values:
        model.graph.output.append(helper.make_tensor_value_info(value, TensorProto.FLOAT, None))
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def expected_probabilities(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    """In-process ONNX Runtime on what the server runs (uint8 scaled as the server scales it,
    float32 as it is)."""
    x = x.astype(np.float32) * SCALE if x.dtype == np.uint8 else x
    out: np.ndarray = session.run(None, {"image": x})[0]
    return out


def repository(root: Path, **options: Any) -> ModelRepository:
    """A model repository over `root` as the unit tests make one: warmed up for batches of one,
    batching on (up to 8 images), two threads to load with; `options` add or replace the rest."""
    return ModelRepository(
        root,
        runtime_options=RuntimeOptions(warmup_batch_sizes=(1,)),
        batching=BatchingOptions(enabled=True, max_batch_size=8),
        executor=ThreadPoolExecutor(2),
        **options,
    )


def tcp_sockets(port: int, state: str) -> list[str]:
    """The local addresses (hex, as the kernel writes them) of the TCP sockets in `state` whose
    local port is `port`, IPv4 and IPv6."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, st = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if st == state and int(hex_port, 16) == port:
                found.append(address)
    return found


def ipv4_of(address: str) -> str:
    """The dotted IPv4 address of a hex address from `tcp_sockets` (an IPv4-mapped IPv6 one's
    last 32 bits)."""
    return socket.inet_ntoa(int(address[-8:], 16).to_bytes(4, "little"))
