"""The real server as a subprocess on free loopback ports, as a user would run it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.models import PYTHON, ROOT
from harness.ports import free_port


@dataclass
class ServerProcess:
    """`python -m serving` on free loopback ports, as a user would run it."""

    repository: Path
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    metrics_port: int = 0
    http_port: int = 0  # the REST API's port; 0 leaves it off (`http=True` picks a free one)
    http: bool = False
    proc: subprocess.Popen[str] | None = None
    log_path: Path | None = None
    credentials: grpc.ChannelCredentials | None = None  # how to connect to a TLS server

    def channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.target)
        return grpc.secure_channel(self.target, self.credentials)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        scheme = "http" if self.credentials is None else "https"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    def start(self, wait_ready: bool = True, timeout: float = 60.0) -> ServerProcess:
        self.port = self.port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        if self.http:
            self.http_port = self.http_port or free_port()
        self.log_path = self.log_path or self.repository.parent / f"server-{self.port}.log"
        cmd = [
            PYTHON,
            "-m",
            "serving",
            "--model-repository",
            str(self.repository),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
            "--http-port",
            str(self.http_port),
            "--poll-seconds",
            "0",
            *self.extra_args,
        ]
        env = {**os.environ, **self.env}
        log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True, env=env
        )
        if wait_ready:
            self.wait_health("", timeout)
        return self

    def wait_health(self, service: str = "", timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise AssertionError(
                        f"server exited with {self.proc.returncode}:\n{self.logs()}"
                    )
                try:
                    status = stub.Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=1
                    ).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise AssertionError(f"server not SERVING within {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path and self.log_path.exists() else ""

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def serve_newest(
    models_dir: Path, model: str, extra_args: Sequence[str], log_path: Path
) -> Iterator[tuple[ServerProcess, Path]]:
    """A server over `models_dir`, and the file of `model`'s newest version (which it serves),
    for the bench scripts that compare the server with in-process ONNX Runtime."""
    folder = models_dir / model
    versions = sorted(
        (int(p.name) for p in folder.glob("[0-9]*") if p.name.isdigit()), reverse=True
    )
    if not versions:
        raise SystemExit(f"{folder}: no model versions (run `make train DATASET={model}`)")
    with ServerProcess(models_dir, extra_args, log_path=log_path) as proc:
        yield proc, folder / str(versions[0]) / "model.onnx"
