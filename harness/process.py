"""One way to run a server as a child process: start it, wait until it serves, measure it, stop it.

Tests, benchmarks and scripts all start `python -m serving` (and the benchmarks' echo server)
through `Child`, so that a process is logged, measured through /proc and stopped one way.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.models import PYTHON, ROOT, newest_version
from harness.ports import free_port

CLK_TCK = os.sysconf("SC_CLK_TCK")


class ProcessFailed(AssertionError):
    """A child process died or never became ready (an AssertionError, so a test fails on it)."""


def terminate(proc: subprocess.Popen[Any], timeout: float) -> int:
    """SIGTERM (the server drains), then SIGKILL if it has not exited within `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


def proc_status_kib(pid: int, key: str) -> int | None:
    """A figure of /proc/<pid>/status (VmRSS, VmHWM) in KiB; None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    parts = stat[stat.rindex(")") + 2 :].split()
    return (int(parts[11]) + int(parts[12])) / CLK_TCK


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (the workers of `--workers N`)."""
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                pids += [int(c) for c in task.read_text().split()]
        i += 1
    return pids


def tree_cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its descendants (every thread), in seconds."""
    return sum(cpu_seconds(each) for each in process_tree(pid))


def tree_status_kib(pid: int, key: str = "VmRSS") -> int:
    """A /proc/<pid>/status figure summed over `pid` and its descendants (the server and its
    run process or workers); 0 once they are gone. For VmHWM the sum is an upper bound on the
    tree's peak: each process's own peak, not necessarily at the same moment."""
    return sum(proc_status_kib(each, key) or 0 for each in process_tree(pid))


def cpu_times() -> list[int]:
    """The machine's CPU time counters, /proc/stat's first line: user, nice, system, idle,
    iowait, irq, softirq, steal (then guest time, already counted in user)."""
    return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]


# Above this share of stolen CPU time a benchmark run carries a warning and is not published
# unless asked (bench/PROFILE.md, round 6: 15-32 % under load cut the parsing echo's rate by more
# than half).
STEAL_WARNING = 0.05


def add_max_steal(parser: argparse.ArgumentParser) -> None:
    """A benchmark's `--max-steal` flag, for its `--publish`."""
    parser.add_argument(
        "--max-steal",
        type=float,
        default=STEAL_WARNING,
        help="the largest share of CPU time stolen by the hypervisor for --publish (default "
        "%(default)s)",
    )


def too_stolen(stolen: float, max_steal: float) -> str | None:
    """Why a run is not to be published (its stolen share above `--max-steal`), or None."""
    if stolen <= max_steal:
        return None
    return (
        f"{stolen:.1%} of the CPU time was stolen by the hypervisor, above --max-steal "
        f"{max_steal:.1%}"
    )


def stolen_share(before: list[int], after: list[int]) -> float:
    """Of the CPU time between two `cpu_times` readings, the share that was steal: time this
    virtual machine's CPUs wanted to run and the hypervisor ran another guest instead. Above a
    few percent, a run measures the neighbours as much as the servers."""
    deltas = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(deltas)
    return deltas[7] / total if total > 0 and len(deltas) == 8 else 0.0


class Child:
    """A child process writing to a log file, measured through /proc with its descendants."""

    def __init__(
        self,
        cmd: Sequence[str],
        log_path: Path,
        *,
        name: str = "",
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.cmd = list(cmd)
        self.name = name or " ".join(self.cmd[:4])
        self.log_path = log_path
        self.started = time.perf_counter()
        self._log = log_path.open("w")
        self.popen: subprocess.Popen[str] = subprocess.Popen(
            self.cmd,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> float:
        """utime + stime of the process and its descendants (every thread), in seconds."""
        return tree_cpu_seconds(self.pid)

    def memory_mb(self, key: str = "VmRSS") -> float:
        """VmRSS (or another /proc/<pid>/status figure) of the process and its descendants."""
        total = tree_status_kib(self.pid, key)
        return total / 1024 if total else float("nan")

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise ProcessFailed(f"{self.name} exited with {self.popen.returncode}:\n{self.logs()}")

    def wait_logged(self, text: str, timeout: float) -> None:
        """Until `text` is in the log (a server that prints its port once it listens)."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            self.check_alive()
            if text in self.logs():
                return
            time.sleep(0.02)
        raise ProcessFailed(f"{self.name} did not log {text!r} within {timeout:.0f}s")

    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, timeout: float = 20.0) -> int:
        code = terminate(self.popen, timeout)
        self._log.close()
        return code


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
    log_path: Path | None = None
    credentials: grpc.ChannelCredentials | None = None  # how to connect to a TLS server
    root: Path = ROOT  # the checkout whose `serving` package runs (another one for an A/B)
    child: Child | None = field(default=None, init=False, repr=False)

    @property
    def proc(self) -> subprocess.Popen[str] | None:
        return None if self.child is None else self.child.popen

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
            PYTHON, "-m", "serving", "--model-repository", str(self.repository),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--metrics-port", str(self.metrics_port), "--http-port", str(self.http_port),
            "--poll-seconds", "0", *self.extra_args,
        ]  # fmt: skip
        self.child = Child(cmd, self.log_path, name="server", env=self.env, cwd=self.root)
        if wait_ready:
            self.wait_health("", timeout)
        return self

    def wait_health(self, service: str = "", timeout: float = 60.0, interval: float = 0.1) -> float:
        """Poll the health service every `interval` until `service` is SERVING; the seconds
        since the process started (the benchmark's start-up time)."""
        deadline = time.monotonic() + timeout
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.child is not None:
                    self.child.check_alive()
                try:
                    status = stub.Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=1
                    ).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return time.perf_counter() - self.started
                except grpc.RpcError:
                    pass
                time.sleep(interval)
        raise ProcessFailed(f"server not SERVING within {timeout:.0f}s:\n{self.logs()}")

    @property
    def running(self) -> Child:
        """The child process, once started."""
        assert self.child is not None, "not started"
        return self.child

    @property
    def started(self) -> float:
        return self.running.started

    def logs(self) -> str:
        return self.child.logs() if self.child is not None else ""

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        return 0 if self.child is None else self.child.stop(timeout)

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def serve_newest(
    models_dir: Path, model: str, extra_args: Sequence[str], log_path: Path
) -> Iterator[tuple[ServerProcess, Path]]:
    """A server over `models_dir`, and the file of `model`'s newest version (which it serves),
    for the scripts that compare the server with in-process ONNX Runtime."""
    model_file = newest_version(models_dir, model)
    with ServerProcess(models_dir, extra_args, log_path=log_path) as proc:
        yield proc, model_file
